"""DiT's Gaussian diffusion: 1000-step linear betas (1e-4 .. 0.02), learned-range or fixed variance,
respaced to any subset of timesteps, with DDPM ancestral and DDIM steps.

A respaced process keeps the original integer timesteps: step i of the sampler calls the model with
`timesteps[i]` (0..999), which is also what a FlexDiT's density schedule reads.
All coefficient arithmetic is float64, as in the original, and cast at use.
"""
import math

import numpy as np
import torch

from flexdit.diffusion.respace import space_timesteps
from flexdit.errors import FlexDiTError
from flexdit.schedule import NUM_TIMESTEPS


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _take(arr: np.ndarray, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[i] broadcast to like's shape (B, 1, 1, ...)."""
    values = torch.from_numpy(arr).to(like.device)[i.to(like.device)].to(like.dtype)
    return values.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """The process at a set of kept timesteps (all 1000 for training, fewer for sampling)."""

    def __init__(self, section_counts: str | int | list[int] | None = None, learn_sigma: bool = True):
        base = linear_betas()
        self.timesteps = list(range(NUM_TIMESTEPS)) if section_counts is None else \
            space_timesteps(NUM_TIMESTEPS, section_counts)
        base_alphas_cumprod = np.cumprod(1.0 - base)
        # Respacing keeps alphas_cumprod at the kept steps and derives the betas between them.
        last, betas = 1.0, []
        for t in self.timesteps:
            betas.append(1 - base_alphas_cumprod[t] / last)
            last = base_alphas_cumprod[t]
        self.learn_sigma = learn_sigma
        self.betas = np.array(betas, dtype=np.float64)
        self.num_steps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log(0) at the first step is replaced by the next step's variance, as in the original.
        first = self.posterior_variance[1] if self.num_steps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def model_timesteps(self, i: torch.Tensor) -> torch.Tensor:
        """Step indices 0..S-1 -> the original integer timesteps the model is called with."""
        return torch.tensor(self.timesteps, device=i.device)[i]

    # --- forward process and posterior ------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _take(self.sqrt_alphas_cumprod, i, x0) * x0 + _take(self.sqrt_one_minus_alphas_cumprod, i, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _take(self.posterior_mean_coef1, i, xt) * x0 + _take(self.posterior_mean_coef2, i, xt) * xt
        return mean, _take(self.posterior_variance, i, xt), _take(self.posterior_log_variance_clipped, i, xt)

    def predict_x0(self, xt: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return _take(self.sqrt_recip_alphas_cumprod, i, xt) * xt - _take(self.sqrt_recipm1_alphas_cumprod, i, xt) * eps

    def p_mean_variance(self, model_output: torch.Tensor, xt: torch.Tensor, i: torch.Tensor):
        """(mean, log-variance, predicted x0, eps) of p(x_{t-1} | x_t) from the model output.

        Learned sigma: the second half of the channels v in [-1, 1] interpolates the log-variance between
        the posterior's (clipped) and beta_t: log var = (v+1)/2 log beta_t + (1-v)/2 log posterior var.
        Fixed: the original's "fixed large" variance (beta_t, with the posterior variance at the first step).
        """
        C = xt.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise FlexDiTError(f"a learned-sigma model must output {2 * C} channels, got {model_output.shape[1]}")
            eps, v = model_output[:, :C], model_output[:, C:]
            min_log = _take(self.posterior_log_variance_clipped, i, xt)
            max_log = _take(np.log(self.betas), i, xt)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            large = np.log(np.append(self.posterior_variance[1] if self.num_steps > 1 else self.betas[0],
                                     self.betas[1:]))
            log_variance = _take(large, i, xt).expand_as(xt)
        x0 = self.predict_x0(xt, i, eps)
        mean, _, _ = self.q_posterior(x0, xt, i)
        return mean, log_variance, x0, eps

    # --- reverse steps --------------------------------------------------------------------------------
    def ddpm_step(self, model_output: torch.Tensor, xt: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        idx = torch.full((xt.shape[0],), i, dtype=torch.long)
        mean, log_variance, _, _ = self.p_mean_variance(model_output, xt, idx)
        return mean + (torch.exp(0.5 * log_variance) * noise if i > 0 else 0)

    def ddim_step(self, model_output: torch.Tensor, xt: torch.Tensor, i: int, noise: torch.Tensor | None,
                  eta: float = 0.0) -> torch.Tensor:
        """DDIM (Song et al.): x_{t-1} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z, s = eta * sqrt((1-a')/(1-a)) sqrt(1 - a/a')."""
        C = xt.shape[1]
        eps = model_output[:, :C]
        idx = torch.full((xt.shape[0],), i, dtype=torch.long)
        x0 = self.predict_x0(xt, idx, eps)
        a, a_prev = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        out = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * eps
        if sigma > 0 and i > 0:
            out = out + sigma * noise
        return out
