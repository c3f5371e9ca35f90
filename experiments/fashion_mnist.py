"""FlexDiT vs DiT on Fashion-MNIST, end to end, one command:

    python -m experiments.fashion_mnist --data ../shared/data/fashion-mnist

1. trains a dense class-conditional DiT in pixel space (1x32x32, patch 2: 256 tokens, as DiT-XL/2 at
   256 px), depth 12: room for a FlexDiT layout with a Poolingformer at the bottom, two SDTMs, and the
   second SDTM's dense block on top (--layout; its default keeps layer 1 dense, see below);
2. converts it to a FlexDiT with a temporal density schedule and fine-tunes it for --finetune-fraction of
   the dense steps, every batch covering all timestep intervals; the converted model is evaluated too;
   once per --finetune-seeds seed (the first seed's run is OUT/flexdit, the others OUT/flexdit-seedS);
3. fine-tunes, for the same steps, a FlexDiT at one fixed grid (no temporal schedule; the paper's ablation),
   the grid whose FLOPs come closest to the scheduled model's average, so both spend about the same compute;
4. at every --cfg guidance scale (default: unguided and the paper's 1.5), samples --num-samples images from
   every model with the same sampler, steps, labels and seeds, and scores them against the 10,000 test images
   with the project's Fashion-MNIST classifier (FID-FM, class accuracy, precision, recall); measures GFLOPs and
   images/s side by side;
5. writes OUT/results.json, OUT/results.md (the README's tables, one per guidance scale), a plot of FID-FM
   against GFLOPs and one PNG grid of samples per model and scale, and copies them and the training logs to
   --results.

Every stage resumes: training from its last checkpoint, sampling from its last finished chunk, and stages
already done are skipped, so the command can be stopped and run again at any time. What is reused must be what
the settings ask for: a training run records its settings and the fingerprint of the weights it starts from
(a changed setting is an error naming the folder), and sample files are named by the fingerprint of the
weights that made them and by the sampling settings.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import platform
import shutil
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from flexdit.checkpoints import load
from flexdit.cpu import tune_for_cpu_inference
from flexdit.distributed import DTYPES, describe_device, resolve_device, resolve_dtype
from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write
from flexdit.measure.bench import time_sampling
from flexdit.measure.evaluate import evaluate
from flexdit.measure.flops import flops_report, grid_name, model_macs
from flexdit.models.dit import DiT
from flexdit.models.layout import Layout
from flexdit.sampling import decode, image_grid, plan, sample
from flexdit.schedule import parse_density
from flexdit.training.data import FASHION_MNIST_CLASS_NAMES, open_dataset
from flexdit.training.trainer import TrainArgs, latest_checkpoint, train

CLASS_NAMES = FASHION_MNIST_CLASS_NAMES
MIN_SAMPLES = 4  # the evaluator's minimum (3 nearest neighbours + 1)
# training arguments that are not part of a run's identity: they do not change the weights, or (steps) a run
# may be extended, and more steps than asked for is refused on its own
NOT_IDENTITY = ("out", "resume", "device", "ckpt_every", "log_every", "keep", "steps")
TRAIN_DEFAULTS = {name: f.default for name, f in TrainArgs.__dataclass_fields__.items()}
METRICS = ("fid", "class_accuracy", "precision", "recall")  # fid: FID-FM, the Frechet distance on classifier features
MODELS = ("dense", "converted", "flexdit", "flexdit-fixed")
DESCRIPTIONS = {
    "dense": "dense DiT",
    "converted": "FlexDiT, converted, not fine-tuned",
    "flexdit": "FlexDiT, fine-tuned, temporal schedule",
    "flexdit-fixed": "FlexDiT, fine-tuned, fixed grid",
}


@dataclass
class Settings:
    data: str
    out: str = "runs/fashion-mnist"
    results: str = "results"
    # the dense model
    hidden_size: int = 96
    depth: int = 12
    num_heads: int = 3
    dense_steps: int = 10000
    batch: int = 64
    dense_lr: float = 1e-3
    dense_lr_warmup: int = 500
    dense_ema: float = 0.9995
    dense_ema_warmup: bool = True
    # the FlexDiTs
    density: str = "0.61,0.86"
    # layer 1 stays dense: as a Poolingformer it costs this model most of its fidelity (results/fashion_mnist/
    # gap_probes.md, section 8); 43.5% fewer FLOPs instead of the depth-12 default 2+2x1-2-1-1+0's 48%
    layout: str = "pool,dense,gen,sparse,sparse,recover,dense,gen,sparse,sparse,recover,dense"
    finetune_fraction: float = 0.15
    # cosine decay to 0 from the dense run's learning rate: the same mean rate as a constant 1e-4, and still weights
    # at the end instead of ones that swing from checkpoint to checkpoint (gap_probes.md, sections 9-10)
    finetune_lr: float = 2e-4
    finetune_lr_schedule: str = "cosine"
    finetune_ema: float = 0.995  # time constant 200 steps: the EMA forgets the converted start within the run
    # the temporal fine-tune's every batch covers all 4 timestep intervals (flexdit train --mix-intervals); one
    # process otherwise trains one interval per step, which costs this model ~10% FID-FM (gap_probes.md, section 9)
    finetune_mix_intervals: bool = True
    finetune_distill: float = 0.0  # > 0: also match the dense model's predictions, with this weight (--teacher)
    # one temporal fine-tune per seed (its batches and noise); the fixed-grid ablation uses the first
    finetune_seeds: list[int] = field(default_factory=lambda: [0, 1])
    # evaluation
    num_samples: int = 5000
    sampler: str = "ddim"
    steps: int = 25
    # every model is scored at each guidance scale: unguided (1.0), and 1.5 as the paper's protocol
    cfg: list[float] = field(default_factory=lambda: [1.0, 1.5])
    sample_batch: int = 250
    speed_batch: int = 50
    speed_repeats: int = 3
    # everywhere
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # bf16 where the CPU or GPU runs it natively, else fp32
    cpu_tuning: bool = True  # sampling on the CPU as `flexdit sample` does it (flexdit.cpu; 1.25x for these models)
    ckpt_every: int = 200
    log_every: int = 50
    models: list[str] = field(default_factory=lambda: list(MODELS))
    # which weights of the dense run to evaluate (and fine-tune from): "model" (raw) or "ema" (with its warm-up the
    # EMA no longer holds the random initialisation, docs/fashion_mnist.md)
    weights: str = "ema"
    # the fine-tunes' EMA (0.995: the last ~200 steps, started from the dense weights): their raw weights swing from
    # checkpoint to checkpoint (results/fashion_mnist/gap_probes.md, section 9)
    finetune_weights: str = "ema"
    ship: str = ""  # a folder (flexdit/weights) for bfloat16 copies of the dense and fine-tuned FlexDiT weights

    @property
    def run_dtype(self) -> str:
        """The dtype sampling and evaluation run in (--dtype auto resolved for this machine)."""
        return resolve_dtype(self.dtype, resolve_device(self.device))

    @property
    def finetune_steps(self) -> int:
        return max(1, math.floor(self.finetune_fraction * self.dense_steps))


# --- training ---------------------------------------------------------------------------------------------
def fingerprint(model: DiT) -> str:
    """12 hex digits of a hash of the model's config and weights."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def describe(name: str) -> str:
    """A run's description: its kind's, and the seed of a further fine-tune (flexdit-seed1)."""
    kind, _, seed = name.partition("-seed")
    return DESCRIPTIONS[kind] + (f", seed {seed}" if seed else "")


def finetune_names(s: Settings) -> dict[str, int]:
    """The temporal fine-tunes' run names and seeds: OUT/flexdit for the first seed, OUT/flexdit-seedS after it."""
    return {("flexdit" if k == 0 else f"flexdit-seed{seed}"): seed for k, seed in enumerate(s.finetune_seeds)}


def _train(s: Settings, name: str, steps: int, weights: str, start: str | None = None, seed: int | None = None,
           **kw) -> Path:
    """Train (or resume, or reuse if finished) the run OUT/name; returns the path of its `weights` (the raw
    ones, "model", or the EMA). `start` is the fingerprint of the weights it starts from (None: from scratch);
    `seed` the run's (default: --seed)."""
    out = Path(s.out) / name
    ema = out / "ema.safetensors"
    args = TrainArgs(data=s.data, out=str(out), steps=steps, batch=s.batch, dtype=s.dtype,
                     seed=s.seed if seed is None else seed,
                     device=s.device, ckpt_every=s.ckpt_every, log_every=s.log_every, resume=True, **kw)
    identity = {k: v for k, v in asdict(args).items() if k not in NOT_IDENTITY} | {"start": start}
    identity_path = out / "identity.json"
    if identity_path.exists():
        saved = json.loads(identity_path.read_text())
        # a setting a run did not record did not exist yet: that run had its default
        saved = {k: saved.get(k, TRAIN_DEFAULTS.get(k)) for k in identity.keys() | saved.keys()}
        changed = sorted(k for k in saved if identity.get(k) != saved[k])
        if changed:
            raise FlexDiTError(f"{out} was trained with other settings ({', '.join(changed)}: "
                               f"{[saved[k] for k in changed]} there, {[identity.get(k) for k in changed]} now); "
                               "delete that folder or choose another --out")
    last = latest_checkpoint(str(out))
    done = int(last.stem.split("-")[1]) if last is not None else 0
    if done > steps:
        raise FlexDiTError(f"{out} holds {done} training steps, more than the {steps} asked for; delete that "
                           "folder, choose another --out or ask for its steps")
    out.mkdir(parents=True, exist_ok=True)
    identity_path.write_text(json.dumps(identity, indent=2))
    if done < steps or not ema.exists():  # ema.safetensors is written when a run ends
        tqdm.write(f"== training {name}: {steps} steps ({describe(name)})")
        train(args)
    if weights == "ema":
        return ema
    raw = out / "model.safetensors"
    load(latest_checkpoint(str(out)), weights="model").save(str(raw))
    return raw


def train_dense(s: Settings) -> Path:
    return _train(s, "dense", s.dense_steps, s.weights, model="DiT-S/2", hidden_size=s.hidden_size, depth=s.depth,
                  num_heads=s.num_heads, lr=s.dense_lr, lr_warmup=s.dense_lr_warmup, ema=s.dense_ema,
                  ema_warmup=s.dense_ema_warmup)


def fixed_grid_like(flex: DiT, timesteps: list[int]) -> tuple[int, int]:
    """The square grid whose FLOPs come closest to flex's average over the sampler's timesteps."""
    target = flops_report(flex, timesteps).gflops * 1e9
    side = flex.token_grid[0]
    return min(((g, g) for g in range(1, side + 1)), key=lambda g: abs(model_macs(flex.config, g) - target))


def ship_weights(dense: DiT, flex: DiT, folder: Path) -> None:
    """bfloat16 copies for `flexdit demo` (half the size; the demo and the evaluation sample in bfloat16).
    A file that already holds the same weights is left alone: safetensors writes its metadata in a random order,
    so rewriting it would change the committed bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in (("dense", dense), ("flexdit", flex)):
        path = folder / f"fashion_mnist_{name}.safetensors"
        copy = deepcopy(model).to(torch.bfloat16)
        if path.exists() and fingerprint(load(str(path))) == fingerprint(copy):
            tqdm.write(f"== {path} already holds these weights; left alone")
        else:
            copy.save(str(path))
            tqdm.write(f"== wrote {path}")


# --- sampling ----------------------------------------------------------------------------------------------
def sample_labels(num_samples: int) -> list[int]:
    """Class-balanced labels: sample i is class i mod 10."""
    return [i % len(CLASS_NAMES) for i in range(num_samples)]


def sample_npz(s: Settings, name: str, model: DiT, cfg: float) -> Path:
    """OUT/samples/NAME.npz in the ADM layout (arr_0 uint8 NHWC, arr_1 labels), sampled chunk by chunk at guidance
    scale `cfg`; each chunk is kept, so a stopped run resumes at the first missing one. Sample i's noise depends
    only on (seed, i), so every model starts from the same noise and chunking changes nothing."""
    tag = f"{fingerprint(model)}-{s.sampler}{s.steps}-cfg{cfg:g}-{s.run_dtype}-seed{s.seed}-n{s.num_samples}"
    path = Path(s.out) / "samples" / f"{name}-{tag}.npz"
    if path.exists():
        return path
    chunks = path.with_suffix("")
    chunks.mkdir(parents=True, exist_ok=True)
    labels = sample_labels(s.num_samples)
    starts = range(0, s.num_samples, s.sample_batch)
    for start in tqdm(starts, desc=f"sampling {name}", unit="chunk"):
        chunk = chunks / f"{start:06d}-{s.sample_batch}.npy"
        if chunk.exists():
            continue
        end = min(start + s.sample_batch, s.num_samples)
        x = sample(model, labels[start:end], s.sampler, s.steps, cfg_scale=cfg, seed=s.seed,
                   sample_indices=list(range(start, end)), progress=True)
        images = decode(x)
        atomic_write(chunk, lambda tmp: np.save(tmp, images))
    images = np.concatenate([np.load(chunks / f"{start:06d}-{s.sample_batch}.npy") for start in starts])
    atomic_write(path, lambda tmp: np.savez(tmp, arr_0=images, arr_1=np.array(labels, dtype=np.int64)))
    shutil.rmtree(chunks)
    return path


def dataset_npz(s: Settings, split: str, n: int | None = None) -> Path:
    """The first n images (all: None) of a split and their labels in the ADM layout, padded to 32x32 as the
    models see them (the classifier pads 28x28 images the same way, so its features do not change); rebuilt on
    every run (a second), so they always come from --data."""
    data = open_dataset(s.data, split=split)
    images, labels = data.images[:n].permute(0, 2, 3, 1).numpy(), data.labels[:n].numpy()  # (N, 32, 32, 1)
    path = Path(s.out) / f"{split}-images-n{len(labels)}.npz"
    atomic_write(path, lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels))
    return path


def real_data_scores(s: Settings, reference: Path) -> dict:
    """The metrics of --num-samples real training images: what a perfect model would score at this sample size."""
    scores = evaluate(dataset_npz(s, "train", s.num_samples), reference, features="fmnist",
                      device=resolve_device(s.device))
    counts = {"num_images": scores["num_samples"], "num_reference": scores["num_reference"]}
    return counts | {k: scores[k] for k in METRICS}


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """One row per class, the first `per_class` samples of each."""
    rows = [images[labels == c][:per_class] for c in range(len(CLASS_NAMES))]
    return image_grid(np.concatenate(rows), columns=per_class)


# --- the whole experiment -----------------------------------------------------------------------------------
def build_models(s: Settings) -> tuple[dict[str, DiT], dict[str, int]]:
    """Train what is missing; return the models to evaluate and their training steps."""
    density = parse_density(s.density)
    dense_weights = train_dense(s)
    models = {"dense": load(dense_weights)}
    converted = load(dense_weights, layout=s.layout, density=density)
    timesteps = plan(s.sampler, s.steps).timesteps
    fixed = fixed_grid_like(converted, timesteps)
    steps = {"dense": s.dense_steps, "converted": 0}
    finetune = dict(init=str(dense_weights), start=fingerprint(models["dense"]), layout=s.layout,
                    lr=s.finetune_lr, lr_schedule=s.finetune_lr_schedule, ema=s.finetune_ema)
    if s.finetune_distill > 0:
        finetune |= dict(teacher=str(dense_weights), distill=s.finetune_distill)
    names = []  # the runs to evaluate, in the order of --models
    for kind in s.models:
        if kind == "converted":
            models[kind] = converted
        elif kind == "flexdit":
            for name, seed in finetune_names(s).items():
                models[name] = load(_train(s, name, s.finetune_steps, s.finetune_weights, seed=seed,
                                           density=s.density, mix_intervals=s.finetune_mix_intervals, **finetune))
                names.append(name)
            if s.ship:
                ship_weights(models["dense"], models["flexdit"], Path(s.ship))
            continue
        elif kind == "flexdit-fixed":
            models[kind] = load(_train(s, kind, s.finetune_steps, s.finetune_weights, seed=s.finetune_seeds[0],
                                       grid=grid_name(fixed), **finetune))
        names.append(kind)
    return {name: models[name] for name in names}, {name: steps.get(name, s.finetune_steps) for name in names}


def cfg_key(cfg: float) -> str:
    """The name of a guidance scale's evaluation in results.json and in file names: cfg1, cfg1.5."""
    return f"cfg{cfg:g}"


def samples_png(name: str, cfg: float) -> str:
    """samples_flexdit.png unguided, samples_flexdit_cfg1.5.png guided."""
    return f"samples_{name.replace('-', '_')}" + ("" if cfg == 1 else f"_{cfg_key(cfg)}") + ".png"


def evaluate_models(s: Settings, models: dict[str, DiT], train_steps: dict[str, int], reference: Path,
                    cfg: float) -> dict:
    """Every model sampled and scored at guidance scale `cfg`, and timed side by side: one table's rows."""
    device = resolve_device(s.device)
    timesteps = plan(s.sampler, s.steps).timesteps
    rows = {}
    for name, model in models.items():
        npz = sample_npz(s, name, model, cfg)
        report = flops_report(model, timesteps)
        scores = evaluate(npz, reference, features="fmnist", device=device)
        with np.load(npz) as f:
            grid = class_grid(f["arr_0"], f["arr_1"])
        Image.fromarray(grid[..., 0]).save(Path(s.out) / samples_png(name, cfg))
        rows[name] = {"description": describe(name), "train_steps": train_steps[name], "cfg": cfg,
                      "gflops": report.gflops, "gflops_per_grid": report.per_grid,
                      "steps_per_grid": report.steps_per_grid, **{k: scores[k] for k in METRICS}}
    tqdm.write(f"== timing sampling at cfg {cfg:g}: batch {s.speed_batch}, median of {s.speed_repeats}, "
               "models alternating")
    seconds = time_sampling(models, sample_labels(s.speed_batch), s.sampler, s.steps, cfg, repeats=s.speed_repeats,
                            progress=tqdm.write)
    for name, row in rows.items():
        row["images_per_s"] = s.speed_batch / seconds[name]
    if "dense" in rows:
        dense = rows["dense"]
        for row in rows.values():
            row["speedup"] = row["images_per_s"] / dense["images_per_s"]
            row["flops_saving"] = 1 - row["gflops"] / dense["gflops"]
            row["fid_fm_vs_dense"] = row["fid"] / dense["fid"] - 1
    return rows


def environment(device: torch.device) -> dict:
    return {"device": describe_device(device), "torch": torch.__version__, "python": platform.python_version()}


def markdown_table(rows: dict) -> str:
    head = ("| model | training steps | GFLOPs | FLOPs saved | images/s | speedup | FID-FM | vs dense | "
            "class accuracy | precision | recall |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")

    def vs_dense(row: dict, key: str, form: str) -> str:  # "n/a" when the dense model was not evaluated
        return form.format(row[key]) if key in row else "n/a"

    lines = [f"| {row['description']} | {row['train_steps']} | {row['gflops']:.3f} | "
             f"{vs_dense(row, 'flops_saving', '{:.0%}')} | {row['images_per_s']:.1f} | "
             f"{vs_dense(row, 'speedup', '{:.2f}x')} | {row['fid']:.2f} | {vs_dense(row, 'fid_fm_vs_dense', '{:+.1%}')} | "
             f"{row['class_accuracy']:.1%} | {row['precision']:.3f} | {row['recall']:.3f} |" for row in rows.values()]
    return head + "\n".join(lines) + "\n"


def results_markdown(evaluations: dict[str, dict], real: dict) -> str:
    """One table per guidance scale, each under its heading, then what real images score."""
    parts = []
    for rows in evaluations.values():
        cfg = next(iter(rows.values()))["cfg"]
        parts.append(("Unguided (cfg 1)" if cfg == 1 else f"Classifier-free guidance, cfg {cfg:g}") + "\n\n"
                     + markdown_table(rows))
    parts.append(f"For scale, {real['num_images']} real training images score FID-FM {real['fid']:.2f}, class "
                 f"accuracy {real['class_accuracy']:.1%} (the classifier was trained on them), precision "
                 f"{real['precision']:.3f} and recall {real['recall']:.3f} against the same test images.\n")
    return "\n".join(parts)


def plot(evaluations: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # a legend, not labels next to the points: models of about the same FLOPs and FID would overlap; one marker per
    # model, one colour per guidance scale
    for rows, colour in zip(evaluations.values(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        for row, marker in zip(rows.values(), "osD^v<>p"):
            ax.scatter(row["gflops"], row["fid"], s=40, marker=marker, color=colour,
                       label=f"{row['description']} (cfg {row['cfg']:g})")
    ax.legend(fontsize=7)
    ax.set_yscale("log")  # a converted model's FID can be several times the others'
    ax.set_xlabel("GFLOPs per forward pass (average over the sampler's steps)")
    ax.set_ylabel("FID-FM (log scale, lower is better)")
    ax.set_title("Fashion-MNIST: fidelity against compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: Settings) -> dict:
    for name in s.models:
        if name not in MODELS:
            raise FlexDiTError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    tqdm.write(f"sampling in {s.run_dtype}" + (" (--dtype auto)" if s.dtype == "auto" else ""))
    for name in ("weights", "finetune_weights"):
        if getattr(s, name) not in ("model", "ema"):
            raise FlexDiTError(f"--{name.replace('_', '-')} must be model or ema, got {getattr(s, name)!r}")
    for name in ("dense_steps", "batch", "sample_batch", "speed_batch", "speed_repeats", "steps"):
        if getattr(s, name) < 1:
            raise FlexDiTError(f"--{name.replace('_', '-')} must be at least 1")
    if not s.cfg or any(not c >= 1 for c in s.cfg) or len(set(s.cfg)) < len(s.cfg):
        raise FlexDiTError(f"--cfg must list distinct guidance scales of at least 1 (1: unguided), got {s.cfg}")
    if not s.finetune_seeds or len(set(s.finetune_seeds)) < len(s.finetune_seeds):
        raise FlexDiTError(f"--finetune-seeds must list distinct seeds, got {s.finetune_seeds}")
    if s.num_samples < MIN_SAMPLES:
        raise FlexDiTError(f"--num-samples must be at least {MIN_SAMPLES} (k-nearest-neighbour precision/recall); "
                           "thousands for meaningful FID-FM")
    if not Layout.parse(s.layout, s.depth).has_sparse_tokens:  # checked now, not after the dense training
        raise FlexDiTError(f"--layout {s.layout} has no sparse tokens; give a FlexDiT layout (with gen and recover)")
    if importlib.util.find_spec("matplotlib") is None:  # checked now, not after hours of training
        raise FlexDiTError("the plot needs matplotlib: pip install -e '.[experiments]'")
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    models, train_steps = build_models(s)
    device = resolve_device(s.device)
    for model in models.values():
        model.to(device, DTYPES[s.run_dtype]).eval().requires_grad_(False)
        if s.cpu_tuning:
            tune_for_cpu_inference(model, device)
    reference = dataset_npz(s, "test")
    evaluations = {cfg_key(cfg): evaluate_models(s, models, train_steps, reference, cfg) for cfg in s.cfg}
    real = real_data_scores(s, reference)
    result = {"settings": asdict(s), "finetune_steps": s.finetune_steps, "command": " ".join(sys.argv),
              "environment": environment(resolve_device(s.device)),
              "reference": f"Fashion-MNIST test set, {real['num_reference']} images",
              "features": "flexdit/measure/weights/fmnist_classifier.safetensors", "evaluations": evaluations,
              "real_data": real, "wall_seconds": time.time() - started}
    markdown = results_markdown(evaluations, real)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(markdown))
    plot(evaluations, out / "fid_vs_gflops.png")
    if s.results:
        dest = Path(s.results) / "fashion_mnist"
        dest.mkdir(parents=True, exist_ok=True)
        for f in ["results.json", "results.md", "fid_vs_gflops.png", *(p.name for p in out.glob("samples_*.png"))]:
            shutil.copy(out / f, dest / f)
        for name in train_steps:
            if (out / name / "log.jsonl").exists():
                shutil.copy(out / name / "log.jsonl", dest / f"train_log_{name.replace('-', '_')}.jsonl")
    print(markdown)
    return result


def parse_args(argv: list[str] | None = None) -> Settings:
    defaults = Settings(data="")
    p = argparse.ArgumentParser(prog="python -m experiments.fashion_mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with the Fashion-MNIST idx files (train and t10k)")
    for name, value in asdict(defaults).items():
        if name == "data":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"(default: {value})")
        elif isinstance(value, list):
            listed = ",".join(map(str, value))
            p.add_argument(flag, default=listed, help=f"comma-separated (default: {listed})")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"(default: {value})")
    args = vars(p.parse_args(argv))
    for name, value in asdict(defaults).items():
        if isinstance(value, list):
            items = [v.strip() for v in args[name].split(",") if v.strip()]
            try:
                args[name] = [type(value[0])(v) for v in items]
            except ValueError:
                p.error(f"--{name.replace('_', '-')} takes comma-separated {type(value[0]).__name__}s, "
                        f"got {args[name]!r}")
    return Settings(**args)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except FlexDiTError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
