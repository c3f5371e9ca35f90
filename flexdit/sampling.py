"""Sampling: DDPM, DDIM and DPM-Solver++ loops, classifier-free guidance, VAE decoding.

The model is always called with integer timesteps 0..999, so a FlexDiT runs each step at the grid its
density schedule gives for that timestep. Every sample's noise comes from its own generator, seeded by
(seed, sample index): the images do not depend on the batch size or on how work is split over processes.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from flexdit.diffusion.gaussian import GaussianDiffusion
from flexdit.diffusion.respace import space_timesteps
from flexdit.errors import FlexDiTError
from flexdit.models.core import FlexDiTCore
from flexdit.schedule import NUM_TIMESTEPS
from flexdit.vae import LATENT_SCALE

SAMPLERS = ("ddpm", "ddim", "dpm")
MAX_SEED = 2**32 - 1  # sample i's generator is seeded with seed * 1_000_003 + i, which must fit in 64 bits
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm": 20}


@dataclass
class SamplerPlan:
    """The timesteps at which a sampler calls the model, and how to step."""
    sampler: str
    steps: int
    timesteps: list[int]  # descending: the order the model sees them


Condition = torch.Tensor | list[int] | dict[str, torch.Tensor]  # class ids (DiT) or captions (PixArt)
MODEL_DEFAULT = "model"  # guided_channels: the backbone's own rule (DiT: the first 3 channels; PixArt: all)


def check_request(model: FlexDiTCore, condition: Condition, cfg_scale: float, eta: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """Refuse what `sample` cannot do well before it starts; returns the model's prepared conditioning (a dict of
    batch-first tensors: forward()'s keyword arguments, plus a PixArt's negative captions)."""
    condition = model.prepare_condition(condition)
    if not 1 <= cfg_scale < math.inf:
        raise FlexDiTError(f"cfg scale must be a finite number of at least 1 (1 = no guidance), got {cfg_scale}")
    if cfg_scale != 1 and not (model.can_guide or "negative_caption" in condition):
        raise FlexDiTError("classifier-free guidance needs a model trained with a null class or null caption, or a "
                           "negative caption (PixArt from diffusers: --text-encoder gives T5 of the empty prompt); "
                           "use --cfg 1")
    if not 0 <= eta < math.inf:
        raise FlexDiTError(f"eta must be a finite number of at least 0 (0 = deterministic DDIM), got {eta}")
    if not 0 <= seed <= MAX_SEED:
        raise FlexDiTError(f"seed {seed} is out of range; give a seed from 0 to {MAX_SEED}")
    return condition


def batch_size(condition: dict[str, torch.Tensor]) -> int:
    return next(iter(condition.values())).shape[0]


def select(condition: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """The conditioning of the samples at `indices` (a batch of a larger request)."""
    return {k: v[indices] for k, v in condition.items()}


def _sample_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]


def _randn(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)


def _dpm_scheduler(steps: int):
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        raise FlexDiTError("the dpm sampler uses diffusers' DPMSolverMultistepScheduler: pip install diffusers") from None
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            prediction_type="epsilon", lower_order_final=True)
    scheduler.set_timesteps(steps)
    return scheduler


def _spacing(sampler: str, steps: int) -> str:
    return str(steps) if sampler == "ddpm" else f"ddim{steps}"


def plan(sampler: str, steps: int | None = None) -> SamplerPlan:
    """The integer timesteps (descending) at which `sampler` calls the model, one forward pass each."""
    if sampler not in SAMPLERS:
        raise FlexDiTError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if steps < 1:
        raise FlexDiTError(f"steps must be at least 1, got {steps}")
    if sampler == "dpm":
        return SamplerPlan(sampler, steps, [int(t) for t in _dpm_scheduler(steps).timesteps])
    return SamplerPlan(sampler, steps, space_timesteps(NUM_TIMESTEPS, _spacing(sampler, steps))[::-1])


@torch.no_grad()
def sample(model: FlexDiTCore, condition: Condition, sampler: str = "ddpm", steps: int | None = None,
           cfg_scale: float = 1.0, guided_channels: int | None | str = MODEL_DEFAULT, eta: float = 0.0, seed: int = 0,
           sample_indices: list[int] | None = None, progress: bool = False) -> torch.Tensor:
    """Latents (B, C, H, W), float32, on the model's device, for `condition`: class ids for a DiT, captions
    {"caption", "caption_mask", ...} for a PixArt (see its prepare_condition).

    The sampler's state stays in float32 whatever the model's dtype (a bf16 model only computes in bf16),
    so no rounding accumulates over the steps. cfg_scale > 1 guides with the null class / null caption (or the
    negative caption); guided_channels 3 guides the first three channels as the original DiT, None all noise
    channels, "model" the backbone's rule (DiT 3, PixArt all); cfg_scale == 1 runs the plain conditional model
    (no doubled batch). sample_indices give each sample's seed index (default 0..B-1) so shards reproduce a
    single run.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    condition = check_request(model, condition, cfg_scale, eta, seed)
    guided = cfg_scale != 1
    n_guided = model.GUIDED_CHANNELS if guided_channels == MODEL_DEFAULT else guided_channels
    n_guided = model.in_channels if n_guided is None else min(n_guided, model.in_channels)
    the_plan = plan(sampler, steps)
    B = batch_size(condition)
    indices = list(range(B)) if sample_indices is None else list(sample_indices)
    generators = _sample_generators(seed, indices)
    shape = model.sample_shape
    x = _randn(generators, shape, device, torch.float32)
    inputs = model.guidance_condition(condition) if guided else \
        {k: v for k, v in condition.items() if not k.startswith("negative_")}
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    def model_output(x: torch.Tensor, t: int) -> torch.Tensor:
        x = x.to(dtype)
        if not guided:
            return model(x, torch.full((B,), t, device=device, dtype=torch.long), **inputs).float()
        out = model(torch.cat([x, x]), torch.full((2 * B,), t, device=device, dtype=torch.long), **inputs).float()
        cond, uncond = out[:, :n_guided].chunk(2)
        return torch.cat([uncond + cfg_scale * (cond - uncond), out[:B, n_guided:]], dim=1)

    bar = tqdm(total=len(the_plan.timesteps), desc=f"{sampler} {the_plan.steps} steps", disable=not progress,
               leave=False)
    if sampler == "dpm":
        scheduler = _dpm_scheduler(the_plan.steps)
        for t in the_plan.timesteps:
            x = _finite_step(scheduler.step(model_output(x, t)[:, : model.in_channels], t, x).prev_sample, t, dtype)
            bar.update(1)
    else:
        diffusion = GaussianDiffusion(_spacing(sampler, the_plan.steps), learn_sigma=model.config.learn_sigma)
        for step, t in zip(range(diffusion.num_steps - 1, -1, -1), the_plan.timesteps):
            out = model_output(x, t)
            if sampler == "ddpm":
                x = diffusion.ddpm_step(out, x, step, _randn(generators, shape, device, torch.float32))
            else:
                noise = _randn(generators, shape, device, torch.float32) if eta > 0 else None
                x = diffusion.ddim_step(out, x, step, noise, eta)
            x = _finite_step(x, t, dtype)
            bar.update(1)
    bar.close()
    return x


def _finite_step(x: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Stop at the first step that leaves NaN or inf in the state: decoding it would write black images."""
    if not torch.isfinite(x).all():
        hint = " or run in --dtype fp32 or bf16 (fp16 overflows)" if dtype == torch.float16 else ""
        raise FlexDiTError(f"sampling produced non-finite values at timestep {t}; the model's weights or inputs are "
                           f"broken (check them with flexdit info){hint}")
    return x


@torch.no_grad()
def decode(latents: torch.Tensor, vae=None) -> np.ndarray:
    """Latents -> uint8 images (B, H, W, C). Pixel-space models (1 or 3 channels, in [-1, 1]) need no VAE."""
    if vae is not None:
        expected = vae.config.latent_channels
        if latents.shape[1] != expected:
            raise FlexDiTError(f"the VAE expects {expected}-channel latents but the model makes {latents.shape[1]}; "
                               "use the VAE the model was trained with")
        images = vae.decode(latents.to(vae.dtype) / LATENT_SCALE).sample
    elif latents.shape[1] in (1, 3):
        images = latents
    else:
        raise FlexDiTError(f"{latents.shape[1]}-channel latents need a VAE to become images; pass --vae PATH "
                           "or --vae none to keep the latents")
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows * H, columns * W, C) grid image with 2-pixel gaps."""
    b, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / columns))
    pad = 2
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid
