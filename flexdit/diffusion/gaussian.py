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
    """arr[i] broadcast to like's shape (B, 1, 1, ...); indexed on the CPU, only the B values move."""
    values = torch.from_numpy(arr)[i.cpu()].to(like.device, like.dtype)
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
        self.log_betas = np.log(self.betas)
        # "Fixed large" variance of models without learned sigma: beta_t, the posterior's at the first step.
        self.fixed_large_log_variance = np.log(np.append(first, self.betas[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

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
            max_log = _take(self.log_betas, i, xt)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            log_variance = _take(self.fixed_large_log_variance, i, xt).expand_as(xt)
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

    # --- training loss ------------------------------------------------------------------------------------
    def training_losses(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiT's hybrid loss per sample: MSE on eps, plus (learned sigma) the variational-bound term that trains
        the variance through a stop-gradient on the mean, as in Improved DDPM / DiT."""
        C = x0.shape[1]
        model_output = model_output.float()
        eps = model_output[:, :C]
        terms = {"mse": ((noise - eps) ** 2).mean(dim=list(range(1, x0.dim())))}
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self.vb_term(frozen, x0, xt, i)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def vb_term(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits; the decoder NLL at the first step."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, i)
        mean, log_var, _, _ = self.p_mean_variance(model_output, xt, i)
        dims = list(range(1, x0.dim()))
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=dims) / math.log(2.0)
        return torch.where(i.to(x0.device) == 0, nll, kl)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins under a Gaussian (ADM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))

