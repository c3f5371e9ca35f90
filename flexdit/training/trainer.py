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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from flexdit.checkpoints import load_checkpoint, retarget
from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.distributed import DTYPES, Dist, init_from_env, shutdown
from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write, remove_stale_temporaries
from flexdit.models.dit import DiT, DiTConfig, model_config
from flexdit.schedule import NUM_TIMESTEPS, DensitySchedule, TimestepIntervals, parse_density
from flexdit.training.data import TrainData, open_dataset

CHECKPOINT_VERSION = 1
LOGGED = ("loss", "mse", "vb", "distill")  # per-step terms averaged over each log window
LR_SCHEDULES = ("constant", "cosine")


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
    label_dropout: float = 0.1
    ckpt_every: int = 500
    log_every: int = 10
    keep: int = 2  # checkpoints kept on disk
    resume: bool = False
    dtype: str = "fp32"
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


# --- model ----------------------------------------------------------------------------------------------
def build_model(args: TrainArgs, data: TrainData) -> DiT:
    """The model to train, checked against the data."""
    if (args.init is None) == (args.model is None):
        raise FlexDiTError("give exactly one of --init CKPT (fine-tune) or --model NAME (from scratch)")
    if args.init and (args.hidden_size or args.depth):
        raise FlexDiTError("--hidden-size and --depth shape a model trained from scratch (--model); "
                           "--init takes its size from the checkpoint")
    density = parse_density(args.density, args.grid)
    C, H, W = data.sample_shape
    if args.init:
        loaded = load_checkpoint(args.init, num_heads=args.num_heads)
        layout = args.layout or ("default" if loaded.model.layout.is_dense else None)
        model = retarget(loaded, layout, density).model
    else:
        custom = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_heads", args.num_heads)) if v}
        model = DiT(model_config(args.model, (H, W), layout=args.layout, density=density, depth=args.depth,
                                 in_channels=C, num_classes=data.num_classes, class_dropout_prob=args.label_dropout,
                                 **custom))
    config = model.config
    if (config.in_channels, *config.input_size) != (C, H, W):
        raise FlexDiTError(f"the data's samples are {C}x{H}x{W} but the model takes "
                           f"{config.in_channels}x{config.input_size[0]}x{config.input_size[1]}; "
                           "use data of the model's size (image size / VAE) or another model")
    if data.num_classes > config.num_classes:
        raise FlexDiTError(f"the data has {data.num_classes} classes but the model only {config.num_classes}")
    return model


def load_teacher(args: TrainArgs, student: DiT, device: torch.device) -> DiT:
    """The frozen model whose outputs the student learns to match; it must predict the same thing."""
    teacher = load_checkpoint(args.teacher, num_heads=args.num_heads).model
    a, b = teacher.config, student.config
    if (a.in_channels, tuple(a.input_size), a.learn_sigma) != (b.in_channels, tuple(b.input_size), b.learn_sigma):
        raise FlexDiTError(f"--teacher {args.teacher} takes {a.in_channels}x{a.input_size[0]}x{a.input_size[1]} "
                           f"(learned sigma: {a.learn_sigma}) but the model {b.in_channels}x{b.input_size[0]}x"
                           f"{b.input_size[1]} (learned sigma: {b.learn_sigma}); use the dense model it came from")
    if (a.num_classes, teacher.has_null_class) != (b.num_classes, student.has_null_class):
        raise FlexDiTError(f"--teacher {args.teacher} has {a.num_classes} classes (null class: "
                           f"{teacher.has_null_class}) but the model {b.num_classes} ({student.has_null_class}); "
                           "use the dense model it came from")
    return teacher.to(device).eval().requires_grad_(False)


def timestep_plan(model: DiT, intervals: int) -> TimestepIntervals | None:
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


class Trainer:
    def __init__(self, args: TrainArgs, ctx: Dist, device: torch.device):
        self.args, self.ctx, self.device = args, ctx, device
        if args.batch % ctx.world_size:
            raise FlexDiTError(f"--batch {args.batch} is not divisible by the {ctx.world_size} processes")
        if args.dtype not in DTYPES:
            raise FlexDiTError(f"unknown --dtype {args.dtype}; choose {', '.join(DTYPES)}")
        if args.dtype == "fp16" and device.type != "cuda":
            raise FlexDiTError("fp16 training needs a CUDA GPU (loss scaling); use --dtype bf16 on CPU")
        for name in ("steps", "ckpt_every", "log_every", "batch", "keep"):
            if getattr(args, name) < 1:
                raise FlexDiTError(f"--{name.replace('_', '-')} must be at least 1")
        if args.lr_warmup < 0:
            raise FlexDiTError(f"--lr-warmup {args.lr_warmup}: the warm-up must be 0 or more steps")
        if args.lr_schedule not in LR_SCHEDULES:
            raise FlexDiTError(f"unknown --lr-schedule {args.lr_schedule}; choose {' or '.join(LR_SCHEDULES)}")
        if args.distill <= 0:
            raise FlexDiTError(f"--distill {args.distill}: the distillation weight must be positive")
        self.local_batch = args.batch // ctx.world_size
        self.data = open_dataset(args.data, image_size=args.image_size, vae=args.vae, device=device)
        if len(self.data) < args.batch:
            raise FlexDiTError(f"the data holds {len(self.data)} samples, fewer than one batch of {args.batch}")
        if args.flip and not self.data.can_flip:
            raise FlexDiTError("--flip asked for, but this data cannot be flipped (latents extracted without "
                               "--flip); re-extract with --flip or drop --flip")
        self.out = Path(args.out)
        self.log_path = self.out / "log.jsonl"
        self.step, self.epoch, self.position = 0, 0, 0
        self.window = self._empty_window()
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, permutation), a pure function of both

        resume_from = latest_checkpoint(args.out) if args.resume else None
        if args.resume and resume_from is None and ctx.is_main:
            tqdm.write(f"--resume: no checkpoint in {checkpoint_dir(args.out)}; starting from step 0")
        if resume_from is None and not args.resume and latest_checkpoint(args.out) is not None:
            raise FlexDiTError(f"{args.out} already holds checkpoints; pass --resume to continue or choose "
                               "another --out")
        if resume_from is not None:
            state = load_training_checkpoint(resume_from)
            model = DiT(DiTConfig.from_dict(json.loads(state["model_config"])))
            self._check_resume_matches(state)
        else:
            model = build_model(args, self.data)
            state = None
        self.intervals = timestep_plan(model, args.intervals)
        if args.mix_intervals and self.intervals is None:
            raise FlexDiTError("--mix-intervals needs a FlexDiT with a temporal density schedule (--density), "
                               "not a dense model or a fixed --grid")
        if args.mix_intervals and self.local_batch < args.intervals:
            raise FlexDiTError(f"--mix-intervals splits each process's batch of {self.local_batch} into "
                               f"{args.intervals} intervals; use a --batch of at least {args.intervals} per process")
        self.diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
        self.null_class = model.config.num_classes if model.has_null_class else None
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
                _truncate_log(self.log_path, self.step)
        self.model.grad_checkpointing = args.grad_checkpointing
        if args.compile:
            self.model.compile_grids()
        self.scaler = torch.amp.GradScaler("cuda") if args.dtype == "fp16" else None
        if state is not None and self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.train_model = self._distribute(self.model)

    def _check_resume_matches(self, state: dict) -> None:
        """--resume must continue the same model and layout as the checkpoint, and a cosine schedule its --steps."""
        saved_args = json.loads(state["train_args"])
        keys = ("init", "model", "hidden_size", "depth", "num_heads", "layout", "density", "grid", "intervals",
                "mix_intervals")
        changed = [k for k in keys if saved_args.get(k) != getattr(self.args, k)]
        if changed:
            k = changed[0]
            raise FlexDiTError(f"--resume with --{k.replace('_', '-')} {getattr(self.args, k)!r} but the checkpoint "
                               f"was trained with {saved_args.get(k)!r}; use the same model, layout and data, or "
                               "another --out")
        cosine = saved_args.get("lr_schedule") == self.args.lr_schedule == "cosine"
        if cosine and saved_args.get("steps") != self.args.steps:
            raise FlexDiTError(f"--resume with --steps {self.args.steps} but the checkpoint's cosine learning-rate "
                               f"schedule was drawn over --steps {saved_args.get('steps')}; resume with that --steps, "
                               "or start another --out")

    def _distribute(self, model: DiT):
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

    def _losses(self, x, xt, t, y, noise, grid) -> dict:
        with torch.autocast(self.device.type, dtype=DTYPES[self.args.dtype], enabled=self.args.dtype != "fp32"):
            out = self.train_model(xt, t, y, grid=grid)
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(xt, t, y)
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
        if self.null_class is not None and self.args.label_dropout > 0:
            drop = torch.rand(len(y), generator=g) < self.args.label_dropout
            y = torch.where(drop, self.null_class, y)
        noise = torch.randn(x.shape, generator=g)
        x, y, t, noise = (a.to(self.device) for a in (x, y, t, noise))
        xt = self.diffusion.q_sample(x, t, noise)
        self.opt.zero_grad(set_to_none=True)
        for group in self.opt.param_groups:  # a pure function of the step, so a resumed run gets it right
            group["lr"] = self.lr()
        logged, start = dict.fromkeys(LOGGED, 0.0), 0
        for i, (part_t, grid, _) in enumerate(parts):
            part, start = slice(start, start + len(part_t)), start + len(part_t)
            weight = len(part_t) / len(t)
            with self._gradient_sync(i == len(parts) - 1):
                terms = self._losses(x[part], xt[part], t[part], y[part], noise[part], grid)
                loss = terms["loss"] * weight
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k in LOGGED:
                logged[k] += terms[k].item() * weight
        finite = torch.tensor(float(math.isfinite(logged["loss"])), device=self.device)
        if self.ctx.world_size > 1:  # every rank stops together instead of stepping with its peers' bad gradients
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise FlexDiTError(f"the loss is not finite at step {self.step} (on some rank); lower --lr or use "
                               "--dtype fp32")
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        update_ema(self.ema, self.model, self.args.ema)
        self.step += 1
        grids = ",".join("x".join(map(str, grid)) if grid else "dense" for _, grid, _ in parts)
        return logged | {"grid": grids, "interval": parts[0][2] if len(parts) == 1 else None}

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
            "model_config": json.dumps(self.model.config.to_dict()),
            "train_args": json.dumps(asdict(self.args)),
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def full_ema(self) -> DiT | None:
        """The EMA weights as a plain model; under FSDP gathered onto rank 0 (None on the other ranks)."""
        if not self.fsdp:
            return self.ema
        state = get_model_state_dict(self.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        model = DiT(self.model.config)
        model.load_state_dict(state)
        return model.eval()

    def save(self) -> Path:
        path = checkpoint_dir(self.args.out) / f"step-{self.step:07d}.pt"
        state = self._state()
        if self.ctx.is_main:
            save_checkpoint(path, state)
            for old in sorted(checkpoint_dir(self.args.out).glob("step-*.pt"))[:-self.args.keep]:
                old.unlink()
        self.ctx.barrier()
        return path

    def run(self) -> DiT | None:
        args = self.args
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(checkpoint_dir(args.out))  # left by a run killed mid-write
            (self.out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
        bar = tqdm(total=args.steps, initial=self.step, disable=not self.ctx.is_main, desc="train")
        tick, tick_step = time.perf_counter(), self.step
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
        bar.close()
        ema = self.full_ema()
        if self.ctx.is_main:
            ema.save(self.out / "ema.safetensors")
            tqdm.write(f"done: {self.step} steps; EMA weights in {self.out / 'ema.safetensors'}, "
                       f"checkpoints in {checkpoint_dir(args.out)}, log in {self.log_path}")
        return ema


def train(args: TrainArgs) -> DiT | None:
    """Run training in this process (and its torchrun peers); returns the EMA model (None on FSDP ranks > 0)."""
    ctx, device = init_from_env(args.device)
    torch.manual_seed(args.seed)  # only initialisation of models trained from scratch reads the global RNG
    try:
        return Trainer(args, ctx, device).run()
    finally:
        shutdown()
