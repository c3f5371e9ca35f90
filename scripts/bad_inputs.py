"""A corpus of bad or unusual inputs to the `flexdit` command line, each run as `PYTHON -m flexdit ...` and
classified, to count how the CLI copes before and after robustness work (issue 17).

Every case names the argv, the files it needs (built in a temporary folder with tiny random models, through
flexdit's own API) and what should happen:
  error   a clean refusal: exit status 2, the last stderr line `flexdit: error: ...` (or argparse's
          `flexdit CMD: error: ...`), no traceback;
  ok      exit 0, and where the result can be checked (a file written and loadable), the check passes;
  either  both are fine (a legitimately ambiguous input); an exit 0 must still pass the check.
Outcomes: ok, clean error, wrong refusal (a clean error where ok was expected), messy error (a non-zero exit
without a traceback that is not one clean line), traceback, silent wrong (exit 0 where an error was expected,
or a failed check), hang (past the timeout), setup failed (a bug of this script, not of flexdit).

    python scripts/bad_inputs.py                       # the installed flexdit
    python scripts/bad_inputs.py --root /tmp/before    # another source tree (PYTHONPATH=TREE)
    python scripts/bad_inputs.py --only sample/ --jobs 2 --json /tmp/bad_inputs.json

Each process runs with `prlimit --as` (4 GiB of address space), so an input that makes flexdit allocate without
bound fails fast instead of taking the machine's memory.
"""
import argparse
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

OUTCOMES = ("ok", "clean error", "wrong refusal", "messy error", "traceback", "silent wrong", "hang",
            "setup failed")
NOT_CLEAN = ("wrong refusal", "messy error", "traceback", "silent wrong", "hang", "setup failed")
ERROR_LINE = re.compile(r"^flexdit( [\w-]+)?: error: \S")
ERROR_ANYWHERE = re.compile(r"flexdit( [\w-]+)?: error: [^\r\n]*")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor moves a progress bar leaves behind
MEMORY_LIMIT = 4 * 2**30  # bytes of address space per flexdit process
HUGE = str(2**70)  # does not fit an int64
DENSE4 = ("dense",) * 4
FLEX4 = ("gen", "sparse", "recover", "dense")  # the smallest FlexDiT: one SDTM whose dense block is the top


# --- cases and results ----------------------------------------------------------------------------------
@dataclass
class Result:
    rc: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Ctx:
    """What a case's setup and checks see: the shared assets, the case's own folder (its working directory)
    and a way to run a prerequisite flexdit command."""
    assets: Path
    work: Path
    runner: "Runner"

    def expand(self, text: str) -> str:
        return text.replace("{A}", str(self.assets)).replace("{W}", str(self.work))

    def a(self, rel: str) -> Path:
        return self.assets / rel

    def w(self, rel: str) -> Path:
        return self.work / rel

    def flexdit(self, argv: str | list[str]) -> Result:
        """Run a command the case builds on (e.g. a first training run); it must succeed."""
        res = self.runner.run([self.expand(a) for a in split(argv)], self.work, timeout=300)
        if res.rc != 0:
            raise RuntimeError(f"prerequisite `flexdit {argv}` failed ({res.rc}): {last_line(res.stderr)}")
        return res


Check = Callable[[Ctx, Result], str | None]  # None when right, else what is wrong


@dataclass
class Case:
    name: str  # "<command>/<what>", unique; --only matches it
    group: str  # the class of input
    argv: list[str]  # after `python -m flexdit`; {A} = shared assets folder, {W} = the case's folder (cwd)
    expect: str  # "error", "ok" or "either"
    setup: Callable[[Ctx], None] | None = None
    check: Check | None = None  # on exit 0: is the result right?
    invariant: Check | None = None  # whatever the exit: nothing destroyed, no code run
    stdout: str = "capture"  # "closed": the reader has gone away, as `| head -1` after its line
    timeout: float = 60.0


@dataclass
class Outcome:
    name: str
    group: str
    expect: str
    outcome: str
    rc: int | None
    seconds: float
    argv: str
    detail: str  # the error line, the failed check, or the traceback's last line
    stderr_tail: str = ""


def split(argv: str | list[str]) -> list[str]:
    return shlex.split(argv) if isinstance(argv, str) else list(argv)


def last_line(text: str) -> str:
    """The last line a terminal would show: what follows the last carriage return, escapes dropped."""
    lines = [ANSI.sub("", line.split("\r")[-1]).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


# --- running --------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, python: str, root: str | None, home: Path):
        self.python = python
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLEXDIT_INCEPTION")}
        self.env.update(HOME=str(home), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                        PYTHONDONTWRITEBYTECODE="1")
        if root:
            self.env["PYTHONPATH"] = str(Path(root).resolve())

    def command(self, argv: list[str]) -> list[str]:
        return ["prlimit", f"--as={MEMORY_LIMIT}", "--", self.python, "-m", "flexdit", *argv]

    def run(self, argv: list[str], cwd: Path, timeout: float, stdout: str = "capture") -> Result:
        start = time.perf_counter()
        if stdout == "closed":
            read_end, write_end = os.pipe()
            os.close(read_end)  # every write now fails with EPIPE, as after `head -1` has exited
            out_target = write_end
        else:
            write_end, out_target = None, subprocess.PIPE
        proc = subprocess.Popen(self.command(argv), cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=out_target, stderr=subprocess.PIPE, start_new_session=True)
        if write_end is not None:
            os.close(write_end)
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            rc = None
        return Result(rc, (out or b"").decode(errors="replace"), err.decode(errors="replace"),
                      time.perf_counter() - start)


def exception_line(text: str) -> str:
    """The `SomeError: message` line of the last traceback in `text` (its first unindented line)."""
    _, _, after = text.rpartition("Traceback (most recent call last):")
    return next((line for line in after.splitlines()[1:] if line and not line[0].isspace()), last_line(text))


def classify(case: Case, ctx: Ctx, res: Result) -> tuple[str, str]:
    """(outcome, detail) of one finished case."""
    err = res.stderr
    if res.rc is None:
        return "hang", f"no exit after {case.timeout:.0f} s"
    if "Traceback (most recent call last)" in err or "Exception ignored" in err:
        return "traceback", exception_line(err)
    if case.invariant is not None:
        broken = case.invariant(ctx, res)
        if broken:
            return "silent wrong", broken
    line = last_line(err)
    refused = res.rc == 2 and ERROR_LINE.match(line)
    if res.rc == 0 or (case.stdout == "closed" and not refused):  # a closed reader may end it with SIGPIPE: fine
        if case.expect == "error":
            return "silent wrong", f"exit {res.rc}; expected a refusal"
        wrong = case.check(ctx, res) if case.check is not None else None
        return ("silent wrong", wrong) if wrong else ("ok", "")
    if not refused:
        found = ERROR_ANYWHERE.search(err)
        where = f"mixed with other output, last line {line[:60]!r}: {found.group(0)}" if found else line
        return "messy error", f"exit {res.rc}: {where or '(no stderr)'}"
    return ("wrong refusal" if case.expect == "ok" else "clean error"), line


def run_case(index: int, case: Case, assets: Path, work_root: Path, runner: Runner) -> Outcome:
    slug = re.sub(r"[^\w.-]+", "_", case.name)[:80]
    work = work_root / f"{index:03d}-{slug}"
    work.mkdir(parents=True)
    ctx = Ctx(assets, work, runner)
    argv = [ctx.expand(a) for a in case.argv]
    shown = " ".join(shlex.quote(a) for a in argv)
    try:
        if case.setup is not None:
            case.setup(ctx)
    except Exception as e:  # noqa: BLE001 - any failure here is this script's, reported as such
        return Outcome(case.name, case.group, case.expect, "setup failed", None, 0.0, shown,
                       f"{type(e).__name__}: {e}")
    res = runner.run(argv, work, case.timeout, case.stdout)
    try:
        outcome, detail = classify(case, ctx, res)
    except Exception as e:  # noqa: BLE001
        outcome, detail = "setup failed", f"check raised {type(e).__name__}: {e}"
    return Outcome(case.name, case.group, case.expect, outcome, res.rc, round(res.seconds, 2), shown, detail,
                   res.stderr[-4000:] if outcome in NOT_CLEAN else "")


# --- checks ---------------------------------------------------------------------------------------------
def loads(rel: str, kind: str | None = None) -> Check:
    """The written checkpoint loads with flexdit (and is a 'DiT' or a 'FlexDiT')."""
    def check(ctx, res):
        import flexdit

        path = ctx.w(rel)
        if not path.is_file():
            return f"{rel} was not written"
        try:
            model = flexdit.load(path)
        except Exception as e:  # noqa: BLE001 - what went wrong is the finding
            return f"{rel} does not load: {type(e).__name__}: {str(e)[:120]}"
        if kind and ("FlexDiT" if model.is_flexdit else "DiT") != kind:
            return f"{rel} is not a {kind}"
        return None
    return check


def image_file(rel: str) -> Check:
    """An image file exists, opens, and its format is the one its name says."""
    def check(ctx, res):
        from PIL import Image

        path = ctx.w(rel)
        if not path.is_file():
            return f"{rel} was not written"
        try:
            with Image.open(path) as im:
                fmt = im.format
        except Exception as e:  # noqa: BLE001
            return f"{rel} is not an image ({type(e).__name__})"
        named = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
        if named and fmt != named:
            return f"{rel} holds a {fmt} image under a {path.suffix} name"
        return None
    return check


def npz_file(rel: str, key: str, shape: tuple[int, ...], dtype: str) -> Check:
    def check(ctx, res):
        import numpy as np

        path = ctx.w(rel)
        if not path.is_file():
            return f"{rel} was not written"
        with np.load(path) as z:
            if key not in z:
                return f"{rel} has no {key} (has {sorted(z)})"
            a = z[key]
        if a.shape != shape or str(a.dtype) != dtype:
            return f"{rel}: {key} is {a.dtype} {a.shape}, expected {dtype} {shape}"
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"{rel}: {key} holds NaN/inf"
        return None
    return check


def written(rel: str) -> Check:
    def check(ctx, res):
        return None if ctx.w(rel).exists() else f"{rel} was not written"
    return check


def trained(step: int, out: str = "run") -> Check:
    """A training run in {W}/OUT reached `step`, logged finite losses and left a loadable EMA."""
    def check(ctx, res):
        log = ctx.w(out) / "log.jsonl"
        if not log.is_file():
            return f"{out}/log.jsonl was not written"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if not records or records[-1]["step"] != step:
            return f"log ends at step {records[-1]['step'] if records else None}, expected {step}"
        if not all(math.isfinite(r["loss"]) for r in records):
            return "the log holds a non-finite loss"
        return loads(f"{out}/ema.safetensors")(ctx, res)
    return check


def json_stdout(test: Callable[[dict], str | None]) -> Check:
    def check(ctx, res):
        try:
            return test(json.loads(res.stdout))
        except ValueError:
            return f"stdout is not one JSON object: {res.stdout[:80]!r}"
    return check


def finite_fid(d: dict) -> str | None:
    return None if isinstance(d.get("fid"), float) and math.isfinite(d["fid"]) else f"fid is {d.get('fid')}"


def zero_fid(d: dict) -> str | None:
    fid = d.get("fid")
    return None if isinstance(fid, float) and abs(fid) < 1e-3 else f"fid of a batch against itself is {fid}"


def stdout_has(text: str) -> Check:
    def check(ctx, res):
        return None if text in res.stdout else f"stdout lacks {text!r}"
    return check


def unchanged(rel: str, source: str) -> Check:
    """{W}/REL still holds the bytes of asset SOURCE (nothing overwritten)."""
    def check(ctx, res):
        path = ctx.w(rel)
        if not path.is_file() or sha256(path) != sha256(ctx.a(source)):
            return f"{rel} was overwritten or removed"
        return None
    return check


def no_marker(ctx: Ctx, res: Result) -> str | None:
    return "a pickled payload ran (its marker file exists)" if ctx.w("pwned").exists() else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- setups ---------------------------------------------------------------------------------------------
def copies(*names: str) -> Callable[[Ctx], None]:
    """Copy assets into the case's folder (cases that may write over their inputs work on copies)."""
    def setup(ctx):
        for name in names:
            src, dst = ctx.a(name), ctx.w(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return setup


def folder(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx):
        ctx.w(rel).mkdir(parents=True)
    return setup


def plain_file(rel: str = "file.txt") -> Callable[[Ctx], None]:
    def setup(ctx):
        ctx.w(rel).write_text("a plain file\n")
    return setup


def chain(*setups: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(ctx):
        for s in setups:
            s(ctx)
    return setup


class Payload:
    """Unpickling this opens (creates) `marker`: a harmless stand-in for running arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class Custom:
    """A class of this script: torch.load(weights_only=True) must refuse it."""


def pickle_payload(rel: str, torch_zip: bool) -> Callable[[Ctx], None]:
    def setup(ctx):
        import torch

        payload = {"model": Payload(str(ctx.w("pwned")))}
        if torch_zip:
            torch.save(payload, ctx.w(rel))
        else:
            ctx.w(rel).write_bytes(pickle.dumps(payload, protocol=2))
    return setup


# --- assets ---------------------------------------------------------------------------------------------
def tiny_model(size: int = 8, channels: int = 1, layout=DENSE4, density: bool = False, null_class: bool = True,
               seed: int = 0):
    """A random DiT: hidden 32, 2 heads, 10 classes, patch 2, pixel space unless `channels` is 4."""
    import torch
    from flexdit import DensitySchedule, DiT, DiTConfig

    config = DiTConfig(input_size=(size, size), patch_size=2, in_channels=channels, hidden_size=32, num_heads=2,
                       num_classes=10, class_dropout_prob=0.1 if null_class else 0.0, layout=layout,
                       density=DensitySchedule(0.61, 0.86).to_dict() if density else None)
    model = DiT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def build_models(A: Path) -> None:
    import torch
    from safetensors.torch import save_file

    dense = tiny_model()
    dense.save(A / "dense.safetensors")
    tiny_model(layout=FLEX4, density=True).save(A / "flex.safetensors")
    tiny_model(size=32).save(A / "dense32.safetensors")
    tiny_model(size=32, layout=FLEX4, density=True).save(A / "flex32.safetensors")
    tiny_model(channels=4).save(A / "latent.safetensors")
    tiny_model(null_class=False).save(A / "nonull.safetensors")
    torch.save({"model": dense.state_dict()}, A / "dense.pt")  # original DiT format: heads need --num-heads
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = tiny_model()
        with torch.no_grad():
            bad.blocks[0].attn.qkv.weight[0, 0] = value
        bad.save(A / f"{name}.safetensors")
    # odd names for a good file, and content that disagrees with the name
    for name in ("out", "X.SAFETENSORS", "swapped.pt"):
        shutil.copy(A / "dense.safetensors", A / name)
    shutil.copy(A / "dense.pt", A / "swapped.safetensors")
    # flexdit metadata that lies about the tensors
    tensors = {k: v.contiguous() for k, v in dense.state_dict().items()}
    config = dense.config.to_dict()
    for name, change in (("meta_badjson", None), ("meta_negative", {"hidden_size": -32}),
                         ("meta_nan", {"mlp_ratio": float("nan")}), ("meta_huge", {"hidden_size": 2**40}),
                         ("meta_shape", {"input_size": [16, 16]}), ("meta_depth0", {"layout": []})):
        text = "{not json" if change is None else json.dumps({**config, **change})
        save_file(tensors, str(A / f"{name}.safetensors"), metadata={"format": "flexdit", "flexdit_config": text})
    save_file({"foo": torch.zeros(2)}, str(A / "badkeys.safetensors"))


def build_bad_files(A: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    good_st, good_pt = (A / "dense.safetensors").read_bytes(), (A / "dense.pt").read_bytes()
    files = {
        "empty.safetensors": b"", "empty.pt": b"",
        "trunc.safetensors": good_st[: len(good_st) // 2], "trunc.pt": good_pt[: len(good_pt) // 2],
        "random.safetensors": rng.bytes(4096), "random.pt": rng.bytes(4096),
        "header_lie.safetensors": struct.pack("<Q", 2**62) + b"{}",
        "header_text.safetensors": struct.pack("<Q", 10) + b"not json!!",
        "text.pt": b"hello, I am not a checkpoint\n", "json.safetensors": b'{"a": 1}\n',
    }
    for name, data in files.items():
        (A / name).write_bytes(data)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    (A / "image.pt").write_bytes(buf.getvalue())
    np.savez(A / "arrays.pt.npz", a=np.zeros(3))
    (A / "arrays.pt.npz").rename(A / "arrays.pt")
    with zipfile.ZipFile(A / "zip.pt", "w") as z:
        z.writestr("readme.txt", "a zip, not a torch archive")
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Custom()}, A / "custom_class.pt")
    torch.save([torch.zeros(2)], A / "list.pt")
    torch.save(torch.zeros(3), A / "tensor.pt")
    torch.save({"a": 1, "b": "text"}, A / "notensors.pt")
    os.mkfifo(A / "fifo.safetensors")
    os.mkfifo(A / "fifo.pt")
    (A / "emptydir").mkdir()
    (A / "diffusers_bad").mkdir()
    (A / "diffusers_bad" / "config.json").write_text("{oops")
    os.symlink(A / "loop.safetensors", A / "loop.safetensors")
    (A / "file.txt").write_text("a plain file\n")


def idx_bytes(magic: int, array) -> bytes:
    import numpy as np

    return np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, images, labels, raw: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, magic, array in (("train-images-idx3-ubyte", 2051, images), ("train-labels-idx1-ubyte", 2049, labels)):
        data = idx_bytes(magic, array)
        if raw:
            (folder / name).write_bytes(data)
        else:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))


def write_images(folder: Path, classes: int, per_class: int, side: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.png")


def build_data(A: Path) -> None:
    """Training data: Fashion-MNIST idx files, image folders, a tiny VAE, extracted latents, and broken ones."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file, save_file
    from flexdit.training.extract import extract_latents

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (32, 28, 28), dtype=np.uint8), np.arange(32) % 10
    write_fashion_mnist(A / "fm", images, labels)
    write_fashion_mnist(A / "fm_label", images, np.where(labels == 3, 12, labels))
    write_fashion_mnist(A / "fm_zero_images", images[:0], labels[:0])
    write_fashion_mnist(A / "fm_trunc", images, labels, raw=True)
    path = A / "fm_trunc" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    write_fashion_mnist(A / "fm_empty", images, labels, raw=True)
    for f in (A / "fm_empty").iterdir():
        f.write_bytes(b"")
    write_fashion_mnist(A / "fm_garbage", images, labels)
    (A / "fm_garbage" / "train-images-idx3-ubyte.gz").write_bytes(rng.bytes(3000))
    for name, make in (("fm_zero", lambda p: os.symlink("/dev/zero", p)), ("fm_fifo", os.mkfifo)):
        write_fashion_mnist(A / name, images, labels, raw=True)
        (A / name / "train-images-idx3-ubyte").unlink()
        make(A / name / "train-images-idx3-ubyte")

    write_images(A / "imgs", classes=2, per_class=4, side=16)
    write_images(A / "imgs_corrupt", classes=2, per_class=4, side=16)
    (A / "imgs_corrupt" / "class0" / "0.png").write_bytes(rng.bytes(500))
    write_images(A / "imgs_empty_class", classes=2, per_class=4, side=16)
    (A / "imgs_empty_class" / "class2").mkdir()

    diffusers_logging.set_verbosity_error()  # no advice about `accelerate` in the report
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=16)
    vae.save_pretrained(A / "vae")
    (A / "vae_bad").mkdir()
    (A / "vae_bad" / "config.json").write_text("{broken")
    (A / "vae_noweights").mkdir()
    shutil.copy(A / "vae" / "config.json", A / "vae_noweights" / "config.json")

    extract_latents(str(A / "imgs"), str(A / "vae"), str(A / "latents"), 16, progress=False)
    meta = json.loads((A / "latents" / "meta.json").read_text())
    shard = "latents-00000.safetensors"
    for name, edit in (("latents_badmeta", "meta"), ("latents_lie", "count"), ("latents_noshards", "noshard"),
                       ("latents_nan", "nan"), ("latents_trunc", "trunc")):
        shutil.copytree(A / "latents", A / name)
        target = A / name / shard
        if edit == "meta":
            (A / name / "meta.json").write_text("{oops")
        elif edit == "count":
            (A / name / "meta.json").write_text(json.dumps({**meta, "num_samples": 1000}))
        elif edit == "noshard":
            target.unlink()
        elif edit == "nan":
            tensors = load_file(str(target))
            tensors["latents"][0, 0, 0, 0] = float("nan")
            save_file(tensors, str(target))
        else:
            target.write_bytes(target.read_bytes()[:300])


def write_npy_member(archive: zipfile.ZipFile, name: str, shape: tuple, payload: bytes, descr: str = "|u1") -> None:
    """An .npy member whose header says `shape` whatever `payload` holds."""
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    archive.writestr(f"{name}.npy", buf.getvalue() + payload)


def build_npz(A: Path) -> None:
    """ADM-style batches for `flexdit eval --features fmnist` (16 grey 28x28 images) and broken variants."""
    import numpy as np

    E = A / "e"
    E.mkdir()
    rng = np.random.default_rng(0)
    imgs = lambda n, side=28, ch=1: rng.integers(0, 255, (n, side, side, ch), dtype=np.uint8)  # noqa: E731
    labels = np.arange(16) % 10
    np.savez(E / "s.npz", arr_0=imgs(16), arr_1=labels)
    np.savez(E / "r.npz", arr_0=imgs(16))
    np.savez_compressed(E / "compressed.npz", arr_0=imgs(16), arr_1=labels)
    np.savez(E / "fortran.npz", arr_0=np.asfortranarray(imgs(16)))
    np.savez(E / "r32.npz", arr_0=imgs(16, side=32))
    np.savez(E / "rgb.npz", arr_0=imgs(16, ch=3))
    np.savez(E / "big.npz", arr_0=imgs(16, side=64))
    np.savez(E / "one.npz", arr_0=imgs(1))
    np.savez(E / "zero.npz", arr_0=imgs(0))
    np.savez(E / "float.npz", arr_0=imgs(16).astype(np.float32))
    np.savez(E / "bool.npz", arr_0=imgs(16) > 127)
    np.savez(E / "3d.npz", arr_0=imgs(16)[..., 0])
    np.savez(E / "nokeys.npz", other=np.zeros(3))
    np.savez(E / "object.npz", arr_0=np.empty((16, 28, 28, 1), dtype=object))
    np.savez(E / "labels_out.npz", arr_0=imgs(16), arr_1=np.full(16, 15))
    np.savez(E / "labels_neg.npz", arr_0=imgs(16), arr_1=np.full(16, -1))
    np.savez(E / "labels_float.npz", arr_0=imgs(16), arr_1=labels.astype(np.float32))
    np.savez(E / "labels_short.npz", arr_0=imgs(16), arr_1=labels[:5])
    eye = np.eye(128)
    np.savez(E / "stats_ok.npz", mu=np.zeros(128), sigma=eye)
    np.savez(E / "stats_nan.npz", mu=np.full(128, np.nan), sigma=eye)
    np.savez(E / "stats_inf.npz", mu=np.zeros(128), sigma=np.where(eye > 0, np.inf, 0.0))
    np.savez(E / "stats_negdef.npz", mu=np.zeros(128), sigma=-eye)
    np.savez(E / "stats_shape.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(E / "stats_mu_only.npz", mu=np.zeros(128))
    np.save(E / "plain.npy", imgs(16))
    good = (E / "s.npz").read_bytes()
    (E / "trunc.npz").write_bytes(good[: len(good) // 2])
    (E / "empty.npz").write_bytes(b"")
    (E / "random.npz").write_bytes(rng.bytes(4096))
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 3] ^= 0xFF  # one byte inside arr_0's data: the member's CRC no longer matches
    (E / "crc.npz").write_bytes(bytes(corrupt))
    payload = imgs(16).tobytes()
    with zipfile.ZipFile(E / "lie_big.npz", "w") as z:  # the header claims 10**9 images, the data holds 16
        write_npy_member(z, "arr_0", (10**9, 28, 28, 1), payload)
    with zipfile.ZipFile(E / "lie_short.npz", "w") as z:  # claims 64 images, holds 16
        write_npy_member(z, "arr_0", (64, 28, 28, 1), payload)
    with zipfile.ZipFile(E / "garbage_member.npz", "w") as z:
        z.writestr("arr_0.npy", rng.bytes(2000))
    os.mkfifo(E / "fifo.npz")


def build_assets(A: Path) -> None:
    A.mkdir(parents=True)
    build_models(A)
    build_bad_files(A)
    build_data(A)
    build_npz(A)


# --- the corpus -----------------------------------------------------------------------------------------
SAMPLE = "sample --ckpt {A}/dense.safetensors --sampler ddim --steps 2 --num 2 --device cpu --out {W}/s.png"
CONVERT = "convert {A}/dense.safetensors {W}/o.safetensors --layout gen,sparse,recover,dense"
FLOPS = "flops --model DiT-S/2 --image-size 64"
BENCH = "bench --ckpt {A}/flex.safetensors --repeats 1 --warmup 0 --sampler ddim --steps 2 --json"
TRAIN = ("train --model DiT-S/2 --hidden-size 32 --depth 2 --num-heads 2 --data {A}/fm --out {W}/run --steps 2 "
         "--batch 4 --ckpt-every 1 --log-every 1 --device cpu")
TRAIN_FLEX = ("train --model DiT-S/2 --hidden-size 32 --depth 4 --num-heads 2 --layout gen,sparse,recover,dense "
              "--density 0.61,0.86 --intervals 2 --data {A}/fm --out {W}/run --steps 2 --batch 4 --ckpt-every 1 "
              "--log-every 1 --device cpu")
TRAIN_INIT = ("train --init {A}/dense32.safetensors --layout dense --data {A}/fm --out {W}/run --steps 2 --batch 4 "
              "--ckpt-every 1 --log-every 1 --device cpu")
EXTRACT = "extract-latents --images {A}/imgs --vae {A}/vae --out {W}/lat --image-size 16 --device cpu"
EVAL = "eval {A}/e/s.npz {A}/e/r.npz --features fmnist --device cpu --json"
DEMO = ("demo --dense {A}/dense32.safetensors --flexdit {A}/flex32.safetensors --out {W}/demo.png --per-class 1 "
        "--steps 2 --repeats 1 --dtype fp32")


def C(name: str, group: str, argv: str | list[str], expect: str, **kw) -> Case:
    return Case(name, group, split(argv), expect, **kw)


def baseline_cases() -> list[Case]:
    """Inputs that must work: they show the harness and the tiny fixtures are sound."""
    g = "baseline"
    return [
        C("info/dense", g, "info {A}/dense.safetensors", "ok", check=stdout_has("flexdit")),
        C("info/dit-pt-with-heads", g, "info {A}/dense.pt --num-heads 2", "ok", check=stdout_has("dit")),
        C("info/flex-json", g, "info {A}/flex.safetensors --json", "ok",
          check=json_stdout(lambda d: None if d["kind"] == "FlexDiT" else "not a FlexDiT")),
        C("convert/dense-to-flexdit", g, CONVERT, "ok", check=loads("o.safetensors", "FlexDiT")),
        C("convert/dit-pt", g, "convert {A}/dense.pt {W}/o.safetensors --num-heads 2 --layout dense", "ok",
          check=loads("o.safetensors", "DiT")),
        C("flops/standard", g, FLOPS, "ok", check=stdout_has("GFLOPs")),
        C("flops/ckpt", g, "flops --ckpt {A}/flex.safetensors --json", "ok",
          check=json_stdout(lambda d: None if d["gflops"] > 0 else "no GFLOPs")),
        C("bench/ckpt", g, BENCH, "ok", check=json_stdout(lambda d: None if d["speedup"] > 0 else "no speedup")),
        C("sample/png", g, SAMPLE, "ok", check=image_file("s.png")),
        C("sample/flex-npz", g, "sample --ckpt {A}/flex.safetensors --steps 3 --num 3 --device cpu --npz {W}/s.npz",
          "ok", check=npz_file("s.npz", "arr_0", (3, 8, 8, 1), "uint8")),
        C("sample/dpm-cfg", g, SAMPLE + " --sampler dpm --cfg 1.5", "ok", check=image_file("s.png")),
        C("sample/latent-vae", g, "sample --ckpt {A}/latent.safetensors --vae {A}/vae --steps 2 --sampler ddim "
          "--num 2 --device cpu --out {W}/s.png", "ok", check=image_file("s.png")),
        C("sample/latent-none", g, "sample --ckpt {A}/latent.safetensors --vae none --steps 2 --sampler ddim "
          "--num 2 --device cpu --npz {W}/l.npz", "ok", check=npz_file("l.npz", "latents", (2, 4, 8, 8), "float32")),
        C("train/scratch", g, TRAIN, "ok", check=trained(2)),
        C("train/flex-mix-intervals", g, TRAIN_FLEX + " --mix-intervals", "ok", check=trained(2)),
        C("train/init-dense", g, TRAIN_INIT, "ok", check=trained(2)),
        C("train/latents", g, TRAIN.replace("{A}/fm", "{A}/latents"), "ok", check=trained(2)),
        C("train/images", g, TRAIN.replace("{A}/fm", "{A}/imgs") + " --image-size 16", "ok", check=trained(2)),
        C("extract-latents/ok", g, EXTRACT, "ok", check=written("lat/meta.json")),
        C("eval/fmnist", g, EVAL, "ok", check=json_stdout(finite_fid)),
        C("eval/same-batch", g, "eval {A}/e/s.npz {A}/e/s.npz --features fmnist --device cpu --json", "ok",
          check=json_stdout(zero_fid)),
        C("eval/compressed-fortran", g, "eval {A}/e/compressed.npz {A}/e/fortran.npz --features fmnist "
          "--device cpu --json", "ok", check=json_stdout(finite_fid)),
        C("eval/stats-only-reference", g, "eval {A}/e/s.npz {A}/e/stats_ok.npz --features fmnist --device cpu "
          "--json", "ok", check=json_stdout(finite_fid)),
        C("demo/tiny", g, DEMO, "ok", check=image_file("demo.png")),
        C("demo/shipped", g, "demo --out {W}/demo.png --per-class 1 --steps 2 --repeats 1 --dtype fp32", "ok",
          check=image_file("demo.png")),
    ]


BAD_CKPTS = {  # asset -> expectation for a command that reads a checkpoint
    "empty.safetensors": "error", "empty.pt": "error", "trunc.safetensors": "error", "trunc.pt": "error",
    "random.safetensors": "error", "random.pt": "error", "header_lie.safetensors": "error",
    "header_text.safetensors": "error", "text.pt": "error", "json.safetensors": "error", "image.pt": "error",
    "arrays.pt": "error", "zip.pt": "error", "custom_class.pt": "error", "list.pt": "error", "tensor.pt": "error",
    "notensors.pt": "error", "badkeys.safetensors": "error", "meta_badjson.safetensors": "error",
    "meta_negative.safetensors": "error", "meta_nan.safetensors": "error", "meta_huge.safetensors": "error",
    "meta_shape.safetensors": "error", "meta_depth0.safetensors": "error", "emptydir": "error",
    "diffusers_bad": "error", "loop.safetensors": "error", "file.txt": "error", "missing.safetensors": "error",
    "fifo.safetensors": "error", "fifo.pt": "error", "/dev/zero": "error",
    "out": "ok", "X.SAFETENSORS": "ok", "swapped.pt": "ok", "swapped.safetensors": "ok", "nan.safetensors": "either",
}
FIFO_TIMEOUT = 30.0


def ckpt_arg(asset: str) -> str:
    return asset if asset.startswith("/") else "{A}/" + asset


def bad_file_cases() -> list[Case]:
    g = "bad file"
    cases = []
    for asset, expect in BAD_CKPTS.items():  # every file through `info`, the plainest reader
        extra = " --num-heads 2" if asset in ("swapped.safetensors",) else ""
        cases.append(C(f"info/{asset.strip('/')}", g, f"info {ckpt_arg(asset)}{extra}", expect,
                       timeout=FIFO_TIMEOUT if "fifo" in asset else 60.0))
    cases += [
        C("info/name-with-newline", g, ["info", "{A}/bad\nname.safetensors"], "error"),
        C("info/name-too-long", g, ["info", "{A}/" + "x" * 300 + ".safetensors"], "error"),
        C("info/pickle-code-raw", g, "info {W}/evil.pt", "error", setup=pickle_payload("evil.pt", False),
          invariant=no_marker),
        C("info/pickle-code-torch", g, "info {W}/evil.pt", "error", setup=pickle_payload("evil.pt", True),
          invariant=no_marker),
    ]
    # a sample of the same files through every other reader of checkpoints
    for asset in ("trunc.safetensors", "random.pt", "custom_class.pt", "meta_negative.safetensors", "emptydir",
                  "nan.safetensors", "X.SAFETENSORS", "out"):
        expect = {"nan.safetensors": "error", "X.SAFETENSORS": "ok", "out": "ok"}.get(asset, "error")
        check = loads("o.safetensors") if expect == "ok" else None
        cases.append(C(f"convert/{asset}", g, f"convert {ckpt_arg(asset)} {{W}}/o.safetensors --layout dense",
                       expect, check=check))
    for asset in ("trunc.pt", "header_lie.safetensors", "meta_huge.safetensors", "fifo.safetensors", "nan.safetensors",
                  "inf.safetensors", "swapped.pt"):
        expect = "ok" if asset == "swapped.pt" else "error"
        cases.append(C(f"sample/{asset}", g, SAMPLE.replace("{A}/dense.safetensors", ckpt_arg(asset)), expect,
                       check=image_file("s.png") if expect == "ok" else None,
                       timeout=FIFO_TIMEOUT if "fifo" in asset else 60.0))
    cases += [
        C("sample/pickle-code", g, SAMPLE.replace("{A}/dense.safetensors", "{W}/evil.pt"), "error",
          setup=pickle_payload("evil.pt", True), invariant=no_marker),
        C("flops/trunc.safetensors", g, "flops --ckpt {A}/trunc.safetensors", "error"),
        C("flops/meta_huge", g, "flops --ckpt {A}/meta_huge.safetensors", "error"),
        C("flops/nan-weights", g, "flops --ckpt {A}/nan.safetensors", "ok", check=stdout_has("GFLOPs")),
        C("bench/random.pt", g, BENCH.replace("{A}/flex.safetensors", "{A}/random.pt"), "error"),
        C("bench/meta_nan", g, BENCH.replace("{A}/flex.safetensors", "{A}/meta_nan.safetensors"), "error"),
        C("train/init-trunc", g, TRAIN_INIT.replace("{A}/dense32.safetensors", "{A}/trunc.safetensors"), "error"),
        C("train/init-custom-class", g, TRAIN_INIT.replace("{A}/dense32.safetensors", "{A}/custom_class.pt"), "error"),
        C("train/init-nan-weights", g, TRAIN_INIT.replace("{A}/dense32.safetensors", "{A}/nan.safetensors"), "error"),
        C("train/init-dev-zero", g, TRAIN_INIT.replace("{A}/dense32.safetensors", "/dev/zero"), "error"),
        C("train/init-pickle-code", g, TRAIN_INIT.replace("{A}/dense32.safetensors", "{W}/evil.pt"), "error",
          setup=pickle_payload("evil.pt", True), invariant=no_marker),
        C("train/teacher-random", g, TRAIN_INIT + " --teacher {A}/random.safetensors", "error"),
        C("train/teacher-wrong-size", g, TRAIN_INIT + " --teacher {A}/dense.safetensors", "error"),
        C("train/teacher-nan", g, TRAIN_INIT + " --teacher {A}/nan.safetensors", "error"),
        C("demo/dense-trunc", g, DEMO.replace("{A}/dense32.safetensors", "{A}/trunc.safetensors"), "error"),
        C("demo/dense-nan", g, DEMO.replace("{A}/dense32.safetensors", "{A}/nan.safetensors"), "error"),
        C("demo/flexdit-emptydir", g, DEMO.replace("{A}/flex32.safetensors", "{A}/emptydir"), "error"),
        C("demo/pair-of-other-sizes", g, DEMO.replace("{A}/flex32.safetensors", "{A}/flex.safetensors"), "error"),
    ]
    return cases


def same_path_cases() -> list[Case]:
    g = "same path"
    keep = unchanged("m.safetensors", "dense.safetensors")
    src = copies("dense.safetensors")

    def link(ctx):
        src(ctx)
        os.symlink(ctx.w("dense.safetensors"), ctx.w("link.safetensors"))

    def moved(ctx):  # the copy under the name the invariant watches
        src(ctx)
        ctx.w("dense.safetensors").rename(ctx.w("m.safetensors"))

    def init_in_run(ctx):  # --init is the ema.safetensors that training into --out would write
        ctx.w("run").mkdir()
        shutil.copy(ctx.a("dense32.safetensors"), ctx.w("run/ema.safetensors"))

    return [
        C("convert/dst-is-src", g, "convert {W}/m.safetensors {W}/m.safetensors --layout gen,sparse,recover,dense",
          "error", setup=moved, invariant=keep),
        C("convert/dst-is-src-spelled-otherwise", g, "convert m.safetensors ./m.safetensors --layout "
          "gen,sparse,recover,dense", "error", setup=moved, invariant=keep),
        C("convert/dst-is-symlink-to-src", g, "convert {W}/dense.safetensors {W}/link.safetensors --layout "
          "gen,sparse,recover,dense", "error", setup=link,
          invariant=unchanged("dense.safetensors", "dense.safetensors")),
        C("sample/out-is-ckpt", g, SAMPLE.replace("{A}/dense.safetensors", "{W}/m.safetensors")
          .replace("{W}/s.png", "{W}/m.safetensors"), "error", setup=moved, invariant=keep),
        C("sample/npz-is-ckpt", g, SAMPLE.replace("{A}/dense.safetensors", "{W}/m.npz") + " --npz {W}/m.npz",
          "error", setup=lambda ctx: shutil.copy(ctx.a("dense.safetensors"), ctx.w("m.npz")),
          invariant=unchanged("m.npz", "dense.safetensors")),
        C("sample/npz-is-out", g, SAMPLE.replace("{W}/s.png", "{W}/x.npz") + " --npz {W}/x.npz", "error"),
        C("eval/json-is-samples", g, "eval {W}/e/s.npz {A}/e/r.npz --features fmnist --device cpu --json "
          "{W}/e/s.npz", "error", setup=copies("e/s.npz"), invariant=unchanged("e/s.npz", "e/s.npz")),
        C("extract-latents/out-is-images", g, EXTRACT.replace("{A}/imgs", "{W}/imgs").replace("{W}/lat", "{W}/imgs"),
          "error", setup=copies("imgs")),
        C("train/out-holds-init", g, TRAIN_INIT.replace("{A}/dense32.safetensors", "{W}/run/ema.safetensors"),
          "error", setup=init_in_run, invariant=unchanged("run/ema.safetensors", "dense32.safetensors")),
    ]


def number_cases() -> list[Case]:
    """nan, inf, negative, zero and huge values of every numeric flag."""
    g = "bad number"
    png = image_file("s.png")
    flex = SAMPLE.replace("dense.safetensors", "flex.safetensors")
    pt, pt_convert = SAMPLE.replace("dense.safetensors", "dense.pt"), CONVERT.replace("dense.safetensors", "dense.pt")
    no_num = SAMPLE.replace(" --num 2", "")
    table = [  # (name, base, extra flags, expect, check)
        ("sample/steps=0", SAMPLE, "--steps 0", "error", None),
        ("sample/steps=-1", SAMPLE, "--steps -1", "error", None),
        ("sample/steps=huge", SAMPLE, f"--steps {HUGE}", "error", None),
        ("sample/ddpm-steps=1001", SAMPLE, "--sampler ddpm --steps 1001", "error", None),
        ("sample/cfg=nan", SAMPLE, "--cfg nan", "error", None),
        ("sample/cfg=inf", SAMPLE, "--cfg inf", "error", None),
        ("sample/cfg=-1", SAMPLE, "--cfg -1", "either", png),
        ("sample/cfg=0", SAMPLE, "--cfg 0", "either", png),
        ("sample/eta=nan", SAMPLE, "--eta nan", "error", None),
        ("sample/eta=-1", SAMPLE, "--eta -1", "error", None),
        ("sample/eta=inf", SAMPLE, "--eta inf", "error", None),
        ("sample/seed=huge", SAMPLE, f"--seed {HUGE}", "error", None),
        ("sample/seed=-1", SAMPLE, "--seed -1", "either", png),
        ("sample/batch=0", SAMPLE, "--batch 0", "error", None),
        ("sample/batch=-1", SAMPLE, "--batch -1", "error", None),
        ("sample/batch=huge", SAMPLE, f"--batch {HUGE}", "ok", png),
        ("sample/grid-max=0", SAMPLE, "--grid-max 0", "error", None),
        ("sample/grid-max=-1", SAMPLE, "--grid-max -1", "error", None),
        ("sample/num=0", SAMPLE, "--num 0", "error", None),
        ("sample/num=-5", SAMPLE, "--num -5", "error", None),
        ("sample/num=2**40", SAMPLE, f"--num {2**40}", "error", None),
        ("sample/classes=empty", no_num, ["--classes", ""], "error", None),
        ("sample/classes=1,,2", no_num, "--classes 1,,2", "error", None),
        ("sample/classes=10-of-10", no_num, "--classes 10", "error", None),
        ("sample/classes=-1", no_num, "--classes=-1", "error", None),
        ("sample/classes=1.5", no_num, "--classes 1.5", "error", None),
        ("sample/classes=huge", no_num, f"--classes {HUGE}", "error", None),
        ("sample/classes-with-spaces", no_num, ["--classes", " 1, 2"], "ok", png),
        ("sample/density=nan", flex, "--density nan,nan", "error", None),
        ("sample/density=reversed", flex, "--density 0.9,0.5", "error", None),
        ("sample/density=1.5", flex, "--density 1.5", "error", None),
        ("sample/grid=0", flex, "--grid 0", "error", None),
        ("sample/grid=-2", flex, "--grid=-2", "error", None),
        ("sample/grid=99", flex, "--grid 99", "error", None),
        ("sample/num-heads=0", pt, "--num-heads 0", "error", None),
        ("sample/num-heads=3", pt, "--num-heads 3", "error", None),
        ("sample/input-size=0", pt, "--num-heads 2 --input-size 0", "error", None),
        ("sample/input-size=16-on-8", SAMPLE, "--input-size 16", "error", None),
        ("sample/device=cuda-absent", SAMPLE, "--device cuda", "error", None),
        ("sample/device=bogus", SAMPLE, "--device tpu", "error", None),
        ("convert/density=nan", CONVERT, "--density nan,nan", "error", None),
        ("convert/density=inf", CONVERT, "--density inf,inf", "error", None),
        ("convert/density=-0.5", CONVERT, "--density=-0.5,0.5", "error", None),
        ("convert/density=1,1", CONVERT, "--density 1,1", "error", None),
        ("convert/grid=0", CONVERT, "--grid 0", "error", None),
        ("convert/grid=huge", CONVERT, f"--grid {HUGE}", "error", None),
        ("convert/num-heads=-2", pt_convert, "--num-heads -2", "error", None),
        ("convert/input-size=-8", pt_convert, "--num-heads 2 --input-size -8", "error", None),
        ("convert/input-size=huge", pt_convert, f"--num-heads 2 --input-size {HUGE}", "error", None),
        ("info/density=nan", "info {A}/flex.safetensors", "--density nan,0.5", "error", None),
        ("info/grid=0", "info {A}/flex.safetensors", "--grid 0", "error", None),
        ("info/num-heads=0", "info {A}/dense.pt", "--num-heads 0", "error", None),
        ("flops/image-size=0", FLOPS, "--image-size 0", "error", None),
        ("flops/image-size=-256", FLOPS, "--image-size=-256", "error", None),
        ("flops/image-size=huge", FLOPS, f"--image-size {HUGE}", "error", None),
        ("flops/image-size=8", FLOPS, "--image-size 8", "error", None),
        ("flops/steps=0", FLOPS, "--steps 0", "error", None),
        ("flops/steps=-1", FLOPS, "--steps -1", "error", None),
        ("flops/steps=huge", FLOPS, f"--steps {HUGE}", "error", None),
        ("flops/ddpm-steps=1001", FLOPS, "--steps 1001", "error", None),
        ("flops/ddim-steps=0", FLOPS, "--sampler ddim --steps 0", "error", None),
        ("flops/density=nan", FLOPS, "--density nan,nan", "error", None),
        ("flops/density=inf", FLOPS, "--density inf", "error", None),
        ("flops/density=negative", FLOPS, "--density=-0.5,0.5", "error", None),
        ("flops/density=1,1", FLOPS, "--density 1,1", "error", None),
        ("flops/density=0,0", FLOPS, "--density 0,0", "ok", stdout_has("GFLOPs")),
        ("flops/density=empty", FLOPS, ["--density", ""], "error", None),
        ("flops/grid=0", FLOPS, "--grid 0", "error", None),
        ("flops/grid=1000", FLOPS, "--grid 1000", "error", None),
        ("flops/num-heads=0", "flops --ckpt {A}/dense.pt", "--num-heads 0", "error", None),
        ("bench/batch=0", BENCH, "--batch 0", "error", None),
        ("bench/batch=-1", BENCH, "--batch -1", "error", None),
        ("bench/batch=huge", BENCH, f"--batch {HUGE}", "error", None),
        ("bench/repeats=0", BENCH, "--repeats 0", "error", None),
        ("bench/repeats=-1", BENCH, "--repeats -1", "error", None),
        ("bench/warmup=-1", BENCH, "--warmup -1", "error", None),
        ("bench/steps=0", BENCH, "--steps 0", "error", None),
        ("bench/device=cuda-absent", BENCH, "--device cuda", "error", None),
        ("train/ema=nan", TRAIN, "--ema nan", "error", None),
        ("train/ema=inf", TRAIN, "--ema inf", "error", None),
        ("train/ema=-0.5", TRAIN, "--ema=-0.5", "error", None),
        ("train/ema=1.5", TRAIN, "--ema 1.5", "error", None),
        ("train/ema=0", TRAIN, "--ema 0", "ok", trained(2)),
        ("train/lr=nan", TRAIN, "--lr nan", "error", None),
        ("train/lr=inf", TRAIN, "--lr inf", "error", None),
        ("train/lr=-1", TRAIN, "--lr=-1", "error", None),
        ("train/lr=1e30", TRAIN, "--lr 1e30 --steps 3", "error", None),
        ("train/label-dropout=nan", TRAIN, "--label-dropout nan", "error", None),
        ("train/label-dropout=-0.1", TRAIN, "--label-dropout=-0.1", "error", None),
        ("train/label-dropout=1.5", TRAIN, "--label-dropout 1.5", "error", None),
        ("train/weight-decay=nan", TRAIN, "--weight-decay nan", "error", None),
        ("train/weight-decay=-1", TRAIN, "--weight-decay=-1", "error", None),
        ("train/seed=huge", TRAIN, f"--seed {HUGE}", "error", None),
        ("train/seed=-1", TRAIN, "--seed -1", "either", trained(2)),
        ("train/steps=0", TRAIN, "--steps 0", "error", None),
        ("train/steps=-1", TRAIN, "--steps -1", "error", None),
        ("train/batch=0", TRAIN, "--batch 0", "error", None),
        ("train/batch=-4", TRAIN, "--batch -4", "error", None),
        ("train/batch=huge", TRAIN, f"--batch {HUGE}", "error", None),
        ("train/intervals=0-dense", TRAIN, "--intervals 0", "error", None),
        ("train/intervals=0", TRAIN_FLEX, "--intervals 0", "error", None),
        ("train/intervals=-1", TRAIN_FLEX, "--intervals -1", "error", None),
        ("train/intervals=1001", TRAIN_FLEX, "--intervals 1001", "error", None),
        ("train/keep=-1", TRAIN, "--keep -1", "error", None),
        ("train/lr-warmup=-1", TRAIN, "--lr-warmup -1", "error", None),
        ("train/depth=0", TRAIN, "--depth 0", "error", None),
        ("train/depth=-1", TRAIN, "--depth -1", "error", None),
        ("train/depth=huge", TRAIN, f"--depth {2**40}", "error", None),
        ("train/num-heads=0", TRAIN, "--num-heads 0", "error", None),
        ("train/num-heads=-2", TRAIN, "--num-heads -2", "error", None),
        ("train/num-heads=3", TRAIN, "--num-heads 3", "error", None),
        ("train/hidden-size=0", TRAIN, "--hidden-size 0", "error", None),
        ("train/hidden-size=-32", TRAIN, "--hidden-size -32", "error", None),
        ("train/hidden-size=30", TRAIN, "--hidden-size 30", "error", None),
        ("train/hidden-size=huge", TRAIN, f"--hidden-size {2**40}", "error", None),
        ("train/image-size=0", TRAIN.replace("{A}/fm", "{A}/imgs"), "--image-size 0", "error", None),
        ("train/image-size=-16", TRAIN.replace("{A}/fm", "{A}/imgs"), "--image-size -16", "error", None),
        ("train/image-size=huge", TRAIN.replace("{A}/fm", "{A}/imgs"), f"--image-size {2**40}", "error", None),
        ("train/density=nan", TRAIN_FLEX, "--density nan,nan", "error", None),
        ("train/grid=0", TRAIN_FLEX.replace("--density 0.61,0.86", "--grid 0"), "", "error", None),
        ("train/distill=nan", TRAIN_INIT, "--teacher {A}/dense32.safetensors --distill nan", "error", None),
        ("train/distill=inf", TRAIN_INIT, "--teacher {A}/dense32.safetensors --distill inf", "error", None),
        ("train/device=cuda-absent", TRAIN, "--device cuda", "error", None),
        ("extract-latents/image-size=0", EXTRACT, "--image-size 0", "error", None),
        ("extract-latents/image-size=-16", EXTRACT, "--image-size -16", "error", None),
        ("extract-latents/image-size=huge", EXTRACT, f"--image-size {2**40}", "error", None),
        ("extract-latents/batch=-1", EXTRACT, "--batch -1", "error", None),
        ("extract-latents/shard-size=0", EXTRACT, "--shard-size 0", "error", None),
        ("eval/batch-size=0", EVAL, "--batch-size 0", "error", None),
        ("eval/batch-size=huge", EVAL, f"--batch-size {HUGE}", "either", json_stdout(finite_fid)),
        ("eval/device=cuda-absent", EVAL, "--device cuda", "error", None),
        ("demo/per-class=0", DEMO, "--per-class 0", "error", None),
        ("demo/per-class=huge", DEMO, f"--per-class {2**40}", "error", None),
        ("demo/steps=0", DEMO, "--steps 0", "error", None),
        ("demo/steps=-1", DEMO, "--steps -1", "error", None),
        ("demo/cfg=nan", DEMO, "--cfg nan", "error", None),
        ("demo/seed=huge", DEMO, f"--seed {HUGE}", "error", None),
        ("demo/repeats=0", DEMO, "--repeats 0", "error", None),
        ("demo/device=cuda-absent", DEMO, "--device cuda", "error", None),
    ]
    return [C(name, g, split(base) + split(extra), expect, check=check,
              timeout=40.0 if "2**40" in name or "huge" in name else 60.0)
            for name, base, extra, expect, check in table]


def inconsistent_cases() -> list[Case]:
    """Flags that contradict each other or have no effect on what was asked."""
    g = "inconsistent"
    flex_sample = SAMPLE.replace("dense.safetensors", "flex.safetensors")
    return [
        C("flops/dense-with-density", g, FLOPS + " --layout dense --density 0.5,0.9", "error"),
        C("flops/dense-with-grid", g, FLOPS + " --layout dense --grid 2", "error"),
        C("flops/ckpt-and-model", g, "flops --ckpt {A}/flex.safetensors --model DiT-B/2", "error"),
        C("flops/ckpt-and-image-size", g, "flops --ckpt {A}/flex.safetensors --image-size 512", "error"),
        C("flops/layout-depth-mismatch", g, FLOPS + " --layout 2+4x1-3-1-1+2", "error"),
        C("flops/density-and-grid", g, FLOPS + " --density 0.5,0.6 --grid 4", "error"),
        C("bench/ckpt-and-image-size", g, BENCH + " --image-size 512", "error"),
        C("bench/layout-dense", g, BENCH + " --layout dense", "error"),
        C("sample/eta-with-ddpm", g, SAMPLE + " --sampler ddpm --eta 0.5", "error"),
        C("sample/eta-with-dpm", g, SAMPLE + " --sampler dpm --eta 0.5", "error"),
        C("sample/cfg-without-null-class", g, SAMPLE.replace("dense.safetensors", "nonull.safetensors") + " --cfg 4",
          "error"),
        C("sample/vae-for-pixel-model", g, SAMPLE + " --vae {A}/vae", "error"),
        C("sample/latent-model-no-vae", g, SAMPLE.replace("dense.safetensors", "latent.safetensors"), "error"),
        C("sample/vae-none-without-npz", g, SAMPLE + " --vae none", "error"),
        C("sample/sparse-grid-on-ours", g, flex_sample + " --sparse-grid 4", "error"),
        C("sample/density-on-dense", g, SAMPLE + " --density 0.5,0.6", "error"),
        C("sample/classes-and-num", g, SAMPLE + " --classes 1,2", "error"),
        C("convert/density-with-layout-dense", g, CONVERT + " --layout dense --density 0.5,0.6", "error"),
        C("convert/flexdit-to-other-layout", g, "convert {A}/flex.safetensors {W}/o.safetensors --layout "
          "pool,gen,recover,dense", "error"),
        C("info/sparse-grid-on-ours", g, "info {A}/flex.safetensors --sparse-grid 4", "error"),
        C("train/init-and-model", g, TRAIN_INIT + " --model DiT-S/2", "error"),
        C("train/init-and-hidden-size", g, TRAIN_INIT + " --hidden-size 64", "error"),
        C("train/dense-with-density", g, TRAIN_INIT + " --density 0.5,0.6", "error"),
        C("train/mix-intervals-dense", g, TRAIN + " --mix-intervals", "error"),
        C("train/distill-without-teacher", g, TRAIN + " --distill 2", "error"),
        C("train/vae-with-fashion-mnist", g, TRAIN + " --vae {A}/vae", "error"),
        C("train/flip-unflipped-latents", g, TRAIN.replace("{A}/fm", "{A}/latents") + " --flip", "error"),
        C("train/fp16-on-cpu", g, TRAIN + " --dtype fp16", "error"),
        C("eval/inception-path-with-fmnist", g, EVAL + " --inception {A}/file.txt", "error"),
        C("eval/inception-without-weights", g, "eval {A}/e/s.npz {A}/e/r.npz --device cpu", "error"),
        C("eval/inception-bad-weights", g, "eval {A}/e/s.npz {A}/e/r.npz --device cpu --inception {A}/random.pt",
          "error"),
        C("eval/inception-pickle-code", g, "eval {A}/e/s.npz {A}/e/r.npz --device cpu --inception {W}/evil.pt",
          "error", setup=pickle_payload("evil.pt", True), invariant=no_marker),
        C("demo/swapped-pair", g, "demo --dense {A}/flex32.safetensors --flexdit {A}/dense32.safetensors "
          "--out {W}/demo.png --per-class 1 --steps 2 --repeats 1 --dtype fp32", "error"),
        C("top/no-command", g, "", "error"),
        C("top/unknown-command", g, "frobnicate", "error"),
        C("sample/no-ckpt", g, "sample --steps 2", "error"),
    ]


def output_cases() -> list[Case]:
    g = "output"
    return [
        C("sample/out-is-dir", g, SAMPLE.replace("{W}/s.png", "{W}/d.png"), "error", setup=folder("d.png")),
        C("sample/out-through-file", g, SAMPLE.replace("{W}/s.png", "{W}/file.txt/s.png"), "error",
          setup=plain_file()),
        C("sample/out-in-proc", g, SAMPLE.replace("{W}/s.png", "/proc/flexdit-x.png"), "error"),
        C("sample/out-jpg", g, SAMPLE.replace("{W}/s.png", "{W}/s.jpg"), "either", check=image_file("s.jpg")),
        C("sample/out-empty", g, split(SAMPLE.replace(" --out {W}/s.png", "")) + ["--out", ""], "error"),
        C("sample/npz-empty", g, split(SAMPLE) + ["--npz", ""], "error"),
        C("sample/npz-is-dir", g, SAMPLE + " --npz {W}/d.npz", "error", setup=folder("d.npz")),
        C("sample/out-new-folders", g, SAMPLE.replace("{W}/s.png", "{W}/new/sub/s.png"), "ok",
          check=image_file("new/sub/s.png")),
        C("sample/out-uppercase-png", g, SAMPLE.replace("{W}/s.png", "{W}/s.PNG"), "ok", check=image_file("s.PNG")),
        C("sample/png-with-vae-none", g, SAMPLE.replace("dense.safetensors", "latent.safetensors")
          + " --vae none --npz {W}/l.npz", "error"),
        C("convert/dst-is-dir", g, CONVERT.replace("{W}/o.safetensors", "{W}/d.safetensors"), "error",
          setup=folder("d.safetensors")),
        C("convert/dst-through-file", g, CONVERT.replace("{W}/o.safetensors", "{W}/file.txt/o.safetensors"), "error",
          setup=plain_file()),
        C("convert/dst-in-proc", g, CONVERT.replace("{W}/o.safetensors", "/proc/flexdit-x.safetensors"), "error"),
        C("convert/dst-named-out", g, CONVERT.replace("{W}/o.safetensors", "{W}/out"), "either", check=loads("out")),
        C("convert/dst-uppercase", g, CONVERT.replace("{W}/o.safetensors", "{W}/X.SAFETENSORS"), "ok",
          check=loads("X.SAFETENSORS", "FlexDiT")),
        C("convert/dst-pt", g, CONVERT.replace("{W}/o.safetensors", "{W}/o.pt"), "either", check=loads("o.pt")),
        C("convert/dst-empty", g, split(CONVERT.replace(" {W}/o.safetensors", "")) + [""], "error"),
        C("train/out-is-file", g, TRAIN.replace("{W}/run", "{W}/file.txt"), "error", setup=plain_file()),
        C("train/out-through-file", g, TRAIN.replace("{W}/run", "{W}/file.txt/run"), "error", setup=plain_file()),
        C("train/out-in-proc", g, TRAIN.replace("{W}/run", "/proc/flexdit-run"), "error"),
        C("train/out-empty", g, split(TRAIN.replace(" --out {W}/run", "")) + ["--out", ""], "error"),
        C("extract-latents/out-is-file", g, EXTRACT.replace("{W}/lat", "{W}/file.txt"), "error", setup=plain_file()),
        C("extract-latents/out-through-file", g, EXTRACT.replace("{W}/lat", "{W}/file.txt/lat"), "error",
          setup=plain_file()),
        C("extract-latents/out-in-proc", g, EXTRACT.replace("{W}/lat", "/proc/flexdit-lat"), "error"),
        C("eval/json-is-dir", g, EVAL + " {W}/d.json", "error", setup=folder("d.json")),
        C("eval/json-in-proc", g, EVAL + " /proc/flexdit-x.json", "error"),
        C("eval/json-through-file", g, EVAL + " {W}/file.txt/o.json", "error", setup=plain_file()),
        C("eval/json-file", g, EVAL + " {W}/o.json", "ok", check=written("o.json")),
        C("demo/out-is-dir", g, DEMO.replace("{W}/demo.png", "{W}/d.png"), "error", setup=folder("d.png")),
        C("demo/out-in-proc", g, DEMO.replace("{W}/demo.png", "/proc/flexdit-demo.png"), "error"),
        C("demo/out-through-file", g, DEMO.replace("{W}/demo.png", "{W}/file.txt/demo.png"), "error",
          setup=plain_file()),
        C("demo/out-jpg", g, DEMO.replace("{W}/demo.png", "{W}/demo.jpg"), "error"),
        C("demo/out-uppercase-png", g, DEMO.replace("{W}/demo.png", "{W}/demo.PNG"), "ok",
          check=image_file("demo.PNG")),
    ]


def first_run(base: str = TRAIN_FLEX) -> Callable[[Ctx], None]:
    def setup(ctx):
        ctx.flexdit(base)
    return setup


def resume_cases() -> list[Case]:
    """A 2-step FlexDiT run in {W}/run, then --resume with the same or changed settings."""
    g = "resume"
    base, again = first_run(), TRAIN_FLEX + " --resume"

    def damaged(how: str) -> Callable[[Ctx], None]:
        def setup(ctx):
            base(ctx)
            latest = sorted((ctx.w("run") / "checkpoints").glob("step-*.pt"))[-1]
            if how == "truncate":
                latest.write_bytes(latest.read_bytes()[:1000])
            else:
                latest.unlink()
                pickle_payload(f"run/checkpoints/{latest.name}", True)(ctx)
        return setup

    table = [  # (name, extra flags, expect, check)
        ("same-settings", "--steps 3", "ok", trained(3)),
        ("changed-lr", "--steps 3 --lr 2e-4", "ok", trained(3)),
        ("changed-ema", "--steps 3 --ema 0.5", "ok", trained(3)),
        ("changed-batch", "--steps 3 --batch 8", "ok", trained(3)),
        ("changed-dtype", "--steps 3 --dtype bf16", "ok", trained(3)),
        ("added-flip", "--steps 3 --flip", "ok", trained(3)),
        ("fewer-steps-than-done", "--steps 1", "either", written("run/ema.safetensors")),
        ("changed-seed", "--steps 3 --seed 1", "error", None),
        ("changed-density", "--steps 3 --density 0.5,0.7", "error", None),
        ("changed-intervals", "--steps 3 --intervals 4", "error", None),
        ("changed-layout", "--steps 3 --layout pool,gen,recover,dense", "error", None),
        ("changed-model", "--steps 3 --model DiT-B/2", "error", None),
        ("changed-hidden-size", "--steps 3 --hidden-size 64", "error", None),
        ("added-mix-intervals", "--steps 3 --mix-intervals", "error", None),
        ("switched-to-cosine", "--steps 3 --lr-schedule cosine", "either", trained(3)),
        ("data-of-other-shape", "--steps 3 --data {A}/latents", "error", None),
        ("data-of-other-channels", "--steps 3 --data {A}/imgs --image-size 32", "error", None),
        ("changed-label-dropout", "--steps 3 --label-dropout 0.5", "either", trained(3)),
    ]
    cases = [C(f"train/resume-{name}", g, again + " " + extra, expect, setup=base, check=check)
             for name, extra, expect, check in table]
    cases += [
        C("train/resume-nothing-to-resume", g, again, "ok", check=trained(2)),
        C("train/restart-without-resume", g, TRAIN_FLEX, "error", setup=base),
        C("train/resume-truncated-latest", g, again + " --steps 3", "either", setup=damaged("truncate"),
          check=trained(3)),
        C("train/resume-pickle-code", g, again + " --steps 3", "error", setup=damaged("pickle"), invariant=no_marker),
        C("train/resume-over-other-kind-of-run", g, TRAIN + " --resume --steps 3", "error", setup=base),
    ]
    return cases


def data_cases() -> list[Case]:
    """Training data, image folders and VAE folders that are missing, empty or broken."""
    g = "bad data"
    fm = lambda name: TRAIN.replace("{A}/fm", "{A}/" + name)  # noqa: E731
    imgs = lambda name: TRAIN.replace("{A}/fm", "{A}/" + name) + " --image-size 16"  # noqa: E731
    cases = [
        C("train/data-missing", g, fm("missing"), "error"),
        C("train/data-is-file", g, fm("file.txt"), "error"),
        C("train/data-dev-zero", g, TRAIN.replace("{A}/fm", "/dev/zero"), "error"),
        C("train/data-empty-dir", g, fm("emptydir"), "error"),
        C("train/fm-truncated", g, fm("fm_trunc"), "error"),
        C("train/fm-label-12", g, fm("fm_label"), "error"),
        C("train/fm-zero-images", g, fm("fm_zero_images"), "error"),
        C("train/fm-empty-files", g, fm("fm_empty"), "error"),
        C("train/fm-garbage-gz", g, fm("fm_garbage"), "error"),
        C("train/fm-images-dev-zero", g, fm("fm_zero"), "error", timeout=40.0),
        C("train/fm-images-fifo", g, fm("fm_fifo"), "error", timeout=FIFO_TIMEOUT),
        C("train/images-corrupt", g, imgs("imgs_corrupt"), "error"),
        C("train/images-empty-class", g, imgs("imgs_empty_class"), "error"),
        C("train/images-no-image-size", g, fm("imgs"), "error"),
        C("train/images-bad-vae", g, imgs("imgs") + " --vae {A}/vae_bad", "error"),
        C("train/latents-bad-meta", g, fm("latents_badmeta"), "error"),
        C("train/latents-count-lies", g, fm("latents_lie"), "error"),
        C("train/latents-no-shards", g, fm("latents_noshards"), "error"),
        C("train/latents-nan", g, fm("latents_nan"), "error"),
        C("train/latents-truncated-shard", g, fm("latents_trunc"), "error"),
        C("train/latents-other-image-size", g, fm("latents") + " --image-size 32", "error"),
        C("extract-latents/images-missing", g, EXTRACT.replace("{A}/imgs", "{A}/missing"), "error"),
        C("extract-latents/images-file", g, EXTRACT.replace("{A}/imgs", "{A}/file.txt"), "error"),
        C("extract-latents/images-empty", g, EXTRACT.replace("{A}/imgs", "{A}/emptydir"), "error"),
        C("extract-latents/images-fashion-mnist", g, EXTRACT.replace("{A}/imgs", "{A}/fm"), "error"),
        C("extract-latents/images-corrupt", g, EXTRACT.replace("{A}/imgs", "{A}/imgs_corrupt"), "error"),
        C("extract-latents/vae-missing", g, EXTRACT.replace("{A}/vae", "{A}/missing"), "error"),
        C("extract-latents/vae-bad-config", g, EXTRACT.replace("{A}/vae", "{A}/vae_bad"), "error"),
        C("extract-latents/vae-no-weights", g, EXTRACT.replace("{A}/vae", "{A}/vae_noweights"), "error"),
        C("extract-latents/vae-is-file", g, EXTRACT.replace("{A}/vae", "{A}/file.txt"), "error"),
        C("extract-latents/out-not-empty", g, EXTRACT, "error", setup=chain(folder("lat"), plain_file("lat/keep.txt")),
          invariant=lambda ctx, res: None if ctx.w("lat/keep.txt").is_file() else "a file in --out was removed"),
        C("sample/vae-bad-config", g, SAMPLE.replace("dense.safetensors", "latent.safetensors")
          + " --vae {A}/vae_bad", "error"),
        C("sample/vae-no-weights", g, SAMPLE.replace("dense.safetensors", "latent.safetensors")
          + " --vae {A}/vae_noweights", "error"),
    ]
    return cases


def eval_npz_cases() -> list[Case]:
    g = "eval npz"
    bad_samples = {  # file under {A}/e -> expectation as the samples batch
        "object.npz": "error", "trunc.npz": "error", "crc.npz": "error", "lie_big.npz": "error",
        "lie_short.npz": "error", "garbage_member.npz": "error", "labels_out.npz": "error", "labels_neg.npz": "error",
        "labels_float.npz": "error", "labels_short.npz": "error", "float.npz": "error", "bool.npz": "error",
        "3d.npz": "error", "nokeys.npz": "error", "one.npz": "error", "zero.npz": "error", "rgb.npz": "error",
        "big.npz": "error", "empty.npz": "error", "random.npz": "error", "plain.npy": "error", "fifo.npz": "error",
        "r32.npz": "error",  # 32 px samples against the 28 px reference
    }
    cases = [C(f"eval/samples-{name}", g, EVAL.replace("{A}/e/s.npz", "{A}/e/" + name), expect,
               timeout=FIFO_TIMEOUT if "fifo" in name else 60.0)
             for name, expect in bad_samples.items()]
    for name in ("stats_nan.npz", "stats_inf.npz", "stats_negdef.npz", "stats_shape.npz", "stats_mu_only.npz",
                 "object.npz", "lie_big.npz", "crc.npz"):
        cases.append(C(f"eval/reference-{name}", g, EVAL.replace("{A}/e/r.npz", "{A}/e/" + name), "error"))
    cases += [
        C("eval/samples-missing", g, EVAL.replace("{A}/e/s.npz", "{A}/e/missing.npz"), "error"),
        C("eval/samples-dir", g, EVAL.replace("{A}/e/s.npz", "{A}/emptydir"), "error"),
        C("eval/samples-dev-zero", g, EVAL.replace("{A}/e/s.npz", "/dev/zero"), "error"),
        C("eval/samples-32px-both", g, "eval {A}/e/r32.npz {A}/e/r32.npz --features fmnist --device cpu --json",
          "ok", check=json_stdout(zero_fid)),
    ]
    return cases


def pipe_cases() -> list[Case]:
    """Standard output is a pipe whose reader has gone (`flexdit ... | head -1` once head has its line):
    no traceback, no 'Exception ignored', and the files are still written."""
    g = "pipe"
    table = [
        ("top/help", "--help", None),
        ("info/help", "info --help", None),
        ("info/table", "info {A}/dense.safetensors", None),
        ("info/json", "info {A}/flex.safetensors --json", None),
        ("flops/table", FLOPS + " --density 0.5,0.6", None),
        ("flops/json", FLOPS + " --json", None),
        ("convert/table", CONVERT, loads("o.safetensors")),
        ("convert/json", CONVERT + " --json", loads("o.safetensors")),
        ("sample/png", SAMPLE, image_file("s.png")),
        ("eval/json", EVAL, None),
        ("eval/table", EVAL.replace(" --json", ""), None),
        ("bench/json", BENCH, None),
        ("extract-latents", EXTRACT, written("lat/meta.json")),
        ("train", TRAIN, trained(2)),
        ("demo", DEMO, image_file("demo.png")),
    ]
    return [C(f"{name}-to-closed-pipe", g, argv, "ok", check=check, stdout="closed") for name, argv, check in table]


CASE_GROUPS = (baseline_cases, bad_file_cases, same_path_cases, number_cases, inconsistent_cases, output_cases,
               resume_cases, data_cases, eval_npz_cases, pipe_cases)


def all_cases() -> list[Case]:
    cases = [case for group in CASE_GROUPS for case in group()]
    names = Counter(c.name for c in cases)
    duplicated = [n for n, k in names.items() if k > 1]
    if duplicated:
        raise SystemExit(f"duplicate case names: {duplicated}")
    return cases


# --- report ---------------------------------------------------------------------------------------------
def counts_by_group(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        table[o.group][o.outcome] += 1
    return {group: dict(c) for group, c in table.items()}


def print_report(outcomes: list[Outcome]) -> None:
    table = counts_by_group(outcomes)
    columns = [o for o in OUTCOMES if any(o in row for row in table.values())]
    width = max(len(g) for g in [*table, "total"])
    print(f"\n{'class':<{width}} " + " ".join(f"{c:>{max(len(c), 5)}}" for c in columns) + f" {'cases':>6}")
    total = Counter()
    for group, row in table.items():
        total.update(row)
        print(f"{group:<{width}} " + " ".join(f"{row.get(c, 0):>{max(len(c), 5)}}" for c in columns)
              + f" {sum(row.values()):>6}")
    print(f"{'total':<{width}} " + " ".join(f"{total.get(c, 0):>{max(len(c), 5)}}" for c in columns)
          + f" {sum(total.values()):>6}")
    bad = [o for o in outcomes if o.outcome in NOT_CLEAN]
    if bad:
        print(f"\nnot clean ({len(bad)}):")
        for o in sorted(bad, key=lambda o: (NOT_CLEAN.index(o.outcome), o.name)):
            print(f"  {o.outcome:<13} {o.name:<45} {o.detail[:150]}")


def write_json(path: str, outcomes: list[Outcome], args, seconds: float) -> None:
    report = {"root": args.root, "python": args.python, "seconds": round(seconds, 1),
              "counts": counts_by_group(outcomes), "totals": dict(Counter(o.outcome for o in outcomes)),
              "cases": [asdict(o) for o in outcomes]}
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", help="a flexdit source tree to run (PYTHONPATH=ROOT); default: the installed flexdit")
    p.add_argument("--python", default="/work/main/.venv/bin/python", help="the interpreter that runs flexdit")
    p.add_argument("--only", help="run the cases whose name or class contains this substring")
    p.add_argument("--jobs", type=int, default=1, help="cases run at the same time")
    p.add_argument("--json", metavar="OUT", help="write per-case results and counts here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (assets and case folders)")
    p.add_argument("--list", action="store_true", help="list the cases (name, class, expectation) and exit")
    args = p.parse_args()
    if args.root:
        sys.path.insert(0, str(Path(args.root).resolve()))  # fixtures and checks use the same flexdit
    import flexdit

    cases = [c for c in all_cases() if not args.only or args.only in c.name or args.only in c.group]
    if args.list:
        for c in cases:
            print(f"{c.name:<50} {c.group:<13} {c.expect:<7} {' '.join(map(shlex.quote, c.argv))}")
        print(f"{len(cases)} cases")
        return
    tmp = Path(tempfile.mkdtemp(prefix="flexdit-bad-inputs-"))
    print(f"flexdit from {Path(flexdit.__file__).parent}; {len(cases)} cases; files in {tmp}", flush=True)
    start = time.perf_counter()
    build_assets(tmp / "assets")
    (tmp / "home").mkdir()
    runner = Runner(args.python, args.root, tmp / "home")
    outcomes: list[Outcome] = []

    def one(indexed: tuple[int, Case]) -> Outcome:
        o = run_case(*indexed, tmp / "assets", tmp / "cases", runner)
        print(f"[{len(outcomes) + 1:>3}/{len(cases)}] {o.outcome:<13} {o.name:<45} {o.seconds:6.1f} s", flush=True)
        outcomes.append(o)
        return o

    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(one, enumerate(cases)))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_report(done)
    if args.json:
        write_json(args.json, done, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
