"""`flexdit eval` on bad input: each case builds its bad file in tmp_path and expects one clear line and exit
status 2, never a traceback, a hang or a silently wrong number. Tiny 28x28 batches and --features fmnist (the
shipped classifier), so no Inception weights are needed; most cases fail before any feature is computed."""
import io
import os
import signal
import struct
import zipfile

import numpy as np
import pytest

from conftest import cli_fails

N = 8  # images per good batch: above the evaluator's minimum of 4
LIE_SHAPE = (100000000, 256, 256, 3)  # 18 TiB of pixels, claimed by a few bytes


@pytest.fixture(autouse=True)
def _no_hang():
    """A case that blocks (reading a FIFO, say) fails after 20 s instead of hanging the suite."""
    def hung(*_):
        raise TimeoutError("flexdit eval did not return")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def images(n: int = N, side: int = 28, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, side, side, channels), dtype=np.uint8)


def npz(path, compressed: bool = False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def good(tmp) -> str:
    return npz(tmp / "good.npz", arr_0=images(), arr_1=np.arange(N) % 10)


def samples(**arrays):
    """A case whose samples file holds `arrays`, against a good reference."""
    return lambda tmp: [npz(tmp / "bad.npz", **arrays), good(tmp)]


def reference(**arrays):
    """A case whose reference file holds `arrays`, against good samples."""
    return lambda tmp: [good(tmp), npz(tmp / "bad.npz", **arrays)]


def npy_bytes(array: np.ndarray, header: dict | None = None) -> bytes:
    """The .npy bytes of `array`, with its header replaced by `header` if given."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header or np.lib.format.header_data_from_array_1_0(array))
    return buffer.getvalue() + array.tobytes()


def lying_header(tmp):
    """An arr_0 whose header claims LIE_SHAPE over 100 bytes of data."""
    path = tmp / "lie.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", npy_bytes(np.zeros(100, np.uint8),
                                          {"descr": "|u1", "fortran_order": False, "shape": LIE_SHAPE}))
    return [path, good(tmp)]


def lying_directory(compressed: bool):
    """A small file whose zip directory claims 4 GiB for arr_0 (its header claims LIE_SHAPE): stored, both sizes
    patched (more than the file holds); deflated, the uncompressed one (more than deflate can expand to)."""
    def build(tmp):
        path = tmp / "lie.npz"
        header = {"descr": "|u1", "fortran_order": False, "shape": LIE_SHAPE}
        raw = npy_bytes(np.zeros(1000, np.uint8), header)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as z:
            z.writestr("arr_0.npy", raw)
        claimed = struct.pack("<I", 2 ** 32 - 2)  # the largest size without zip64; the header's 18 TiB is more
        data = bytearray(path.read_bytes())
        entry = data.rindex(b"PK\x01\x02")  # the central directory entry: sizes at offsets 20 and 24
        if not compressed:
            data[entry + 20:entry + 24] = claimed
        data[entry + 24:entry + 28] = claimed
        path.write_bytes(bytes(data))
        return [path, good(tmp)]
    return build


def truncated(tmp):
    path = npz(tmp / "cut.npz", arr_0=images())
    path.write_bytes(path.read_bytes()[:1000])
    return [path, good(tmp)]


def corrupt_stream(tmp):
    """A compressed arr_0 whose zip directory is intact but whose deflate stream is garbage in the middle."""
    path = npz(tmp / "corrupt.npz", compressed=True, arr_0=images(64))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    return [path, good(tmp)]


def fortran(tmp):
    return [npz(tmp / "f.npz", arr_0=np.asfortranarray(images())), good(tmp)]


def garbage_member(tmp):
    path = tmp / "garbage.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", b"this is not an npy array at all")
    return [path, good(tmp)]


def plain_file(name: str, content: bytes | None):
    def build(tmp):
        path = tmp / name
        if content is not None:
            path.write_bytes(content)
        return [path, good(tmp)]
    return build


def directory(tmp):
    (tmp / "folder.npz").mkdir()
    return [tmp / "folder.npz", good(tmp)]


def fifo(tmp):
    os.mkfifo(tmp / "pipe.npz")  # opening it for reading would block until a writer comes
    return [tmp / "pipe.npz", good(tmp)]


def stats(**arrays):
    """A statistics-only reference (fmnist: 128-d features) holding `arrays` next to good mu, sigma."""
    return reference(**({"mu": np.zeros(128), "sigma": np.eye(128)} | arrays))


def inception_stats(tmp):
    """Inception features with a NaN-holding spatial sigma_s: refused before the network is even loaded."""
    rgb = images(channels=3)
    sigma_s = np.eye(2023, dtype=np.float16)
    sigma_s[5, 7] = np.inf
    return [npz(tmp / "s.npz", arr_0=rgb), npz(tmp / "r.npz", arr_0=rgb, mu_s=np.zeros(2023), sigma_s=sigma_s),
            "--features", "inception", "--inception", tmp / "absent.pth"]


def json_to(target):
    def build(tmp):
        argv = [good(tmp), npz(tmp / "ref.npz", arr_0=images())]
        return [*argv, "--json", target(tmp, argv)]
    return build


def json_folder(tmp, argv):
    (tmp / "out").mkdir()
    return tmp / "out"


CASES = [
    # (id, argv builder, words the message must hold); --features fmnist is added unless the case gives one
    ("object images", samples(arr_0=np.array([1, "a", None], dtype=object)), ["arr_0", "Python objects"]),
    ("object labels", samples(arr_0=images(), arr_1=np.array([None] * N)), ["arr_1", "Python objects"]),
    ("object statistics", stats(mu=np.array([{}] * 128)), ["mu", "Python objects"]),
    ("truncated", truncated, ["cut.npz", "truncated"]),
    ("header lies about the size", lying_header, ["header of arr_0", "100000000", "100 bytes"]),
    ("stored zip entry lies", lying_directory(compressed=False), ["arr_0.npy", "more than the file holds"]),
    ("deflated zip entry lies", lying_directory(compressed=True), ["arr_0.npy", "more than the file holds"]),
    ("corrupt compressed data", corrupt_stream, ["cannot read arr_0", "Bad CRC-32", "corrupt"]),
    ("garbage member", garbage_member, ["arr_0 is not a readable array"]),
    ("fortran order images", fortran, ["Fortran order", "ascontiguousarray"]),
    ("float images", samples(arr_0=images().astype(np.float32)), ["float32", "expected uint8 NHWC"]),
    ("rank 3 images", samples(arr_0=images()[..., 0]), ["(8, 28, 28)", "expected uint8 NHWC"]),
    ("two channels", samples(arr_0=images(channels=2)), ["(8, 28, 28, 2)", "expected uint8 NHWC"]),
    ("empty images", samples(arr_0=images(side=0)), ["the images are empty"]),
    ("no images", samples(arr_0=images(0)), ["holds 0 images", "need at least 4"]),
    ("too few images", samples(arr_0=images(3)), ["holds 3 images", "need at least 4"]),
    ("no reference images", reference(arr_0=images(0)), ["holds 0 images"]),
    ("no arr_0", samples(images=images()), ["has no arr_0", "keys present: images"]),
    ("labels too short", samples(arr_0=images(), arr_1=np.arange(N - 1)), ["arr_1", "expected 8 integer"]),
    ("labels 2-d", samples(arr_0=images(), arr_1=np.zeros((N, 1), int)), ["arr_1", "expected 8 integer"]),
    ("float labels", samples(arr_0=images(), arr_1=np.arange(N) * 1.0), ["float64", "integer class labels"]),
    ("bool labels", samples(arr_0=images(), arr_1=np.ones(N, bool)), ["bool", "integer class labels"]),
    ("negative labels", samples(arr_0=images(), arr_1=np.arange(N) - 1), ["label -1", "0..9"]),
    ("labels beyond the classes", samples(arr_0=images(), arr_1=np.arange(N) + 5), ["label 10", "3 outside", "0..9"]),
    ("NaN mu", stats(mu=np.full(128, np.nan)), ["bad.npz", "mu contains NaN"]),
    ("inf sigma", stats(sigma=np.diag(np.full(128, np.inf))), ["bad.npz", "sigma contains NaN or infinite"]),
    ("inf sigma_s", inception_stats, ["r.npz", "sigma_s contains NaN or infinite"]),
    ("text mu", stats(mu=np.array(["0.5"] * 128)), ["mu is <U3", "real numbers"]),
    ("statistics of another network", stats(mu=np.zeros(2048), sigma=np.eye(2048)),
     ["mu has shape (2048,)", "another network"]),
    ("mu without sigma", reference(arr_0=images(), mu=np.zeros(128)), ["mu without sigma"]),
    ("rgb for fmnist", lambda tmp: [npz(tmp / "a.npz", arr_0=images(channels=3))] * 2, ["needs 1-channel"]),
    ("different sizes", lambda tmp: [npz(tmp / "a.npz", arr_0=images(side=32)), good(tmp)], ["same size"]),
    ("missing", plain_file("none.npz", None), ["samples file not found", "none.npz"]),
    ("empty file", plain_file("empty.npz", b""), ["empty.npz", "is empty"]),
    ("text file", plain_file("text.npz", b"hello"), ["is not an npz"]),
    ("directory", directory, ["folder.npz", "is a directory"]),
    ("fifo", fifo, ["pipe.npz", "not a regular file"]),
    ("--json is the samples", json_to(lambda tmp, argv: argv[0]), ["--json", "good.npz", "destroy"]),
    ("--json is the reference", json_to(lambda tmp, argv: argv[1]), ["--json", "ref.npz", "destroy"]),
    ("--json is a folder", json_to(json_folder), ["--json", "is a directory"]),
    ("batch size 0", lambda tmp: [good(tmp), good(tmp), "--batch-size", "0"], ["--batch-size", "at least 1"]),
]


@pytest.mark.filterwarnings("ignore:Matrix is singular")
@pytest.mark.parametrize("build, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_eval_refuses_bad_input(capsys, tmp_path, build, words):
    argv = [str(a) for a in build(tmp_path)]
    before = {p: os.stat(p).st_mtime_ns for p in argv if os.path.isfile(p)}
    if "--features" not in argv:
        argv += ["--features", "fmnist"]
    err = cli_fails(capsys, "eval", *argv)
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert {p: os.stat(p).st_mtime_ns for p in before} == before  # no input was rewritten
