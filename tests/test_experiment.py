"""The Fashion-MNIST experiment end to end on a tiny model and data set: every stage runs, the outputs are
written, and a second run resumes instead of redoing work."""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from flexdit.checkpoints import load
from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.measure.flops import flops_report
from flexdit.models.layout import Layout
from flexdit.sampling import decode, plan, sample
from flexdit.schedule import FixedGrid
from flexdit.training.data import open_dataset

from conftest import blob_images, write_idx
from flexdit.errors import FlexDiTError
from experiments.fashion_mnist import (Settings, fingerprint, fixed_grid_like, main, markdown_table, parse_args, run,
                                       sample_labels, sample_npz, ship_weights)

RUNS = ["dense", "converted", "flexdit", "flexdit-seed1", "flexdit-fixed"]  # with the default two fine-tune seeds
SCALES = {"cfg1": 1.0, "cfg1.5": 1.5}  # the default guidance scales

# 20 samples have fewer points than the classifier has features: singular covariances are expected here
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    write_idx(folder, "train", *blob_images(32, seed=0))
    write_idx(folder, "t10k", *blob_images(20, seed=1))
    return folder


def tiny(data, out, **kw) -> Settings:
    settings = dict(data=str(data), out=str(out / "run"), results=str(out / "results"), hidden_size=32, num_heads=2,
                    dense_steps=10, batch=8, finetune_fraction=0.5, num_samples=20, sample_batch=8, steps=2,
                    speed_batch=2, speed_repeats=1, ckpt_every=5, log_every=5, dtype="fp32", device="cpu",
                    dense_lr_warmup=0)  # ten steps of a 500-step warm-up would barely move the weights
    settings.update(kw)
    return Settings(**settings)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    s = tiny(data, out, ship=str(out / "ship"))
    return s, run(s)


def test_every_model_is_trained_sampled_and_scored_at_every_scale(finished):
    s, result = finished
    assert list(result["evaluations"]) == list(SCALES)
    for key, rows in result["evaluations"].items():
        assert list(rows) == RUNS and {row["cfg"] for row in rows.values()} == {SCALES[key]}
        assert [rows[m]["train_steps"] for m in RUNS] == [10, 0, 5, 5, 5] == [10, 0, *[s.finetune_steps] * 3]
        for row in rows.values():
            assert np.isfinite(row["fid"]) and row["fid"] >= 0
            assert 0 <= row["class_accuracy"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
            assert row["images_per_s"] > 0
        dense = rows["dense"]
        assert dense["speedup"] == 1 and dense["flops_saving"] == 0
        for name in RUNS[1:]:
            assert rows[name]["gflops"] < dense["gflops"]
            assert rows[name]["fid_fm_vs_dense"] == pytest.approx(rows[name]["fid"] / dense["fid"] - 1)
        assert rows["converted"]["gflops"] == rows["flexdit"]["gflops"] == rows["flexdit-seed1"]["gflops"]
        assert len(rows["flexdit"]["gflops_per_grid"]) > 1 and len(rows["flexdit-fixed"]["gflops_per_grid"]) == 1
    unguided, guided = result["evaluations"].values()
    assert all(unguided[name]["fid"] != guided[name]["fid"] for name in RUNS)  # guidance changed every model's samples
    for name in ("flexdit", "flexdit-seed1", "flexdit-fixed"):
        assert load(Path(s.out) / name / "ema.safetensors").layout == Layout.parse(s.layout, s.depth)
    logs = {name: [json.loads(line) for line in (Path(s.out) / name / "log.jsonl").read_text().splitlines()]
            for name in ("flexdit", "flexdit-seed1", "flexdit-fixed")}
    # the two temporal fine-tunes differ by their seed only: same start, same steps, other batches and noise
    seeds = {name: json.loads((Path(s.out) / name / "identity.json").read_text())["seed"] for name in logs}
    assert seeds == {"flexdit": 0, "flexdit-seed1": 1, "flexdit-fixed": 0}
    assert [r["loss"] for r in logs["flexdit"]] != [r["loss"] for r in logs["flexdit-seed1"]]
    # the temporal fine-tune runs every interval's grid at every step (--mix-intervals); the fixed one one grid
    assert all(r["grid"].count(",") == 3 for r in logs["flexdit"])
    assert all("," not in r["grid"] for r in logs["flexdit-fixed"])
    for records in logs.values():  # the fine-tunes' cosine learning rate falls from its first step to its last
        rates = [r["lr"] for r in records]
        assert rates == sorted(rates, reverse=True) and rates[-1] < 0.5 * s.finetune_lr


def test_outputs_are_written_and_copied(finished):
    s, result = finished
    for folder in (Path(s.out), Path(s.results) / "fashion_mnist"):
        saved = json.loads((folder / "results.json").read_text())
        assert saved["evaluations"] == json.loads(json.dumps(result["evaluations"]))
        assert saved["settings"]["seed"] == 0 and saved["settings"]["sampler"] == s.sampler
        assert saved["settings"]["cfg"] == [1.0, 1.5] and saved["settings"]["finetune_seeds"] == [0, 1]
        table = (folder / "results.md").read_text()
        assert table.count("\n|") == len(SCALES) * (2 + len(RUNS)) and "For scale, 20 real training images score FID-FM" in table
        assert table.index("Unguided (cfg 1)") < table.index("Classifier-free guidance, cfg 1.5")
        assert saved["real_data"]["num_images"] == 20 and 0 <= saved["real_data"]["class_accuracy"] <= 1
        assert saved["reference"] == "Fashion-MNIST test set, 20 images"
        assert (folder / "fid_vs_gflops.png").stat().st_size > 1000
        for name in RUNS:
            for suffix in ("", "_cfg1.5"):
                assert (folder / f"samples_{name.replace('-', '_')}{suffix}.png").exists()
    logs = sorted(p.name for p in (Path(s.results) / "fashion_mnist").glob("train_log_*.jsonl"))
    assert logs == ["train_log_dense.jsonl", "train_log_flexdit.jsonl", "train_log_flexdit_fixed.jsonl",
                    "train_log_flexdit_seed1.jsonl"]
    dense = load(f"{s.out}/dense/ema.safetensors")
    with np.load(Path(s.out) / "samples" / f"dense-{fingerprint(dense)}-ddim2-cfg1-fp32-seed0-n20.npz") as f:
        assert f["arr_0"].shape == (20, 32, 32, 1) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == sample_labels(20)


def test_the_demo_pair_is_shipped_in_bfloat16(finished):
    s, _ = finished
    for name, weights in (("dense", "ema"), ("flexdit", "ema")):  # the weights the experiment evaluates
        shipped = load(f"{s.ship}/fashion_mnist_{name}.safetensors")
        trained = load(f"{s.out}/{name}/{weights}.safetensors")
        assert shipped.config == trained.config
        for a, b in zip(shipped.parameters(), trained.parameters()):
            torch.testing.assert_close(a, b.bfloat16().float(), rtol=0, atol=0)


def test_shipping_the_same_weights_again_leaves_the_files_alone(finished, tmp_path):
    s, _ = finished
    dense, flex = load(f"{s.out}/dense/ema.safetensors"), load(f"{s.out}/flexdit/ema.safetensors")
    ship_weights(dense, flex, tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]
    ship_weights(dense, flex, tmp_path)
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before
    with torch.no_grad():
        flex.final_layer.linear.bias.add_(1.0)
    ship_weights(dense, flex, tmp_path)
    assert load(str(files[1])).final_layer.linear.bias.float().equal(flex.final_layer.linear.bias.bfloat16().float())


def test_a_second_run_resumes_instead_of_redoing(finished):
    s, result = finished
    out = Path(s.out)
    watched = [out / "dense" / "checkpoints" / "step-0000010.pt", out / "flexdit" / "ema.safetensors",
               *(out / "samples").glob("*.npz")]
    assert len(watched) == 2 + len(RUNS) * len(SCALES)
    before = [p.stat().st_mtime_ns for p in watched]
    again = run(s)
    assert [p.stat().st_mtime_ns for p in watched] == before
    # the scores are recomputed from the same sample files; the BLAS may round the last bits differently per call
    for key in SCALES:
        for name in RUNS:
            assert again["evaluations"][key][name]["fid"] == pytest.approx(result["evaluations"][key][name]["fid"],
                                                                          rel=1e-6)


def test_every_model_is_evaluated_by_its_ema(finished):
    s, _ = finished
    sampled = {p.name.split("-ddim")[0] for p in (Path(s.out) / "samples").glob("*.npz")}  # NAME-FINGERPRINT
    last = load(f"{s.out}/dense/checkpoints/step-0000010.pt", weights="model")
    ema = load(f"{s.out}/dense/ema.safetensors")
    assert f"dense-{fingerprint(ema)}" in sampled and f"dense-{fingerprint(last)}" not in sampled
    for name in ("flexdit", "flexdit-seed1", "flexdit-fixed"):
        last = load(f"{s.out}/{name}/checkpoints/step-0000005.pt", weights="model")
        ema = load(f"{s.out}/{name}/ema.safetensors")
        assert f"{name}-{fingerprint(ema)}" in sampled and f"{name}-{fingerprint(last)}" not in sampled


def test_changed_settings_are_refused_not_reused(finished):
    s, _ = finished
    with pytest.raises(FlexDiTError, match=r"run/flexdit was trained with other settings \(lr"):
        run(Settings(**{**asdict(s), "finetune_lr": 3e-4}))
    with pytest.raises(FlexDiTError, match="holds 10 training steps, more than the 8 asked for"):
        run(Settings(**{**asdict(s), "dense_steps": 8}))
    with pytest.raises(FlexDiTError, match=r"run/flexdit was trained with other settings \(distill"):
        run(Settings(**{**asdict(s), "finetune_distill": 2.0}))
    with pytest.raises(FlexDiTError, match=r"run/flexdit was trained with other settings \(layout"):
        run(Settings(**{**asdict(s), "layout": "default"}))
    with pytest.raises(FlexDiTError, match=r"run/flexdit was trained with other settings \(mix_intervals"):
        run(Settings(**{**asdict(s), "finetune_mix_intervals": False}))
    with pytest.raises(FlexDiTError, match=r"run/flexdit was trained with other settings \(lr_schedule"):
        run(Settings(**{**asdict(s), "finetune_lr_schedule": "constant"}))
    with pytest.raises(FlexDiTError, match="cosine learning-rate schedule was drawn over --steps 5;"):
        run(Settings(**{**asdict(s), "finetune_fraction": 0.8}))


def test_a_run_recorded_before_an_option_existed_had_its_default(finished):
    s, _ = finished
    identity = Path(s.out) / "dense" / "identity.json"
    recorded = json.loads(identity.read_text())
    assert recorded["teacher"] is None and recorded["distill"] == 1.0
    identity.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("teacher", "distill")}))
    run(s)  # reused, not refused
    assert json.loads(identity.read_text()) == recorded


def test_fingerprint_follows_the_weights(finished):
    s, _ = finished
    model = load(f"{s.out}/flexdit/ema.safetensors")
    before = fingerprint(model)
    assert fingerprint(load(f"{s.out}/flexdit/ema.safetensors")) == before
    with torch.no_grad():
        next(model.parameters())[0].add_(1e-3)
    assert fingerprint(model) != before


def test_chunked_sampling_equals_one_batch(finished, tmp_path):
    s, _ = finished
    model = load(f"{s.out}/flexdit/ema.safetensors")
    chunked = tiny(s.data, tmp_path, num_samples=7, sample_batch=3)
    with np.load(sample_npz(chunked, "flexdit", model, 1.5)) as f:
        images = f["arr_0"]
    labels = sample_labels(7)
    direct = decode(sample(model, labels, s.sampler, s.steps, cfg_scale=1.5, seed=s.seed))
    np.testing.assert_array_equal(images, direct)


def test_fixed_grid_matches_the_average_flops(finished):
    s, _ = finished
    flex = load(f"{s.out}/flexdit/ema.safetensors")
    timesteps = plan(s.sampler, s.steps).timesteps
    fixed = fixed_grid_like(flex, timesteps)
    average = flops_report(flex, timesteps).gflops
    per_grid = {g: flops_report(flex.config, [0], density=FixedGrid(g, g)).gflops
                for g in range(1, flex.token_grid[0] + 1)}
    assert abs(per_grid[fixed[0]] - average) == min(abs(v - average) for v in per_grid.values())


def test_table_says_n_a_without_the_dense_model(finished):
    _, result = finished
    rows = {name: {k: v for k, v in row.items() if k not in ("speedup", "flops_saving", "fid_fm_vs_dense")}
            for name, row in result["evaluations"]["cfg1"].items() if name != "dense"}
    table = markdown_table(rows)
    assert table.count("n/a") == 3 * len(rows) and "1.00x" not in table


def test_arguments_and_errors(data, tmp_path, capsys):
    s = parse_args(["--data", str(data), "--models", "dense,flexdit", "--steps", "7"])
    assert s.models == ["dense", "flexdit"] and s.steps == 7 and s.cfg == Settings(data="").cfg == [1.0, 1.5]
    s = parse_args(["--data", "d", "--cfg", "1, 2.5", "--finetune-seeds", "3"])
    assert s.cfg == [1.0, 2.5] and s.finetune_seeds == [3]
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--finetune-seeds", "0,one"])
    assert "--finetune-seeds takes comma-separated ints, got '0,one'" in capsys.readouterr().err
    for flag, value, message in (("--cfg", "0.5", "--cfg must list distinct guidance scales of at least 1"),
                                 ("--cfg", "1.5,1.5", "--cfg must list distinct"),
                                 ("--finetune-seeds", "1,1", "--finetune-seeds must list distinct seeds")):
        with pytest.raises(SystemExit, match=message):
            main(["--data", str(data), "--out", str(tmp_path), flag, value])
    assert s.finetune_mix_intervals
    assert not parse_args(["--data", "d", "--no-finetune-mix-intervals"]).finetune_mix_intervals
    with pytest.raises(SystemExit, match="unknown model 'sparse'"):
        main(["--data", str(data), "--out", str(tmp_path), "--models", "dense,sparse"])
    with pytest.raises(SystemExit, match="--num-samples must be at least 4"):
        main(["--data", str(data), "--out", str(tmp_path), "--num-samples", "2"])
    with pytest.raises(SystemExit, match="--weights must be model or ema"):
        main(["--data", str(data), "--out", str(tmp_path), "--weights", "last"])
    with pytest.raises(SystemExit, match="--finetune-weights must be model or ema"):
        main(["--data", str(data), "--out", str(tmp_path), "--finetune-weights", "raw"])
    with pytest.raises(SystemExit, match="--speed-repeats must be at least 1"):
        main(["--data", str(data), "--out", str(tmp_path), "--speed-repeats", "0"])
    with pytest.raises(SystemExit, match="--layout dense has no sparse tokens"):
        main(["--data", str(data), "--out", str(tmp_path), "--layout", "dense"])
    with pytest.raises(SystemExit, match="has 2 blocks but the model has 12"):
        main(["--data", str(data), "--out", str(tmp_path), "--layout", "pool,dense"])
    with pytest.raises(SystemExit, match="data path not found"):
        main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


def test_noise_prediction_diagnostic(finished, capsys):
    from experiments.noise_prediction import main as noise_main

    s, _ = finished
    noise_main(["--data", s.data, "--timesteps", "10,900", "--num-images", "8",
                f"raw={s.out}/dense/checkpoints/step-0000010.pt#model", f"ema={s.out}/dense/ema.safetensors"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["t", "raw", "ema"] and [line.split()[0] for line in lines[1:]] == ["10", "900"]
    values = [float(v) for line in lines[1:] for v in line.split()[1:]]
    assert all(v > 0 for v in values) and values[0] != values[1]
    with pytest.raises(SystemExit, match="give NAME=CHECKPOINT"):
        noise_main(["--data", s.data, "no-name"])


def test_noise_prediction_wrong_labels(finished, capsys, tmp_path):
    """The wrong-label column is the relative rise of the model's own error, and the true-label column is unchanged."""
    from experiments.noise_prediction import main as noise_main, noise_mse

    s, _ = finished
    model = load(f"{s.out}/dense/checkpoints/step-0000010.pt", weights="model")
    with torch.no_grad():  # ten training steps barely use the label: make the class embeddings matter
        model.y_embedder.embedding_table.weight.normal_(generator=torch.Generator().manual_seed(0))
    ckpt = str(tmp_path / "labelled.safetensors")
    model.save(ckpt)
    noise_main(["--data", s.data, "--timesteps", "500", "--num-images", "16", f"m={ckpt}"])
    plain = capsys.readouterr().out.splitlines()
    noise_main(["--data", s.data, "--timesteps", "500", "--num-images", "16", "--wrong-labels", f"m={ckpt}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["t", "m", "m:wrong"]
    assert lines[1].split()[:2] == plain[1].split() and lines[1].split()[2].endswith("%")

    table = noise_mse({"m": model}, s.data, [500], 16, 0, wrong_labels=True)[500]
    # the model does depend on its label, so the wrong classes change the error
    assert table["m:wrong"] != 0
    with torch.no_grad():  # recompute the wrong-label error by hand: the column is its ratio minus one
        test = open_dataset(s.data, split="test")
        x0, y = test.batch(torch.arange(16))
        shift = torch.randint(1, 10, y.shape, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(500))
        t = torch.full((16,), 500)
        xt = GaussianDiffusion().q_sample(x0, t, noise)
        wrong = (model(xt, t, (y + shift) % 10)[:, :1] - noise).square().mean().item()
    assert torch.isclose(torch.tensor(table["m:wrong"]), torch.tensor(wrong / table["m"] - 1), rtol=1e-4)


@pytest.mark.parametrize("env, says", [({"DATA": "/nonexistent"}, "no Fashion-MNIST in /nonexistent"),
                                       ({"DEVICE": "cuda", "PYTHON": "NOGPU"}, "no CUDA GPU visible")])
def test_gpu_script_refuses_in_one_line(tmp_path, data, env, says):
    import os
    import subprocess
    import sys

    if env.get("PYTHON") == "NOGPU":
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
        env = {**env, "PYTHON": sys.executable, "DATA": str(data)}
    done = subprocess.run(["bash", "scripts/gpu_fidelity.sh"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path), **env}, cwd=Path(__file__).parents[1])
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in lines[0]
