"""Fine-tuning (or training from scratch) with the DiT hybrid loss, EMA, torchrun, exact resume.

Timestep intervals (paper Sec. 3): with a temporal schedule, the 1000 timesteps are cut into K intervals;
at step s, rank r draws t uniformly from interval (r + s * R) mod K, so with R = K ranks (the paper's
setting) rank r always trains interval r, a single process cycles through the intervals step by step,
and any R covers every interval. Each batch therefore runs at one grid.
With --mix-intervals every rank's batch covers every interval at every step instead: it is split into K
parts of (nearly) equal size, part k draws t from interval k and runs at its grid, and the gradients of the
K parts are accumulated before the one optimizer step. With fewer ranks than intervals this keeps each
step's timesteps uniform over 0..T as the paper's global batch is, at the price of K smaller forwards.

Randomness is a pure function of (seed, rank, step) and the data order of (seed, epoch), so a
checkpoint (model, EMA, optimizer, step, data position, log window) resumes to the same weights and
logged losses as a run that never stopped.
"""
import json
import math
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from flexdit.checkpoints import load_checkpoint, retarget
from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.distributed import DTYPES, Dist, init_from_env, resolve_dtype, shutdown
from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write, check_output_folder, remove_stale_temporaries
from flexdit.models.core import FlexDiTCore
from flexdit.models.dit import DiT, model_config
from flexdit.models.families import PIXART_NAMES, config_from_dict
from flexdit.models.families import build_model as build_family_model
from flexdit.models.latte import latte_config
from flexdit.schedule import NUM_TIMESTEPS, DensitySchedule, TimestepIntervals, parse_density
from flexdit.sampling import MAX_SEED
from flexdit.text import CaptionTable
from flexdit.training.data import TrainData, open_dataset
from flexdit.training.video_data import open_video_dataset

CHECKPOINT_VERSION = 1
LOGGED = ("loss", "mse", "vb", "distill")  # per-step terms averaged over each log window
LR_SCHEDULES = ("constant", "cosine")
# settings a resumed run may change: they do not change what it trains (steps: a run may be extended, unless
# its cosine learning-rate schedule was drawn over them); every other setting must be the recorded one
RESUMABLE = ("steps", "out", "device", "dtype", "ckpt_every", "log_every", "keep", "resume", "grad_checkpointing",
             "compile", "fsdp")
PATH_SETTINGS = ("data", "init", "teacher", "vae", "captions")  # recorded absolute, so a resume from another folder matches


@dataclass
class TrainArgs:
    data: str
    out: str = "runs/train"
    init: str | None = None  # a checkpoint to start from (a dense one becomes a FlexDiT unless --layout dense)
    model: str | None = None  # or a standard size, trained from scratch
    layout: str | None = None
    density: str | None = None
    grid: str | None = None
    intervals: int = 4
    mix_intervals: bool = False  # every batch covers all K intervals (K forwards); default: the paper's form
    steps: int = 1000
    batch: int = 32  # global batch, split over ranks
    lr: float = 1e-4
    lr_warmup: int = 0  # steps of linear learning-rate warm-up from 0 (the paper and DiT use none)
    lr_schedule: str = "constant"  # after the warm-up: "constant" (the paper, DiT) or "cosine" (to 0 at --steps)
    weight_decay: float = 0.0
    ema: float = 0.9999
    # the EMA's decay at step s is min(ema, (1 + s) / (10 + s)), so it averages over a tenth of the run so far
    # instead of holding the random initialisation for ~1 / (1 - ema) steps (DiT has no warm-up)
    ema_warmup: bool = False
    label_dropout: float = 0.1  # the probability of the null class (DiT) or the null caption (PixArt)
    captions: str | None = None  # a PixArt's caption table (flexdit extract-captions) for the samples of --data
    frames: int | None = None  # video data (Latte): frames per video; an npz file of videos is video data anyway
    ckpt_every: int = 500
    log_every: int = 10
    keep: int = 2  # checkpoints kept on disk
    resume: bool = False
    dtype: str = "auto"  # bf16 where the device runs it natively, else fp32 (flexdit.distributed.resolve_dtype)
    grad_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False
    flip: bool = False
    seed: int = 0
    device: str = "auto"
    num_heads: int | None = None  # --init: heads of a non-standard size; --model: custom heads
    hidden_size: int | None = None  # --model: a custom width
    depth: int | None = None  # --model: a custom depth
    image_size: int | None = None  # image folders: the size images are cropped to
    vae: str | None = None  # image folders: encode on the fly with this VAE
    teacher: str | None = None  # a checkpoint whose predictions the model also learns to match (distillation)
    distill: float = 1.0  # weight of the distillation term (with --teacher)


# --- checks before any work ---------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# (setting, the values it takes, their test); a float must also be finite, and None means "not given"
RANGES = (
    ("lr", "a positive learning rate of at most 1 (AdamW moves each weight by about --lr a step)",
     lambda v: 0 < v <= 1),
    ("ema", "an EMA decay in [0, 1), e.g. 0.9999", lambda v: 0 <= v < 1),
    ("label_dropout", "a probability in [0, 1)", lambda v: 0 <= v < 1),
    ("weight_decay", "a number of at least 0", lambda v: v >= 0),
    ("distill", "a positive weight", lambda v: v > 0),
    ("lr_warmup", "a number of at least 0", lambda v: v >= 0),
    ("seed", f"an integer in 0..{MAX_SEED}", lambda v: 0 <= v <= MAX_SEED),
    *((name, "a number of at least 1", lambda v: v >= 1) for name in
      ("steps", "batch", "intervals", "ckpt_every", "log_every", "keep", "depth", "num_heads", "hidden_size",
       "image_size", "frames")),
)


def check_args(args: TrainArgs) -> None:
    """Refuse values outside their range (NaN and inf included) before anything is read or written."""
    for name, allowed, test in RANGES:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise FlexDiTError(f"{_flag(name)} {value} is not a finite number; give {allowed}")
        if not test(value):
            raise FlexDiTError(f"{_flag(name)} {value} is out of range; give {allowed}")
    if args.lr * args.weight_decay > 1:  # AdamW multiplies the weights by 1 - lr * weight_decay each step
        raise FlexDiTError(f"--weight-decay {args.weight_decay} with --lr {args.lr} would shrink the weights by more "
                           f"than themselves each step; give a --weight-decay of at most {1 / args.lr:g}")
    if args.lr_schedule not in LR_SCHEDULES:
        raise FlexDiTError(f"unknown --lr-schedule {args.lr_schedule}; choose {' or '.join(LR_SCHEDULES)}")


def _normal_path(value: str | None) -> str | None:
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def recorded_settings(args: TrainArgs) -> dict:
    """The settings a run records (train_args.json, and in each checkpoint), paths made absolute."""
    return asdict(args) | {k: _normal_path(getattr(args, k)) for k in PATH_SETTINGS}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def resume_differences(recorded: dict, args: TrainArgs) -> list[str]:
    """Each setting of `args` that a resume of the run `recorded` may not change, with both values."""
    given, defaults = recorded_settings(args), {f.name: f.default for f in fields(TrainArgs)}
    differ = []
    for name, value in given.items():
        was = recorded.get(name, defaults[name])  # a setting a run did not record did not exist: its default
        was = _normal_path(was) if name in PATH_SETTINGS else was
        if name not in RESUMABLE and was != value:
            differ.append(f"{_flag(name)} {_shown(value)} (recorded {_shown(was)})")
    steps = recorded.get("steps")
    if recorded.get("lr_schedule") == "cosine" and steps != args.steps:
        differ.append(f"--steps {args.steps} (recorded {steps}): the cosine learning-rate schedule was drawn over "
                      f"--steps {steps}")
    return differ


def data_summary(data: TrainData) -> str:
    """What a checkpoint records of its data, so a resume on other data (same path, new contents) is refused."""
    return f"{len(data)} samples of {'x'.join(map(str, data.sample_shape))} in {data.num_classes} classes"


def _finite(tensors) -> bool:
    """Whether every value of `tensors` (this rank's shards of DTensors) is finite."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True


# --- model ----------------------------------------------------------------------------------------------
def build_model(args: TrainArgs, data: TrainData) -> FlexDiTCore:
    """The model to train, checked against the data."""
    if (args.init is None) == (args.model is None):
        raise FlexDiTError("give exactly one of --init CKPT (fine-tune) or --model NAME (from scratch)")
    if args.init and (args.hidden_size or args.depth):
        raise FlexDiTError("--hidden-size and --depth shape a model trained from scratch (--model); "
                           "--init takes its size from the checkpoint")
    density = parse_density(args.density, args.grid)
    if args.init:
        loaded = load_checkpoint(args.init, num_heads=args.num_heads)
        layout = args.layout or ("default" if loaded.model.layout.is_dense else None)
        model = retarget(loaded, layout, density).model
    else:
        if args.model in PIXART_NAMES:
            raise FlexDiTError("a PixArt is fine-tuned from a pretrained one: give --init PIXART (its .pth, diffusers "
                               "folder or our file) instead of --model")
        custom = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_heads", args.num_heads)) if v}
        if args.model.removeprefix("FlexDiT-").startswith("Latte"):
            return _latte_from_scratch(args, data, density, custom)
        C, H, W = data.sample_shape
        model = DiT(model_config(args.model, (H, W), layout=args.layout, density=density, depth=args.depth,
                                 in_channels=C, num_classes=data.num_classes, class_dropout_prob=args.label_dropout,
                                 **custom))
    config = model.config
    if tuple(model.sample_shape) != tuple(data.sample_shape):
        raise FlexDiTError(f"the data's samples are {'x'.join(map(str, data.sample_shape))} but the model takes "
                           f"{'x'.join(map(str, model.sample_shape))}; use data of the model's size (image size / "
                           "VAE / frames) or another model")
    if model.condition_kind == "class" and data.num_classes > config.num_classes:
        raise FlexDiTError(f"the data has {data.num_classes} classes but the model only {config.num_classes}")
    return model


def _latte_from_scratch(args: TrainArgs, data: TrainData, density, custom: dict) -> FlexDiTCore:
    """A class-conditional Latte of a standard (or --hidden-size/--depth/--num-heads) size for video data."""
    if len(data.sample_shape) != 4:
        raise FlexDiTError(f"{args.model} is a video model; give video data (an npz of videos, or --frames with a "
                           "folder of frame folders)")
    C, F, H, W = data.sample_shape
    config = latte_config(args.model, F, 8 * H, layout=args.layout, density=density, conditioning="class",
                          num_classes=data.num_classes, depth=args.depth, input_size=(H, W), in_channels=C,
                          class_dropout_prob=args.label_dropout, **custom)
    return build_family_model(config)


def open_captions(args: TrainArgs, model: FlexDiTCore, data: TrainData) -> CaptionTable | None:
    """The caption table of a PixArt's training data, checked against the data and the model (None for a DiT)."""
    if model.condition_kind != "caption":
        if args.captions:
            raise FlexDiTError(f"--captions conditions a text-conditional model (PixArt, Latte-1); this "
                               f"{model.condition_kind} model trains on the data's labels: drop --captions")
        return None
    if not args.captions:
        raise FlexDiTError("a text-conditional model trains on captions: give --captions TABLE, written by flexdit "
                           "extract-captions for this --data")
    table = CaptionTable.load(args.captions)
    table.check_data(len(data), data.num_classes)
    if table.channels != model.config.caption_channels:
        raise FlexDiTError(f"the caption table holds {table.channels}-channel embeddings but the model takes "
                           f"{model.config.caption_channels} (its T5); extract the captions with the model's encoder")
    if args.label_dropout > 0 and not model.config.learned_null_caption and table.null is None:
        raise FlexDiTError("caption dropout needs a null caption: this PixArt has no learned one (a diffusers "
                           "checkpoint) and the table holds no encoded empty prompt; extract the captions again")
    return table


def load_teacher(args: TrainArgs, student: FlexDiTCore, device: torch.device) -> FlexDiTCore:
    """The frozen model whose outputs the student learns to match; it must predict the same thing."""
    teacher = load_checkpoint(args.teacher, num_heads=args.num_heads).model
    a, b = teacher.config, student.config
    if (teacher.sample_shape, a.learn_sigma) != (student.sample_shape, b.learn_sigma):
        raise FlexDiTError(f"--teacher {args.teacher} takes {'x'.join(map(str, teacher.sample_shape))} (learned "
                           f"sigma: {a.learn_sigma}) but the model {'x'.join(map(str, student.sample_shape))} "
                           f"(learned sigma: {b.learn_sigma}); use the dense model it came from")
    if type(teacher) is not type(student):
        raise FlexDiTError(f"--teacher {args.teacher} is a {teacher.FAMILY} model but the model a {student.FAMILY} "
                           "one; use the dense model it came from")
    if student.condition_kind == "caption":
        if a.caption_channels != b.caption_channels:
            raise FlexDiTError(f"--teacher {args.teacher} reads {a.caption_channels}-channel captions but the model "
                               f"{b.caption_channels}; use the dense model it came from")
    elif (a.num_classes, teacher.has_null_class) != (b.num_classes, student.has_null_class):
        raise FlexDiTError(f"--teacher {args.teacher} has {a.num_classes} classes (null class: "
                           f"{teacher.has_null_class}) but the model {b.num_classes} ({student.has_null_class}); "
                           "use the dense model it came from")
    return teacher.to(device).eval().requires_grad_(False)


def timestep_plan(model: FlexDiTCore, intervals: int) -> TimestepIntervals | None:
    if model.layout.has_sparse_tokens and isinstance(model.density, DensitySchedule):
        return TimestepIntervals(model.density, intervals)
    return None


# --- checkpoints --------------------------------------------------------------------------------------------
def checkpoint_dir(out: str) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str) -> Path | None:
    files = sorted(checkpoint_dir(out).glob("step-*.pt"))
    return files[-1] if files else None


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact and nothing under a checkpoint name."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_checkpoint(path: Path) -> dict:
    try:  # memory-mapped: each rank reads the parts it copies to its device, not a whole copy in memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or foreign files raise many types
        raise FlexDiTError(f"cannot read the training checkpoint {path} ({type(e).__name__}); delete it to resume "
                           "from the one before") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise FlexDiTError(f"{path} is not a flexdit training checkpoint of version {CHECKPOINT_VERSION}")
    return state


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the run died before the next one),
    including a last line cut short by the kill."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


# --- the loop ---------------------------------------------------------------------------------------------
SEED_BITS = 2**64 - 1  # torch seeds are 64-bit: the mixes of a large --seed wrap (small ones are unchanged)


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 10_000_019 + step) & SEED_BITS)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 7_919 + epoch) & SEED_BITS))


@torch.no_grad()
def update_ema(ema: FlexDiTCore, model: FlexDiTCore, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


class Trainer:
    def __init__(self, args: TrainArgs, ctx: Dist, device: torch.device):
        self.args, self.ctx, self.device = args, ctx, device
        check_args(args)
        if args.batch % ctx.world_size:
            raise FlexDiTError(f"--batch {args.batch} is not divisible by the {ctx.world_size} processes")
        self.dtype = resolve_dtype(args.dtype, device)
        if self.dtype == "fp16" and device.type != "cuda":
            raise FlexDiTError("fp16 training needs a CUDA GPU (loss scaling); use --dtype bf16 on CPU")
        self.local_batch = args.batch // ctx.world_size
        self.out = Path(args.out)
        self.log_path = self.out / "log.jsonl"
        if ctx.is_main:
            check_output_folder(args.out, source=("--data", args.data))  # before any work
            for flag, path in (("--init", args.init), ("--teacher", args.teacher)):
                if path and Path(path).resolve().is_relative_to(self.out.resolve()):
                    raise FlexDiTError(f"{flag} {path} lies inside --out {args.out}, where training writes its own "
                                       "files (ema.safetensors, checkpoints); give another --out")
        self.resumed_from = self._checkpoint_to_resume()
        state = load_training_checkpoint(self.resumed_from) if self.resumed_from else None
        if state is not None:
            self._check_resume_matches(state)
        self.recorded = json.loads(state["train_args"]) if state is not None else recorded_settings(args)

        self.data = self._open_data(state)
        self.step, self.epoch, self.position = 0, 0, 0
        self.window = self._empty_window()
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, permutation), a pure function of both

        torch.manual_seed(args.seed)  # only initialisation of models trained from scratch reads the global RNG
        if state is not None:
            config = config_from_dict(json.loads(state["model_config"]), state.get("model_family", DiT.FAMILY))
            model = build_family_model(config)
        else:
            model = build_model(args, self.data)
        self.intervals = timestep_plan(model, args.intervals)
        if args.mix_intervals and self.intervals is None:
            raise FlexDiTError("--mix-intervals needs a FlexDiT with a temporal density schedule (--density), "
                               "not a dense model or a fixed --grid")
        if args.mix_intervals and self.local_batch < args.intervals:
            raise FlexDiTError(f"--mix-intervals splits each process's batch of {self.local_batch} into "
                               f"{args.intervals} intervals; use a --batch of at least {args.intervals} per process")
        self.diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
        self.captions = open_captions(args, model, self.data)
        self.drop_condition = args.label_dropout > 0 and (self.captions is not None or model.has_null_class)
        self.teacher = load_teacher(args, model, device) if args.teacher else None
        self.model = model.to(device).train()
        self.ema = deepcopy(self.model).eval().requires_grad_(False)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
        self.fsdp = args.fsdp and ctx.world_size > 1
        if self.fsdp:  # shard every block, then the rest; the EMA is sharded alike and updated shard by shard
            for m in (self.model, self.ema):
                for block in m.blocks:
                    fully_shard(block)
                fully_shard(m)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        if state is not None:
            set_optimizer_state_dict(self.model, self.opt, state["opt"], options=StateDictOptions(full_state_dict=True))
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            if ctx.is_main:  # the saved window holds every rank's sums; the others restart from zero
                self.window = self._empty_window() | state["log_window"]  # older checkpoints lack "distill"
        if ctx.is_main:  # lines logged after the checkpoint (any, without one) belong to a run that died
            _truncate_log(self.log_path, self.step)
        self.start_step = self.step
        self.model.grad_checkpointing = args.grad_checkpointing
        if args.compile:
            self.model.compile_grids()
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == "fp16" else None
        if state is not None and self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.train_model = self._distribute(self.model)

    def _checkpoint_to_resume(self) -> Path | None:
        args, latest = self.args, latest_checkpoint(self.args.out)
        if args.resume and latest is None and self.ctx.is_main:
            tqdm.write(f"--resume: no checkpoint in {checkpoint_dir(args.out)}; starting from step 0")
        if latest is not None and not args.resume:
            raise FlexDiTError(f"{args.out} already holds checkpoints; pass --resume to continue or choose "
                               "another --out")
        return latest

    def _open_data(self, state: dict | None) -> TrainData:
        args = self.args
        if args.frames is not None or Path(args.data).is_file():
            data = open_video_dataset(args.data, args.frames, args.image_size, args.vae, self.device)
        else:
            data = open_dataset(args.data, image_size=args.image_size, vae=args.vae, device=self.device)
        if len(data) < args.batch:
            raise FlexDiTError(f"the data holds {len(data)} samples, fewer than one batch of {args.batch}")
        if args.flip and not data.can_flip:
            raise FlexDiTError("--flip asked for, but this data cannot be flipped (latents extracted without "
                               "--flip); re-extract with --flip or drop --flip")
        recorded = state.get("data", data_summary(data)) if state is not None else data_summary(data)
        if recorded != data_summary(data):  # older checkpoints did not record it
            raise FlexDiTError(f"--data {args.data} holds {data_summary(data)} but the run in {args.out} was trained "
                               f"on {recorded}; resume with that data or choose another --out")
        return data

    def _check_resume_matches(self, state: dict) -> None:
        """--resume continues the recorded run: every setting but the RESUMABLE ones as recorded."""
        differ = resume_differences(json.loads(state["train_args"]), self.args)
        if differ:
            raise FlexDiTError(f"--resume with settings other than those recorded in {self.resumed_from}: "
                               f"{'; '.join(differ)}; resume with the recorded ones, or choose another --out")

    def _distribute(self, model: FlexDiTCore):
        if self.ctx.world_size == 1 or self.fsdp:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # --- one step ---------------------------------------------------------------------------------------
    def _batch_indices(self) -> torch.Tensor:
        n, B = len(self.data), self.args.batch
        if self.position + B > n:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            self._order = (self.epoch, _epoch_order(self.args.seed, self.epoch, n))
        order = self._order[1]
        mine = order[self.position + self.ctx.rank * self.local_batch: self.position + (self.ctx.rank + 1) * self.local_batch]
        self.position += B
        return mine

    def _timestep_parts(self, g: torch.Generator) -> list[tuple[torch.Tensor, object, int | None]]:
        """This rank's timesteps at this step, in parts that each run at one grid: [(t, grid, interval)]."""
        if self.intervals is None:
            grid = None
            if self.model.layout.has_sparse_tokens:
                grid = self.model.density.grid(0, self.model.token_grid)  # a fixed grid
            return [(torch.randint(0, NUM_TIMESTEPS, (self.local_batch,), generator=g), grid, None)]
        K, dense_grid = self.intervals.num_intervals, self.model.token_grid
        if not self.args.mix_intervals:
            k = (self.ctx.rank + self.step * self.ctx.world_size) % K
            return [(self.intervals.sample(k, self.local_batch, g), self.intervals.grid(k, dense_grid), k)]
        # the remainder of batch / K goes to intervals that rotate with the step, so none is favoured
        sizes = [self.local_batch // K + ((k - self.step) % K < self.local_batch % K) for k in range(K)]
        return [(self.intervals.sample(k, n, g), self.intervals.grid(k, dense_grid), k) for k, n in enumerate(sizes)]

    def _gradient_sync(self, enabled: bool):
        """Gradient accumulation over a step's parts: only the last backward reduces gradients across ranks."""
        if self.fsdp and self.args.mix_intervals:  # one part per step otherwise: FSDP's default, sync, holds
            self.model.set_requires_gradient_sync(enabled)
        elif self.ctx.world_size > 1 and not enabled:
            return self.train_model.no_sync()
        return nullcontext()

    def _losses(self, x, xt, t, condition, noise, grid) -> dict:
        with torch.autocast(self.device.type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32"):
            out = self.train_model(xt, t, **condition, grid=grid)
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(xt, t, **condition)
        terms = self.diffusion.training_losses(out, x, xt, t, noise)
        terms = {"loss": terms["loss"].mean(), "mse": terms["mse"].mean(),
                 "vb": terms["vb"].mean() if "vb" in terms else torch.zeros(()), "distill": torch.zeros(())}
        if self.teacher is not None:  # matching the dense model's prediction: a lower-variance target than the noise
            terms["distill"] = F.mse_loss(out.float(), target.float())
            terms["loss"] = terms["loss"] + self.args.distill * terms["distill"]
        return terms

    def train_step(self) -> dict:
        g = _step_generator(self.args.seed, self.ctx.rank, self.step)
        indices = self._batch_indices()
        flip = torch.rand(len(indices), generator=g) < 0.5 if self.args.flip else None
        x, y = self.data.batch(indices, flip)
        parts = self._timestep_parts(g)
        t = torch.cat([part[0] for part in parts])
        condition = self._condition(indices, y, g)
        noise = torch.randn(x.shape, generator=g)
        x, t, noise = (a.to(self.device) for a in (x, t, noise))
        condition = {k: v.to(self.device) for k, v in condition.items()}
        xt = self.diffusion.q_sample(x, t, noise)
        self.opt.zero_grad(set_to_none=True)
        for group in self.opt.param_groups:  # a pure function of the step, so a resumed run gets it right
            group["lr"] = self.lr()
        logged, start = dict.fromkeys(LOGGED, 0.0), 0
        for i, (part_t, grid, _) in enumerate(parts):
            part, start = slice(start, start + len(part_t)), start + len(part_t)
            weight = len(part_t) / len(t)
            with self._gradient_sync(i == len(parts) - 1):
                terms = self._losses(x[part], xt[part], t[part], {k: v[part] for k, v in condition.items()},
                                     noise[part], grid)
                loss = terms["loss"] * weight
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k in LOGGED:
                logged[k] += terms[k].item() * weight
        # every rank stops together, instead of stepping with its peers' bad gradients
        [finite] = self._all_ranks_min([math.isfinite(logged["loss"])])
        if not finite:
            raise self._non_finite_loss(x, indices)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        update_ema(self.ema, self.model, self.ema_decay())
        self.step += 1
        grids = ",".join("x".join(map(str, grid)) if grid else "dense" for _, grid, _ in parts)
        return logged | {"grid": grids, "interval": parts[0][2] if len(parts) == 1 else None}

    def _condition(self, indices: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        """forward()'s conditioning of the batch: the labels, or their captions (per class or per sample), each
        replaced by the null class / null caption with probability --label-dropout (guidance)."""
        if self.captions is None:
            condition = {"y": labels}
        else:
            caption, mask = self.captions.lookup(indices, labels)
            condition = {"caption": caption, "caption_mask": mask}
        if not self.drop_condition:
            return condition
        drop = torch.rand(len(labels), generator=g) < self.args.label_dropout
        null = None if self.captions is None or self.model.config.learned_null_caption else self.captions.null
        return self.model.dropped_condition(condition, drop, null)

    def _all_ranks_min(self, values: list[float]) -> list[float]:
        """The minimum of each value over the ranks (a collective: every rank calls it)."""
        values = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return values.tolist()

    def _divergence_fix(self) -> str:
        fix = "lower --lr or add --lr-warmup (in another --out)"
        if self.dtype != "fp32":
            fix += f", or resume with --dtype fp32 (this run computes in {self.dtype})"
        return fix

    def _non_finite_loss(self, x: torch.Tensor, indices: torch.Tensor) -> FlexDiTError:
        """The likely cause of a non-finite loss on some rank: the weights, the data, else the learning rate or
        dtype (a collective: every rank calls it and gets the same answer)."""
        bad = ~torch.isfinite(x).flatten(1).all(1).cpu()
        first_bad = int(indices[bad].min()) if bad.any() else len(self.data)
        teacher_weights = self.teacher.parameters() if self.teacher is not None else []
        weights, teacher, first_bad = self._all_ranks_min([_finite(self.model.parameters()), _finite(teacher_weights),
                                                           first_bad])
        at = f"the loss is not finite at step {self.step}"
        if not weights and self.step == self.start_step:
            source = self.resumed_from or self.args.init or "the random initialisation"
            return FlexDiTError(f"{at}: the weights loaded from {source} are not finite (NaN/inf); start from "
                                "another checkpoint")
        if not weights:
            return FlexDiTError(f"{at}: the weights are not finite (training diverged); {self._divergence_fix()}")
        if not teacher:
            return FlexDiTError(f"{at}: the weights of --teacher {self.args.teacher} are not finite (NaN/inf); use "
                                "another teacher")
        if first_bad < len(self.data):
            return FlexDiTError(f"{at}: the data holds NaN/inf (sample {int(first_bad)} of {self.args.data}); "
                                "repair the data or extract the latents again")
        overflow = f" or {self.dtype} overflows" if self.dtype != "fp32" else ""
        return FlexDiTError(f"{at} though the weights and the data are finite: the learning rate is too high"
                            f"{overflow}; {self._divergence_fix()}")

    def ema_decay(self, step: int | None = None) -> float:
        """The EMA decay after optimiser step `step` (default: the one just taken)."""
        step = self.step if step is None else step
        return min(self.args.ema, (1 + step) / (10 + step)) if self.args.ema_warmup else self.args.ema

    def lr(self, step: int | None = None) -> float:
        """The learning rate of optimiser step `step` (default: the next one): a pure function of the step and
        the arguments, so a resumed run continues the same curve (a cosine one is drawn over --steps)."""
        step = self.step if step is None else step
        a = self.args
        if step < a.lr_warmup:
            return a.lr * (step + 1) / a.lr_warmup
        if a.lr_schedule == "cosine":
            return a.lr * 0.5 * (1 + math.cos(math.pi * (step - a.lr_warmup) / max(1, a.steps - a.lr_warmup)))
        return a.lr

    # --- bookkeeping --------------------------------------------------------------------------------------
    @staticmethod
    def _empty_window() -> dict:
        return dict.fromkeys(LOGGED, 0.0) | {"count": 0}

    def _log(self, last: dict, steps_per_s: float) -> dict:
        *sums, count = self._global_window()
        record = {"step": self.step} | {k: v / count for k, v in zip(LOGGED, sums)}
        if self.teacher is None:
            del record["distill"]
        record |= {"grid": last["grid"], "interval": last["interval"], "steps_per_s": steps_per_s,
                   "lr": self.lr(self.step - 1), "time": time.time()}
        self.window = self._empty_window()
        if self.ctx.is_main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _global_window(self) -> list[float]:
        """The open log window summed over ranks: the sums of LOGGED and the step count."""
        sums = torch.tensor([self.window[k] for k in (*LOGGED, "count")], dtype=torch.float64, device=self.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(sums)
        return sums.tolist()

    def _state(self) -> dict:
        """Full (unsharded, CPU) state; a collective under FSDP, so every rank calls it."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {
            "version": CHECKPOINT_VERSION, "step": self.step, "epoch": self.epoch, "position": self.position,
            "model": get_model_state_dict(self.model, options=full), "ema": get_model_state_dict(self.ema, options=full),
            "opt": get_optimizer_state_dict(self.model, self.opt, options=full),
            "log_window": dict(zip((*LOGGED, "count"), self._global_window())),
            "model_config": json.dumps(self.model.config.to_dict()), "model_family": self.model.FAMILY,
            "train_args": json.dumps(recorded_settings(self.args)), "data": data_summary(self.data),
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def full_ema(self) -> FlexDiTCore | None:
        """The EMA weights as a plain model; under FSDP gathered onto rank 0 (None on the other ranks)."""
        if not self.fsdp:
            return self.ema
        state = get_model_state_dict(self.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        model = build_family_model(self.model.config)
        model.load_state_dict(state)
        return model.eval()

    def save(self) -> Path:
        path = checkpoint_dir(self.args.out) / f"step-{self.step:07d}.pt"
        [finite] = self._all_ranks_min([_finite(self.model.parameters())])
        if not finite:  # refused, so that the rotation never drops a good checkpoint for a broken one
            raise FlexDiTError(f"the weights are not finite after step {self.step} (training diverged); not saved "
                               f"over the checkpoints in {checkpoint_dir(self.args.out)}; {self._divergence_fix()}")
        state = self._state()
        if self.ctx.is_main:
            save_checkpoint(path, state)
            for old in sorted(checkpoint_dir(self.args.out).glob("step-*.pt"))[:-self.args.keep]:
                old.unlink()
        self.ctx.barrier()
        return path

    def run(self) -> FlexDiTCore | None:
        args = self.args
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(checkpoint_dir(args.out))  # left by a run killed mid-write
            record = self.out / "train_args.json"
            if self.resumed_from is None or not record.exists():  # recorded at the first start, then kept
                atomic_write(record, lambda tmp: tmp.write_text(json.dumps(self.recorded, indent=2)))
            tqdm.write(f"training in {self.dtype} on {self.device}" + (" (--dtype auto)" if args.dtype == "auto" else ""))
        tick, tick_step = time.perf_counter(), self.step
        # closed on an error too, so that the message starts on a line of its own
        with tqdm(total=args.steps, initial=self.step, disable=not self.ctx.is_main, desc="train") as bar:
            while self.step < args.steps:
                last = self.train_step()
                for k in LOGGED:
                    self.window[k] += last[k]
                self.window["count"] += 1
                bar.update(1)
                if self.step % args.log_every == 0:
                    now = time.perf_counter()
                    record = self._log(last, (self.step - tick_step) / max(now - tick, 1e-9))
                    tick, tick_step = now, self.step
                    bar.set_postfix(loss=f"{record['loss']:.4f}", steps_per_s=f"{record['steps_per_s']:.2f}")
                if self.step % args.ckpt_every == 0 or self.step == args.steps:
                    self.save()
        ema = self.full_ema()
        if self.ctx.is_main:
            ema.save(self.out / "ema.safetensors")
            tqdm.write(f"done: {self.step} steps; EMA weights in {self.out / 'ema.safetensors'}, "
                       f"checkpoints in {checkpoint_dir(args.out)}, log in {self.log_path}")
        return ema


def train(args: TrainArgs) -> FlexDiTCore | None:
    """Run training in this process (and its torchrun peers); returns the EMA model (None on FSDP ranks > 0)."""
    ctx, device = init_from_env(args.device)
    try:
        return Trainer(args, ctx, device).run()
    finally:
        shutdown()
