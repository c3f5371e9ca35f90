"""`flexdit train` user errors: ranges, outputs, a resume with other settings, a non-finite loss's cause.

Each case runs the command through flexdit.cli.main and asserts exit status 2, one line without a traceback,
and the message's key words. Checks that must come before any work run with the data loader replaced by one
that fails the test, so they prove their order too."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import flexdit.training.trainer as trainer
from flexdit.cli import main
from flexdit.errors import FlexDiTError
from flexdit.sampling import MAX_SEED
from flexdit.training.trainer import TrainArgs, latest_checkpoint, train
from flexdit.vae import LATENT_SCALE

from conftest import blob_images, cli_fails, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

# the tiny model of every case: 32x32 pixels in 2x2 patches, width 32, two blocks
TINY = {"--model": "DiT-S/2", "--hidden-size": "32", "--depth": "2", "--num-heads": "2", "--steps": "2",
        "--batch": "4", "--device": "cpu", "--dtype": "fp32"}


def argv(data, out, options: dict | None = None, *extra) -> list[str]:
    """`train` with TINY overridden by `options` (value None: a flag without a value)."""
    merged = TINY | (options or {})
    flat = [str(part) for k, v in merged.items() for part in ((k,) if v is None else (k, v))]
    return ["train", "--data", str(data), "--out", str(out), *flat, *map(str, extra)]


def fails(capsys, *args) -> str:
    err = cli_fails(capsys, *args)
    assert "Traceback" not in err
    return err


def trains(capsys, *args) -> None:
    """Run a command that succeeds, and drop what it printed (progress bars) before the next one."""
    main(list(args))
    capsys.readouterr()


def write_fashion(folder: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder, "train", *blob_images(n))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fmnist"))




@pytest.fixture
def no_data_reads(monkeypatch):
    """The data must not be opened: the check under test comes first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was opened before the check")
    monkeypatch.setattr(trainer, "open_dataset", refuse)


@pytest.fixture
def quiet(monkeypatch):
    """No progress bar on stderr, so that the error is its one line."""
    class Quiet(trainer.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs | {"disable": True})
    monkeypatch.setattr(trainer, "tqdm", Quiet)


# --- ranges -------------------------------------------------------------------------------------------------
RANGE_CASES = [
    ({"--ema": "1"}, ["--ema 1.0", "out of range", "[0, 1)"]),
    ({"--ema": "-0.5"}, ["--ema -0.5", "out of range", "[0, 1)"]),
    ({"--ema": "inf"}, ["--ema inf", "finite"]),
    ({"--lr": "0"}, ["--lr 0.0", "out of range", "positive"]),
    ({"--lr": "-0.0001"}, ["--lr -0.0001", "out of range", "positive"]),
    ({"--lr": "1e39"}, ["--lr 1e+39", "out of range", "at most 1"]),  # AdamW's float32 arithmetic would overflow
    ({"--lr": "nan"}, ["--lr nan", "finite"]),
    ({"--lr": "inf"}, ["--lr inf", "finite"]),
    ({"--label-dropout": "1"}, ["--label-dropout 1.0", "out of range", "[0, 1)"]),
    ({"--label-dropout": "-0.1"}, ["--label-dropout -0.1", "out of range"]),
    ({"--weight-decay": "-0.01"}, ["--weight-decay -0.01", "at least 0"]),
    ({"--weight-decay": "1e300"}, ["--weight-decay 1e+300", "--lr 0.0001", "at most 10000"]),
    ({"--weight-decay": "nan"}, ["--weight-decay nan", "finite"]),
    ({"--distill=-inf": None}, ["--distill -inf", "finite"]),
    ({"--lr-warmup": "-1"}, ["--lr-warmup -1", "at least 0"]),
    ({"--intervals": "0"}, ["--intervals 0", "at least 1"]),
    ({"--depth": "0"}, ["--depth 0", "at least 1"]),
    ({"--num-heads": "0"}, ["--num-heads 0", "at least 1"]),
    ({"--hidden-size": "-32"}, ["--hidden-size -32", "at least 1"]),
    ({"--image-size": "0"}, ["--image-size 0", "at least 1"]),
    ({"--steps": "0"}, ["--steps 0", "at least 1"]),
    ({"--batch": "0"}, ["--batch 0", "at least 1"]),
    ({"--seed": "-1"}, ["--seed -1", "out of range"]),
    ({"--seed": str(MAX_SEED + 1)}, [f"--seed {MAX_SEED + 1}", "out of range"]),
    ({"--seed": str(2**70)}, [f"--seed {2**70}", "out of range"]),
]


@pytest.mark.parametrize("options, words", RANGE_CASES, ids=[" ".join(filter(None, *c[0].items()))
                                                               for c in RANGE_CASES])
def test_out_of_range_settings_are_refused_before_any_work(capsys, tmp_path, data, no_data_reads, options, words):
    err = fails(capsys, *argv(data, tmp_path / "run", options))
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, value, words", [("lr", 2.0, "at most 1"), ("ema", float("nan"), "finite"),
                                                 ("seed", MAX_SEED + 1, "out of range"), ("keep", 0, "at least 1")])
def test_the_library_checks_ranges_too(tmp_path, data, no_data_reads, name, value, words):
    args = TrainArgs(data=str(data), model="DiT-S/2", out=str(tmp_path / "run"), device="cpu", **{name: value})
    with pytest.raises(FlexDiTError, match=f"--{name} {value}.*{words}"):
        train(args)


def test_the_largest_seed_trains(tmp_path, data):
    """The largest seed trains: the per-step generators' seed mixes wrap instead of overflowing."""
    model = train(TrainArgs(data=str(data), model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, steps=1, batch=4,
                            seed=MAX_SEED, out=str(tmp_path / "run"), device="cpu", dtype="fp32"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- outputs ----------------------------------------------------------------------------------------------
def unwritable(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return folder / "run"
    probe.unlink()  # root ignores the mode; sysfs refuses new entries even to root
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no folder here refuses writes by this user")
    return Path("/sys/kernel/flexdit-run")


OUT_CASES = [
    ("a file", lambda tmp, data: tmp / "file", ["--out", "is a file", "give a folder"]),
    ("inside a file", lambda tmp, data: tmp / "file" / "run", ["--out", "lies inside the file", "file"]),
    ("unwritable", lambda tmp, data: unwritable(tmp), ["cannot write to --out", "choose another folder"]),
    ("inside the data", lambda tmp, data: data / "run", ["--out", "lies inside --data", "outside it"]),
]


@pytest.mark.parametrize("make_out, words", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_unusable_outputs_are_refused_before_any_work(capsys, tmp_path, data, no_data_reads, make_out, words):
    (tmp_path / "file").write_text("keep me")
    out = make_out(tmp_path, data)
    err = fails(capsys, *argv(data, out))
    for word in words:
        assert word in err, (word, err)
    assert (tmp_path / "file").read_text() == "keep me" and not (data / "run").exists()


# --- resume -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """A finished 2-step run with the TINY settings."""
    torch.set_num_threads(1)  # module fixtures come before _one_thread
    out = tmp_path_factory.mktemp("resume") / "run"
    main(argv(data, out))
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


RESUME_CASES = [
    ({"--lr": "0.001"}, "--lr 0.001 (recorded 0.0001)"),
    ({"--seed": "7"}, "--seed 7 (recorded 0)"),
    ({"--batch": "8"}, "--batch 8 (recorded 4)"),
    ({"--ema": "0.5"}, "--ema 0.5 (recorded 0.9999)"),
    ({"--ema-warmup": None}, "--ema-warmup on (recorded off)"),
    ({"--label-dropout": "0.2"}, "--label-dropout 0.2 (recorded 0.1)"),
    ({"--weight-decay": "0.01"}, "--weight-decay 0.01 (recorded 0.0)"),
    ({"--lr-warmup": "5"}, "--lr-warmup 5 (recorded 0)"),
    ({"--lr-schedule": "cosine"}, "--lr-schedule cosine (recorded constant)"),
    ({"--flip": None}, "--flip on (recorded off)"),
    ({"--depth": "3"}, "--depth 3 (recorded 2)"),
    ({"--model": "DiT-S/4"}, "--model DiT-S/4 (recorded DiT-S/2)"),
    ({"--layout": "dense"}, "--layout dense (recorded unset)"),
    ({"--density": "0.3,0.8"}, "--density 0.3,0.8 (recorded unset)"),
    ({"--grid": "2"}, "--grid 2 (recorded unset)"),
    ({"--intervals": "2"}, "--intervals 2 (recorded 4)"),
    ({"--mix-intervals": None}, "--mix-intervals on (recorded off)"),
]


@pytest.mark.parametrize("options, named", RESUME_CASES, ids=[next(iter(c[0])) for c in RESUME_CASES])
def test_resume_with_another_setting_is_refused_and_changes_nothing(capsys, run, data, no_data_reads, options,
                                                                    named):
    before = snapshot(run)
    err = fails(capsys, *argv(data, run, options), "--resume")
    assert "--resume with settings other than those recorded" in err and named in err, err
    assert snapshot(run) == before


def test_resume_names_every_differing_setting_in_one_line(capsys, run, data, tmp_path, no_data_reads):
    other = write_fashion(tmp_path / "other")
    before = (run / "train_args.json").read_bytes()
    changed = {"--lr": "0.001", "--seed": "3", "--flip": None, "--depth": "3", "--ema": "0.9"}
    allowed = {"--steps": "9", "--ckpt-every": "1", "--log-every": "1", "--keep": "5", "--dtype": "bf16"}
    err = fails(capsys, *argv(other, run, changed | allowed), "--resume")
    for named in (f"--data {other.resolve()} (recorded {data.resolve()})", "--lr 0.001 (recorded 0.0001)",
                  "--seed 3 (recorded 0)", "--flip on (recorded off)", "--depth 3 (recorded 2)",
                  "--ema 0.9 (recorded 0.9999)"):
        assert named in err, (named, err)
    for name in ("--steps", "--ckpt-every", "--log-every", "--keep", "--dtype", "--out", "--device"):
        assert f"{name} " not in err, (name, err)
    assert (run / "train_args.json").read_bytes() == before


def test_a_cosine_run_may_not_change_its_steps(capsys, tmp_path, data):
    cosine = {"--lr-schedule": "cosine", "--ckpt-every": "1"}
    trains(capsys, *argv(data, tmp_path / "run", cosine))
    err = fails(capsys, *argv(data, tmp_path / "run", cosine | {"--steps": "4"}), "--resume")
    assert "--steps 4 (recorded 2): the cosine learning-rate schedule was drawn over --steps 2" in err


def test_a_resume_keeps_the_recorded_settings_and_may_extend_the_run(capsys, tmp_path, run, data):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    recorded = (out / "train_args.json").read_bytes()
    trains(capsys, *argv(data, out, {"--steps": "3", "--ckpt-every": "1", "--log-every": "1", "--keep": "3"},
                         "--resume"))
    assert (out / "train_args.json").read_bytes() == recorded  # the first start's record, not overwritten
    assert json.loads(recorded)["steps"] == 2 and json.loads(recorded)["data"] == str(data.resolve())
    state = torch.load(latest_checkpoint(str(out)), weights_only=True)
    assert state["step"] == 3 and json.loads(state["train_args"])["steps"] == 3
    (out / "train_args.json").unlink()  # lost: a resume writes the recorded settings back, not the given ones
    trains(capsys, *argv(data, out, {"--steps": "4", "--ckpt-every": "1"}, "--resume"))
    assert json.loads((out / "train_args.json").read_text())["steps"] == 3


def test_resume_on_other_data_at_the_same_path_is_refused(capsys, tmp_path):
    data = write_fashion(tmp_path / "data", n=8)
    trains(capsys, *argv(data, tmp_path / "run"))
    write_fashion(data, n=12)  # new contents, same path
    err = fails(capsys, *argv(data, tmp_path / "run", {"--steps": "3"}), "--resume")
    assert "holds 12 samples of 1x32x32 in 10 classes" in err and "trained on 8 samples" in err


# --- a non-finite loss names its cause --------------------------------------------------------------------
def resumed_with(tmp, data, run, change) -> list[str]:
    """The finished run, its checkpoint's weights changed by change(name, tensor), resumed for a step."""
    out = tmp / "run"
    shutil.copytree(run, out)
    path = latest_checkpoint(str(out))
    state = torch.load(path, weights_only=True)
    for name, tensor in state["model"].items():
        change(name, tensor)
    torch.save(state, path)
    return argv(data, out, {"--steps": "3"}, "--resume")


def nan_weight(name, tensor):
    if name == "final_layer.linear.weight":
        tensor[0, 0] = float("nan")


def huge_final_layer(name, tensor):  # finite, but the output overflows: what a run that blew up looks like
    if name.startswith("final_layer.linear"):
        tensor.mul_(1e30)


def nan_latents(tmp, data) -> list[str]:
    """Latents of which sample 5 holds a NaN."""
    folder = tmp / "latents"
    folder.mkdir()
    latents = torch.randn(8, 4, 8, 8).half()
    latents[5, 1, 2, 3] = float("nan")
    save_file({"latents": latents, "labels": torch.arange(8) % 10}, str(folder / "latents-00000.safetensors"))
    meta = {"format": "flexdit-latents", "image_size": 64, "latent_shape": [4, 8, 8], "num_classes": 10,
            "scale": LATENT_SCALE, "vae": "none", "flip": False, "num_samples": 8}
    (folder / "meta.json").write_text(json.dumps(meta))
    return argv(folder, tmp / "run")


def diverge_after_the_first_step(monkeypatch):
    """The optimiser's first step leaves a NaN weight, as an overflowing update does."""
    step = torch.optim.AdamW.step

    def diverging(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", diverging)


NON_FINITE_CASES = [  # (name, setup(tmp, data, run, monkeypatch) -> argv, key words)
    ("loaded weights", lambda tmp, data, run, mp: resumed_with(tmp, data, run, nan_weight),
     ["loss is not finite at step 2", "weights loaded from", "step-0000002.pt", "not finite", "another checkpoint"]),
    ("diverged weights", lambda tmp, data, run, mp: diverge_after_the_first_step(mp) or argv(data, tmp / "run"),
     ["loss is not finite at step 1", "the weights are not finite", "diverged", "lower --lr"]),
    ("diverged before a checkpoint",
     lambda tmp, data, run, mp: diverge_after_the_first_step(mp) or argv(data, tmp / "run", {"--steps": "1"}),
     ["weights are not finite after step 1", "not saved", "lower --lr"]),
    ("data", lambda tmp, data, run, mp: nan_latents(tmp, data),
     ["loss is not finite at step", "the data holds NaN/inf", "sample 5 of", "latents"]),
    ("learning rate", lambda tmp, data, run, mp: resumed_with(tmp, data, run, huge_final_layer),
     ["loss is not finite at step 2", "weights and the data are finite", "learning rate is too high", "lower --lr"]),
]


@pytest.mark.parametrize("setup, words", [c[1:] for c in NON_FINITE_CASES], ids=[c[0] for c in NON_FINITE_CASES])
def test_a_non_finite_loss_names_its_likely_cause(capsys, tmp_path, data, run, quiet, monkeypatch, setup, words):
    err = fails(capsys, *setup(tmp_path, data, run, monkeypatch))
    for word in words:
        assert word in err, (word, err)
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoints/step-*.pt"))
    assert saved in ([], ["step-0000002.pt"])  # nothing past the failure, the resumed checkpoint kept
