"""Fine-tuning: exact resume, crash safety, torchrun ranks and intervals, conversion keeps knowledge, errors."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flexdit.checkpoints import dit_state_dict, load
from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.errors import FlexDiTError
from flexdit.models.from_dense import flexdit_from_dense
from flexdit.models.layout import Layout
from flexdit.schedule import DensitySchedule
from flexdit.training.trainer import TrainArgs, latest_checkpoint, train

from conftest import blob_images, tiny_model, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

FLEX_LAYOUT = "1+1x1-1-1-1+1"  # 6 blocks: pool, gen, sparse, recover, dense, dense


def write_fashion(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST-format training set of class-dependent blobs."""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder, "train", *blob_images(n, seed))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory) -> Path:
    """A tiny dense DiT for 1 x 32 x 32 pixel inputs, in the original DiT key layout."""
    model = tiny_model(Layout.dense(6), input_size=(32, 32), in_channels=1, patch_size=4)
    path = tmp_path_factory.mktemp("ckpt") / "dense.pt"
    torch.save(dit_state_dict(model), path)
    return path


@pytest.fixture(scope="module")
def wrong_size(tmp_path_factory) -> Path:
    """A dense DiT for 16 x 16 inputs: the wrong size for the data and for a 32 x 32 student."""
    path = tmp_path_factory.mktemp("ckpt") / "wrong.pt"
    torch.save(dit_state_dict(tiny_model(Layout.dense(6), input_size=(16, 16), in_channels=1)), path)
    return path




def args(data, dense_ckpt, out, **kw) -> TrainArgs:
    base = dict(data=str(data), init=str(dense_ckpt), num_heads=4, layout=FLEX_LAYOUT, density="0.3,0.8", out=str(out),
                steps=8, batch=8, lr=1e-3, ema=0.9, ckpt_every=4, log_every=2, device="cpu", seed=3)
    base.update(kw)
    return TrainArgs(**base)


def log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mix_intervals", [False, True])
def test_resume_is_exact(tmp_path, data, dense_ckpt, mix_intervals):
    straight = train(args(data, dense_ckpt, tmp_path / "a", mix_intervals=mix_intervals))
    train(args(data, dense_ckpt, tmp_path / "b", steps=4, mix_intervals=mix_intervals))
    resumed = train(args(data, dense_ckpt, tmp_path / "b", resume=True, mix_intervals=mix_intervals))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in a] == [2, 4, 6, 8]
    assert [(r["step"], r["loss"], r["grid"]) for r in a] == [(r["step"], r["loss"], r["grid"]) for r in b]
    if mix_intervals:  # every step runs all four intervals' grids (r in [0.3, 0.8] on 8x8 tokens)
        assert {r["grid"] for r in a} == {"7x7,6x6,5x5,4x4"} and {r["interval"] for r in a} == {None}
    else:  # a single process cycles through the four intervals: grids differ along the run
        assert len({r["interval"] for r in a}) > 1
    assert load(tmp_path / "a" / "ema.safetensors").config.to_dict() == straight.config.to_dict()


def test_resume_after_sigkill(tmp_path, data, dense_ckpt):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flexdit", "train", "--data", str(data), "--init", str(dense_ckpt), "--num-heads", "4",
           "--layout", FLEX_LAYOUT, "--density", "0.3,0.8", "--out", str(out), "--steps", "400", "--batch", "8",
           "--ckpt-every", "2", "--log-every", "1", "--device", "cpu", "--seed", "3", "--lr", "1e-3", "--ema", "0.9"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "checkpoints").glob("step-*.pt"))) < 2:
        time.sleep(0.05)
    time.sleep(0.3)  # let it get somewhere inside a later step or a checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait()
    names = [p.name for p in (out / "checkpoints").iterdir()]
    finished = [n for n in names if n.startswith("step-")]
    assert finished, names
    latest = latest_checkpoint(str(out))
    state = torch.load(latest, map_location="cpu", weights_only=True)  # complete, loadable
    step = state["step"]
    assert step > 0 and step < 400
    resumed = train(args(data, dense_ckpt, out, steps=step + 2, resume=True, ckpt_every=2, log_every=1))
    records = log(out)
    assert [r["step"] for r in records] == list(range(1, step + 3))  # lines after the checkpoint were dropped
    assert resumed is not None


@pytest.mark.parametrize("mix", [False, True])
def test_two_processes_draw_from_different_intervals(tmp_path, data, dense_ckpt, mix):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "flexdit", "train", "--data", str(data), "--init", str(dense_ckpt), "--num-heads", "4",
           "--layout", FLEX_LAYOUT, "--density", "0.3,0.8", "--intervals", "2", "--out", str(out), "--steps", "4",
           "--batch", "8", "--ckpt-every", "4", "--log-every", "1", "--device", "cpu", "--seed", "3"]
    result = subprocess.run(cmd + ["--mix-intervals"] * mix, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    records = log(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    if mix:  # every rank runs both intervals' grids at every step, accumulating before DDP's one all-reduce
        assert {r["interval"] for r in records} == {None} and all(r["grid"].count(",") == 1 for r in records)
    else:  # with R = K = 2, rank r always trains interval r: rank 0 logs interval 0 at every step
        assert {r["interval"] for r in records} == {0}
    assert (out / "ema.safetensors").exists()


def test_interval_assignment_per_rank():
    from flexdit.distributed import Dist
    from flexdit.training.trainer import Trainer

    def interval(rank, world, step, k=4):
        trainer = Trainer.__new__(Trainer)
        trainer.ctx, trainer.step, trainer.args = Dist(rank, world, rank), step, TrainArgs(data="")
        trainer.local_batch = 2
        trainer.intervals = type("I", (), {"num_intervals": k, "sample": lambda s, k, n, g: torch.zeros(n),
                                           "grid": lambda s, k, grid: (k, k)})()
        trainer.model = type("M", (), {"token_grid": (8, 8)})()
        [(_, _, k)] = trainer._timestep_parts(torch.Generator())
        return k

    assert [interval(r, 4, s) for s in range(3) for r in range(4)] == [0, 1, 2, 3] * 3  # the paper: rank r, interval r
    assert [interval(0, 1, s) for s in range(6)] == [0, 1, 2, 3, 0, 1]  # one process cycles
    assert {interval(r, 2, s) for s in range(4) for r in range(2)} == {0, 1, 2, 3}  # fewer ranks still cover all


def test_mixed_intervals_split_every_batch_over_all_intervals():
    from flexdit.distributed import Dist
    from flexdit.schedule import TimestepIntervals
    from flexdit.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.ctx, trainer.args, trainer.local_batch = Dist(0, 1, 0), TrainArgs(data="", mix_intervals=True), 10
    trainer.intervals = TimestepIntervals(DensitySchedule(0.3, 0.8), 4)
    trainer.model = type("M", (), {"token_grid": (16, 16)})()
    per_interval = [0] * 4
    for step in range(4):
        trainer.step = step
        parts = trainer._timestep_parts(torch.Generator().manual_seed(step))
        assert [k for _, _, k in parts] == [0, 1, 2, 3]
        assert [grid for _, grid, _ in parts] == [trainer.intervals.grid(k, (16, 16)) for k in range(4)]
        assert sum(len(t) for t, _, _ in parts) == 10
        for t, _, k in parts:
            lo, hi = trainer.intervals.bounds(k)
            assert ((t >= lo) & (t < hi)).all()
            per_interval[k] += len(t)
    assert per_interval == [10] * 4  # the remainder of 10 / 4 rotates, so no interval is favoured


def test_conversion_keeps_what_the_dense_model_knew(tmp_path, data, dense_ckpt):
    dense = train(args(data, dense_ckpt, tmp_path / "dense", layout="dense", density=None, steps=60, ema=0.0,
                       lr=2e-3, ckpt_every=60, log_every=60))
    flex, _ = flexdit_from_dense(dense, FLEX_LAYOUT, DensitySchedule(0.3, 0.8))
    untrained = tiny_model(Layout.dense(6), input_size=(32, 32), in_channels=1, patch_size=4, seed=9)
    from flexdit.training.data import open_dataset

    x, y = open_dataset(str(data)).batch(torch.arange(32))
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (32,), generator=g), torch.randn(x.shape, generator=g)
    diffusion = GaussianDiffusion()
    xt = diffusion.q_sample(x, t, noise)

    def loss(model):
        with torch.no_grad():
            return diffusion.training_losses(model.eval()(xt, t, y), x, xt, t, noise)["mse"].mean().item()

    dense_loss, flex_loss, untrained_loss = loss(dense), loss(flex), loss(untrained)
    assert flex_loss < 1.5 * dense_loss
    assert flex_loss < 0.5 * untrained_loss


def test_training_errors(tmp_path, data, dense_ckpt, wrong_size):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FlexDiTError):
        train(args(empty, dense_ckpt, tmp_path / "e1"))
    with pytest.raises(FlexDiTError, match="data's samples are 1x32x32"):
        train(args(data, wrong_size, tmp_path / "e2"))
    train(args(data, dense_ckpt, tmp_path / "r", steps=2, ckpt_every=2))
    with pytest.raises(FlexDiTError, match=r"--layout dense \(recorded 1\+1x1-1-1-1\+1\); --density unset "
                                           r"\(recorded 0.3,0.8\);"):
        train(args(data, dense_ckpt, tmp_path / "r", steps=4, layout="dense", density=None, resume=True))
    with pytest.raises(FlexDiTError, match="already holds checkpoints"):
        train(args(data, dense_ckpt, tmp_path / "r", steps=4))
    with pytest.raises(FlexDiTError, match="fewer than one batch"):
        train(args(data, dense_ckpt, tmp_path / "e3", batch=100))
    with pytest.raises(FlexDiTError, match="exactly one of"):
        train(args(data, dense_ckpt, tmp_path / "e4", model="DiT-S/2"))
    with pytest.raises(FlexDiTError, match="--mix-intervals needs a FlexDiT with a temporal"):
        train(args(data, dense_ckpt, tmp_path / "e5", density=None, grid="6", mix_intervals=True))
    with pytest.raises(FlexDiTError, match="batch of 2 into 4 intervals; use a --batch of at least 4"):
        train(args(data, dense_ckpt, tmp_path / "e6", batch=2, mix_intervals=True))


def test_distillation_pulls_the_model_towards_its_teacher(tmp_path, data, dense_ckpt):
    run = dict(steps=24, log_every=4, ckpt_every=24, ema=0.0)
    distilled = train(args(data, dense_ckpt, tmp_path / "distill", teacher=str(dense_ckpt), distill=10.0, **run))
    plain = train(args(data, dense_ckpt, tmp_path / "plain", **run))
    for r in log(tmp_path / "distill"):  # the logged loss is the diffusion loss plus the weighted distillation term
        assert r["loss"] == pytest.approx(r["mse"] + r["vb"] + 10.0 * r["distill"], rel=1e-6)
    assert "distill" not in log(tmp_path / "plain")[0]
    teacher = load(dense_ckpt, num_heads=4).eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 1000, (16,), generator=g), torch.arange(16) % 10
    with torch.no_grad():
        target = teacher(x, t, y)
        gap = {name: (m.eval()(x, t, y) - target).pow(2).mean().item() for name, m in
               (("distilled", distilled), ("plain", plain))}
    assert gap["distilled"] < 0.5 * gap["plain"], gap


def test_lr_warmup_is_linear_and_resumes_exactly(tmp_path, data, dense_ckpt):
    run = dict(lr_warmup=4, log_every=1, ckpt_every=3)
    straight = train(args(data, dense_ckpt, tmp_path / "a", **run))
    assert [r["lr"] for r in log(tmp_path / "a")] == pytest.approx([2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 5)
    train(args(data, dense_ckpt, tmp_path / "b", steps=3, **run))  # stopped inside the warm-up
    resumed = train(args(data, dense_ckpt, tmp_path / "b", resume=True, **run))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(FlexDiTError, match="--lr-warmup -1"):
        train(args(data, dense_ckpt, tmp_path / "e", lr_warmup=-1))


def test_cosine_lr_decays_to_zero_after_the_warmup_and_resumes_exactly(tmp_path, data, dense_ckpt):
    run = dict(lr_warmup=2, lr_schedule="cosine", log_every=1, ckpt_every=3, keep=3)
    straight = train(args(data, dense_ckpt, tmp_path / "a", **run))
    cosine = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]  # 6 steps after the warm-up, to 0 at step 8
    assert [r["lr"] for r in log(tmp_path / "a")] == pytest.approx([1e-3 * f for f in [0.5, 1.0] + cosine])
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)  # as if the run had died after step 3
    shutil.copy(tmp_path / "a" / "checkpoints" / "step-0000003.pt", tmp_path / "b" / "checkpoints")
    resumed = train(args(data, dense_ckpt, tmp_path / "b", resume=True, **run))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(FlexDiTError, match="cosine learning-rate schedule was drawn over --steps 8"):
        train(args(data, dense_ckpt, tmp_path / "b", resume=True, **run | dict(steps=12)))
    with pytest.raises(FlexDiTError, match="unknown --lr-schedule linear"):
        train(args(data, dense_ckpt, tmp_path / "e", lr_schedule="linear"))


def test_distillation_errors(tmp_path, data, dense_ckpt, wrong_size):
    with pytest.raises(FlexDiTError, match="--teacher .* takes 1x16x16"):
        train(args(data, dense_ckpt, tmp_path / "e1", teacher=str(wrong_size)))
    with pytest.raises(FlexDiTError, match="--distill 0"):
        train(args(data, dense_ckpt, tmp_path / "e2", teacher=str(dense_ckpt), distill=0.0))


@pytest.mark.parametrize("mix", [False, True])
def test_fsdp_two_processes_train_save_and_resume(tmp_path, data, dense_ckpt, mix):
    out = tmp_path / "fsdp"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
            "-m", "flexdit", "train", "--fsdp", "--data", str(data), "--init", str(dense_ckpt), "--num-heads", "4",
            "--layout", FLEX_LAYOUT, "--density", "0.3,0.8", "--out", str(out), "--batch", "8", "--ckpt-every", "2",
            "--log-every", "1", "--device", "cpu", "--seed", "3"] + ["--mix-intervals"] * mix
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--steps", "2"], ["--steps", "4", "--resume"]):
        result = subprocess.run(base + extra, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4]
    state = torch.load(latest_checkpoint(str(out)), map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["model"]["blocks.0.attn.v.weight"].shape == (32, 32)  # full, not a shard
    assert load(out / "ema.safetensors").layout.kinds == Layout.parse(FLEX_LAYOUT).kinds


def test_custom_size_from_scratch(tmp_path, data):
    model = train(TrainArgs(data=str(data), model="DiT-S/4", hidden_size=32, depth=3, num_heads=2, out=str(tmp_path),
                            steps=2, batch=8, ckpt_every=2, log_every=1, device="cpu"))
    c = model.config
    assert (c.hidden_size, c.depth, c.num_heads, c.patch_size, c.in_channels, c.num_classes) == (32, 3, 2, 4, 1, 10)
    assert model.layout.is_dense and c.input_size == (32, 32)
    with pytest.raises(FlexDiTError, match="--hidden-size and --depth"):
        train(TrainArgs(data=str(data), init=str(tmp_path / "ema.safetensors"), hidden_size=64, out=str(tmp_path / "x")))


def test_training_checkpoints_load_and_a_cut_log_line_is_dropped(tmp_path, data, dense_ckpt):
    out = tmp_path / "run"
    train(args(data, dense_ckpt, out, steps=4, ckpt_every=2, log_every=1))
    ckpt = latest_checkpoint(str(out))
    model = load(ckpt)  # the EMA weights with the run's config
    assert model.layout.kinds == Layout.parse(FLEX_LAYOUT).kinds
    assert torch.equal(model.blocks[0].attn.v.weight, load(out / "ema.safetensors").blocks[0].attn.v.weight)
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of a log write
    (out / "checkpoints" / ".flexdit-tmp-123-step-0000006.pt").write_bytes(b"partial")
    train(args(data, dense_ckpt, out, steps=6, ckpt_every=2, log_every=1, resume=True))
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".flexdit-tmp-*"))
