"""Moving Fashion-MNIST: real garments moving along seeded trajectories, one class per video, as a video npz that
`flexdit train --data` reads (uint8 (N, F, 32, 32), labels, class names).

    python -m experiments.moving_fashion_mnist --data ../shared/data/fashion-mnist --out moving-fmnist.npz
"""
import argparse

from flexdit.cli import fail
from flexdit.errors import FlexDiTError
from flexdit.training.video_data import write_fashion_mnist_videos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Fashion-MNIST idx files")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--videos", type=int, default=6000)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = write_fashion_mnist_videos(args.data, args.out, args.videos, args.split, args.frames, seed=args.seed)
    except FlexDiTError as e:
        fail(str(e))
    print(f"wrote {written['path']}: {written['num_videos']} videos of {written['frames']} frames, "
          f"{written['size']} x {written['size']} px, seed {written['seed']}")


if __name__ == "__main__":
    main()
