"""How well models predict the noise on held-out images, per timestep: a diagnostic behind the Fashion-MNIST
experiment (which timesteps a conversion or a short fine-tune leaves worse than the dense model).

    python -m experiments.noise_prediction --data ../shared/data/fashion-mnist \
        dense=runs/fashion-mnist/dense/model.safetensors ema=runs/fashion-mnist/dense/ema.safetensors

Each NAME=CHECKPOINT is loaded with flexdit.load (a training checkpoint gives its EMA; add #model for its
raw weights); every model sees the same test images, timesteps and noise. Prints mean squared error of the
predicted noise, one row per timestep. --wrong-labels adds a column NAME:wrong per model: the relative rise in
that error when every image is given another class, a measure of how much the model uses its label.
"""
import argparse
import sys

import torch

from flexdit.checkpoints import load
from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.errors import FlexDiTError
from flexdit.training.data import open_dataset


def _noise_error(model, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> float:
    """Mean squared error of the model's predicted noise (its first C output channels)."""
    return (model(xt, t, labels)[:, : noise.shape[1]] - noise).square().mean().item()


@torch.no_grad()
def noise_mse(models: dict, data: str, timesteps: list[int], num_images: int, seed: int,
              wrong_labels: bool = False) -> dict[int, dict[str, float]]:
    test = open_dataset(data, split="test")
    x0, y = test.batch(torch.arange(min(num_images, len(test))))
    if wrong_labels:
        if test.num_classes < 2:
            raise FlexDiTError("--wrong-labels needs at least two classes")
        # another class for every image: a shift by 1..K-1, so never the true one
        shift = torch.randint(1, test.num_classes, y.shape, generator=torch.Generator().manual_seed(seed))
        y_wrong = (y + shift) % test.num_classes
    diffusion = GaussianDiffusion()
    table = {}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        tt = torch.full((len(x0),), t)
        xt = diffusion.q_sample(x0, tt, noise)
        row = {}
        for name, m in models.items():
            row[name] = _noise_error(m, xt, tt, y, noise)
            if wrong_labels:
                row[f"{name}:wrong"] = _noise_error(m, xt, tt, y_wrong, noise) / row[name] - 1
        table[t] = row
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.noise_prediction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Fashion-MNIST folder (its test split is used)")
    p.add_argument("--timesteps", default="5,50,200,500,900")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrong-labels", action="store_true",
                   help="also give each model wrong classes and print the relative rise in error")
    p.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT[#model]")
    args = p.parse_args(argv)
    try:
        models = {}
        for item in args.models:
            name, sep, path = item.partition("=")
            if not sep:
                raise FlexDiTError(f"{item!r}: give NAME=CHECKPOINT")
            path, _, weights = path.partition("#")
            models[name] = load(path, weights=weights or None).eval()
        table = noise_mse(models, args.data, [int(t) for t in args.timesteps.split(",")], args.num_images, args.seed,
                          args.wrong_labels)
    except FlexDiTError as e:
        sys.exit(f"error: {e}")
    columns = next(iter(table.values())).keys()
    print("t     " + "".join(f"{name:>14}" for name in columns))
    for t, row in table.items():
        print(f"{t:<6}" + "".join(f"{v:+14.1%}" if k.endswith(":wrong") else f"{v:14.4f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
