"""Our models behind diffusers' transformer interface, so that its pipelines run them: `to_diffusers(model)`.

The adapter wraps the model (no copy: the pipeline's `.to(...)` moves the model itself) and translates one call:
- PixArt (PixArtAlphaPipeline): hidden_states, encoder_hidden_states, encoder_attention_mask (1 = token,
  0 = padding), timestep and added_cond_kwargs {"resolution", "aspect_ratio"} become x, caption, caption_mask, t
  and the micro-conditions. A model without micro-conditions ignores added_cond_kwargs, as diffusers'
  PixArtTransformer2DModel does (the pipeline passes them whenever sample_size is 128, and None values otherwise).
- DiT (DiTPipeline): hidden_states, timestep, class_labels become x, t, y. DiTPipeline hard-codes 1000 as the null
  class of guidance; the adapter maps it to the model's own null class (row num_classes), raises when the model
  has none, and refuses models with more than 1000 classes, where 1000 is a real class.
- Latte (LattePipeline): hidden_states (B, C, F, H, W), timestep, encoder_hidden_states and an optional
  encoder_attention_mask become x, t, caption and caption_mask. Only a caption Latte with learned sigma fits: the
  pipeline always passes T5 embeddings, and keeps the first half of the output channels unless the scheduler learns
  the variance. Our Latte always runs its temporal blocks, so enable_temporal_attentions=False raises. The pipeline
  passes no mask; one given may be (B, L) 1 = token / 0 = padding, or an additive bias (B, 1, L) or per frame
  (B*F, 1, L) (the form diffusers' Latte accepts), 0 = keep and -10000 = discard. Pass the pipeline
  video_length=frames and height, width = 8 x the latent size: its defaults are 16 frames of 512 px.
Timesteps (a float, a 0-d or a (B,) tensor, integer or float) become our integers 0..999, rounded. A FlexDiT runs
as it is: its density picks the grid from each timestep. The output is diffusers' Transformer2DModelOutput, or the
1-tuple (sample,) with return_dict=False. `config` holds what the pipelines read (sample_size is the latent side the
model runs at; pass height and width to the pipeline for a non-square PixArt).
"""
import torch
import torch.nn as nn

from flexdit.errors import FlexDiTError
from flexdit.models.core import FlexDiTCore
from flexdit.models.dit import DiT
from flexdit.models.latte import Latte
from flexdit.models.pixart import PixArt
from flexdit.schedule import T_MAX

PIPELINE_NULL_CLASS = 1000  # the class id DiTPipeline passes for the unconditional half of guidance
MICRO_CONDITION_KEYS = ("resolution", "aspect_ratio")
DISCARD_BIAS = -10000.0  # diffusers' additive-mask value for a padding token; anything at or below it discards


def _diffusers():
    """diffusers' FrozenDict (its config type: item and attribute access) and Transformer2DModelOutput."""
    try:
        from diffusers.configuration_utils import FrozenDict
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
    except ImportError:
        raise FlexDiTError("to_diffusers needs diffusers: pip install diffusers") from None
    return FrozenDict, Transformer2DModelOutput


class DiffusersTransformer(nn.Module):
    """What both families share: the wrapped model, config, dtype/device, timesteps, the output type."""

    def __init__(self, model: FlexDiTCore, family_config: dict):
        super().__init__()
        frozen_dict, self._output_type = _diffusers()
        self.model = model
        c = model.config
        self.config = frozen_dict(sample_size=c.input_size[0], in_channels=c.in_channels,
                                  out_channels=c.out_channels, patch_size=c.patch_size, num_layers=c.depth,
                                  num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
                                  **family_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _timesteps(self, timestep, batch: int) -> torch.Tensor:
        """A diffusers timestep (number, 0-d, (1,) or (B,) tensor, int or float) -> (B,) long in 0..T_MAX."""
        if timestep is None:
            raise FlexDiTError("the transformer needs a timestep; pass timestep= as diffusers' pipelines do")
        t = torch.as_tensor(timestep, device=self.device).reshape(-1)
        if t.numel() not in (1, batch):
            raise FlexDiTError(f"timestep has {t.numel()} values for a batch of {batch}; pass one or one per sample")
        t = (t.round() if t.is_floating_point() else t).long().expand(batch)
        if int(t.min()) < 0 or int(t.max()) > T_MAX:
            raise FlexDiTError(f"timesteps must lie in 0..{T_MAX} (a 1000-step DDPM schedule), got "
                               f"{int(t.min())}..{int(t.max())}; use a scheduler with num_train_timesteps=1000")
        return t

    def _output(self, sample: torch.Tensor, return_dict: bool):
        return self._output_type(sample=sample) if return_dict else (sample,)


class DiffusersPixArt(DiffusersTransformer):
    """A PixArt with the forward of diffusers' PixArtTransformer2DModel (for PixArtAlphaPipeline)."""

    def __init__(self, model: PixArt):
        c = model.config
        super().__init__(model, dict(caption_channels=c.caption_channels, use_additional_conditions=c.micro_conditions,
                                     interpolation_scale=c.interpolation_scale))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep=None, added_cond_kwargs: dict | None = None, cross_attention_kwargs: dict | None = None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        """hidden_states (B, C, H, W), encoder_hidden_states (B, L, caption_channels), encoder_attention_mask
        (B, L) 1/0 -> (B, out_channels, H, W) as Transformer2DModelOutput or (sample,)."""
        # 1. Input
        if cross_attention_kwargs or attention_mask is not None:
            raise FlexDiTError("flexdit's PixArt takes no attention_mask or cross_attention_kwargs (only "
                               "encoder_attention_mask); drop them")
        if encoder_hidden_states is None:
            raise FlexDiTError("PixArt needs encoder_hidden_states, the (B, L, caption_channels) T5 caption "
                               "embeddings; pass prompt_embeds to the pipeline")
        if encoder_attention_mask is not None and encoder_attention_mask.dim() != 2:
            raise FlexDiTError(f"encoder_attention_mask must be (B, L) with 1 = token, 0 = padding, got shape "
                               f"{tuple(encoder_attention_mask.shape)}")
        t = self._timesteps(timestep, hidden_states.shape[0])
        resolution, aspect_ratio = self._micro_conditions(added_cond_kwargs)
        # 2. The model
        sample = self.model(hidden_states, t, encoder_hidden_states, encoder_attention_mask, resolution, aspect_ratio)
        # 3. Output
        return self._output(sample, return_dict)

    def _micro_conditions(self, added_cond_kwargs: dict | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(resolution (B, 2), aspect_ratio (B, 1)) for a 1024-MS model, (None, None) for any other."""
        added = added_cond_kwargs or {}
        unknown = sorted(set(added) - set(MICRO_CONDITION_KEYS))
        if unknown:
            raise FlexDiTError(f"unknown added_cond_kwargs {unknown}; PixArt takes only resolution and aspect_ratio")
        if not self.model.config.micro_conditions:
            return None, None  # as PixArtTransformer2DModel without additional conditions
        return added.get("resolution"), added.get("aspect_ratio")


class DiffusersDiT(DiffusersTransformer):
    """A DiT with the forward of diffusers' DiTTransformer2DModel (for DiTPipeline)."""

    def __init__(self, model: DiT):
        c = model.config
        if c.num_classes > PIPELINE_NULL_CLASS:
            raise FlexDiTError(f"DiTPipeline passes class {PIPELINE_NULL_CLASS} as its null class, which is a real "
                               f"class of this DiT with {c.num_classes} classes; sample with flexdit's own sampler")
        if c.input_size[0] != c.input_size[1]:
            raise FlexDiTError(f"DiTPipeline samples square latents but this DiT runs at {c.input_size[0]}x"
                               f"{c.input_size[1]}; sample with flexdit's own sampler")
        super().__init__(model, dict(num_embeds_ada_norm=c.num_classes))

    def forward(self, hidden_states: torch.Tensor, timestep=None, class_labels: torch.Tensor | None = None,
                cross_attention_kwargs: dict | None = None, return_dict: bool = True):
        """hidden_states (B, C, H, W), class_labels (B,) (1000: the null class) -> (B, out_channels, H, W) as
        Transformer2DModelOutput or (sample,)."""
        # 1. Input
        if cross_attention_kwargs:
            raise FlexDiTError("flexdit's DiT takes no cross_attention_kwargs; drop them")
        if class_labels is None:
            raise FlexDiTError("DiT needs class_labels, one class id per sample")
        t = self._timesteps(timestep, hidden_states.shape[0])
        y = self._class_ids(torch.as_tensor(class_labels, device=self.device).reshape(-1))
        # 2. The model
        sample = self.model(hidden_states, t, y)
        # 3. Output
        return self._output(sample, return_dict)

    def _class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) pipeline labels -> (B,) our ids: the pipeline's null class becomes ours (row num_classes)."""
        is_null = labels == PIPELINE_NULL_CLASS
        if not bool(is_null.any()):
            return labels
        if not self.model.has_null_class:
            raise FlexDiTError(f"the pipeline passed class {PIPELINE_NULL_CLASS}, its null class for guidance, but "
                               "this DiT has none (class_dropout_prob 0); use guidance_scale=1")
        return torch.where(is_null, torch.full_like(labels, self.model.config.num_classes), labels)


class DiffusersLatte(DiffusersTransformer):
    """A caption Latte with the forward of diffusers' LatteTransformer3DModel (for LattePipeline)."""

    def __init__(self, model: Latte):
        c = model.config
        if c.conditioning != "caption":
            raise FlexDiTError(f"LattePipeline conditions on T5 captions, but this Latte is conditioning="
                               f"{c.conditioning!r}; sample it with flexdit's own sampler (flexdit sample)")
        if not c.learn_sigma:
            raise FlexDiTError("LattePipeline keeps only the first half of the output channels (learned sigma), "
                               "which would cut this noise-only Latte's prediction; sample it with flexdit's own "
                               "sampler (flexdit sample)")
        super().__init__(model, dict(caption_channels=c.caption_channels, cross_attention_dim=c.hidden_size,
                                     video_length=c.frames))

    def forward(self, hidden_states: torch.Tensor, timestep=None, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, enable_temporal_attentions: bool = True,
                return_dict: bool = True):
        """hidden_states (B, C, F, H, W), encoder_hidden_states (B, L, caption_channels), encoder_attention_mask
        (B, L) 1/0 or an additive bias (B, 1, L) / (B*F, 1, L) -> (B, out_channels, F, H, W) as
        Transformer2DModelOutput or (sample,)."""
        # 1. Input
        if not enable_temporal_attentions:
            raise FlexDiTError("flexdit's Latte always runs its temporal blocks, so enable_temporal_attentions=False "
                               "cannot be honoured; leave it True")
        if encoder_hidden_states is None:
            raise FlexDiTError("Latte needs encoder_hidden_states, the (B, L, caption_channels) T5 caption "
                               "embeddings; pass prompt_embeds to the pipeline")
        self._check_video(hidden_states)
        B, F = hidden_states.shape[0], hidden_states.shape[2]
        t = self._timesteps(timestep, B)
        caption_mask = self._caption_mask(encoder_attention_mask, B, F, encoder_hidden_states.shape[1])
        # 2. The model
        sample = self.model(hidden_states, t, caption=encoder_hidden_states, caption_mask=caption_mask)
        # 3. Output
        return self._output(sample, return_dict)

    def _check_video(self, hidden_states: torch.Tensor) -> None:
        """Name the pipeline arguments that set a video's shape when the latents do not fit the model."""
        c = self.model.config
        expected = (c.in_channels, c.frames, *c.input_size)
        if hidden_states.dim() != 5 or tuple(hidden_states.shape[1:]) != expected:
            H, W = c.input_size
            raise FlexDiTError(f"latents of shape {tuple(hidden_states.shape)} do not fit this Latte, which runs "
                               f"(B, {c.in_channels}, {c.frames}, {H}, {W}); pass video_length={c.frames}, "
                               f"height={8 * H} and width={8 * W} to LattePipeline")

    @staticmethod
    def _caption_mask(mask: torch.Tensor | None, B: int, F: int, L: int) -> torch.Tensor | None:
        """diffusers' encoder_attention_mask -> our (B, L) 1 = token, 0 = padding (None: every token)."""
        if mask is None:
            return None
        if tuple(mask.shape) == (B, L):
            return mask
        if mask.dim() != 3 or mask.shape[0] not in (B, B * F) or tuple(mask.shape[1:]) != (1, L):
            raise FlexDiTError(f"encoder_attention_mask of shape {tuple(mask.shape)} does not fit; give (B, L) = "
                               f"({B}, {L}) with 1 = token, 0 = padding, or an additive bias ({B}, 1, {L}) or "
                               f"({B * F}, 1, {L}) per frame")
        bias = mask.reshape(B, -1, L).float()  # (B, 1 or F, L)
        if not bool(((bias == 0) | (bias <= DISCARD_BIAS)).all()):
            raise FlexDiTError(f"encoder_attention_mask as a bias must hold 0 (keep) or {DISCARD_BIAS:g} (discard); "
                               "soft biases cannot be honoured, give a (B, L) 1/0 mask")
        keep = bias == 0  # (B, 1 or F, L)
        if not bool((keep == keep[:, :1]).all()):
            raise FlexDiTError("the per-frame encoder_attention_mask differs between frames of one video, whose "
                               "frames share one caption; give one (B, L) mask")
        return keep[:, 0].long()


ADAPTERS: dict[type[FlexDiTCore], type[DiffusersTransformer]] = {PixArt: DiffusersPixArt, DiT: DiffusersDiT,
                                                                 Latte: DiffusersLatte}


def to_diffusers(model: FlexDiTCore) -> DiffusersTransformer:
    """A module with diffusers' transformer interface around `model` (shared, not copied): a PixArt for
    PixArtAlphaPipeline(transformer=...), a DiT for DiTPipeline(transformer=...), a caption Latte for
    LattePipeline(transformer=...), dense or FlexDiT."""
    adapter = next((a for cls, a in ADAPTERS.items() if isinstance(model, cls)), None)
    if adapter is None:
        raise FlexDiTError(f"to_diffusers takes a flexdit DiT or PixArt model or a caption Latte, got "
                           f"{type(model).__name__}; load one with flexdit.load")
    if model.layout.has_sparse_tokens and model.density is None:
        raise FlexDiTError("this FlexDiT has no density schedule, and a pipeline cannot pass a grid; set one with "
                           "model.with_density(...) before to_diffusers")
    return adapter(model)
