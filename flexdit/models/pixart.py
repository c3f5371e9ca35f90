"""PixArt-alpha (text-to-image, adaLN-single + T5 caption cross-attention) on the FlexDiT core, any layout.

Structure and parameter names follow PixArt-alpha/PixArt-alpha's PixArt.py / PixArtMS.py, so the all-dense layout is
the original model and its `state_dict` maps by identity (the original's `pos_embed` buffer is not stored here: it
is recomputed from the config, as the original inference scripts do; PixArtMS files hold zeros there). A FlexDiT
layout changes the self-attention mixers exactly as in DiT (core.walk); every block still cross-attends to the
caption. `flexdit.models.from_dense.flexdit_from_dense` converts a dense PixArt as it converts a DiT.

Diffusers interop (PixArtTransformer2DModel): `config_from_diffusers`, `state_from_diffusers`, and the reverse
`config_to_diffusers`, `state_to_diffusers`.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from flexdit.errors import FlexDiTError
from flexdit.models.captions import (checked_caption, dropped_captions, expand_null, prepare_captions,
                                     with_null)
from flexdit.models.core import BackboneConfig, FlexDiTCore
from flexdit.models.dit import DEFAULT_DENSITY
from flexdit.models.keymap import state_from_pairs, state_to_pairs
from flexdit.models.layout import Layout
from flexdit.nn.density import Grid
from flexdit.nn.embed import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from flexdit.nn.pixart_blocks import CaptionEmbedder, PixArtBlock, T2IFinalLayer
from flexdit.schedule import Density, density_from_dict

# PixArt-XL/2, the family's one size; per resolution its latent side, position scale and micro-conditions.
PIXART_XL_2 = dict(hidden_size=1152, num_heads=16, patch_size=2)
PIXART_DEPTH = 28
# Every released model's positions span [0, 32): 512 px steps by 1, 1024 px by 0.5, 256 px by 2. The 256 value is
# the PixArt authors' own fix in diffusers (PR #6789: hub config, conversion table {256: 0.5, 512: 1, 1024: 2}).
RESOLUTIONS = {
    256: dict(input_size=(32, 32), interpolation_scale=0.5),
    512: dict(input_size=(64, 64), interpolation_scale=1.0),
    1024: dict(input_size=(128, 128), interpolation_scale=2.0, micro_conditions=True),  # PixArt-XL-2-1024-MS
}


@dataclass
class PixArtConfig(BackboneConfig):
    input_size: tuple[int, int] = (64, 64)  # latent (H, W)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-XXL
    caption_length: int = 120  # rows of the null caption; captions themselves may have any length
    learn_sigma: bool = True
    micro_conditions: bool = False  # the 1024-MS form: resolution and aspect-ratio embedders
    interpolation_scale: float = 1.0  # positions span [0, base_size / interpolation_scale) ("lewei_scale")
    base_size: int | None = None  # tokens per side the positions are normalised to; None: input_size[0] / patch
    learned_null_caption: bool = True  # False for diffusers checkpoints, which carry no y_embedding
    layout: tuple[str, ...] = field(default_factory=lambda: Layout.dense(PIXART_DEPTH).kinds)
    density: dict | None = None  # {"r_min", "r_max"} or {"grid": [h, w]}; required by sparse layouts

    def __post_init__(self):
        self._check_geometry()
        if self.micro_conditions and self.hidden_size % 3:
            raise FlexDiTError(f"hidden size {self.hidden_size} must be divisible by 3 for micro-conditions "
                               "(resolution h, w and aspect ratio take a third each); use micro_conditions=False")
        if self.caption_length < 1 or self.caption_channels < 1:
            raise FlexDiTError(f"caption_length and caption_channels must be positive, got {self.caption_length} "
                               f"and {self.caption_channels}")
        if not self.interpolation_scale > 0:
            raise FlexDiTError(f"interpolation_scale must be positive, got {self.interpolation_scale}")
        if self.base_size is None:
            self.base_size = self.input_size[0] // self.patch_size  # as PixArt and diffusers derive it
        if self.density is not None:
            density_from_dict(self.density)  # validates


def pixart_config(image_size: int = 512, layout: str | Layout | None = None, density: Density | None = None,
                  **overrides) -> PixArtConfig:
    """PixArt-XL/2 at 256, 512 or 1024 (MS) px. A density without a layout gives the default FlexDiT layout of
    depth 28, a sparse layout without a density the paper's r in [0.61, 0.86]; other fields override."""
    if image_size not in RESOLUTIONS:
        raise FlexDiTError(f"no PixArt-XL/2 config for {image_size} px; choose one of {sorted(RESOLUTIONS)}")
    if isinstance(layout, str):
        layout = Layout.parse(layout, PIXART_DEPTH)
    elif layout is None:
        layout = Layout.default_flexdit(PIXART_DEPTH) if density is not None else Layout.dense(PIXART_DEPTH)
    if density is not None and not layout.has_sparse_tokens:
        raise FlexDiTError(f"a density or grid was given for the dense layout {layout}; drop --density/--grid, or "
                           "give a FlexDiT layout (--layout default)")
    if density is None and layout.has_sparse_tokens:
        density = DEFAULT_DENSITY
    config = {**PIXART_XL_2, **RESOLUTIONS[image_size], "layout": layout.kinds,
              "density": density.to_dict() if density else None}
    config.update(overrides)
    return PixArtConfig(**config)


class PixArt(FlexDiTCore):
    """Text-conditional diffusion transformer (PixArt-alpha) over a token grid, with any layout of dense, pooling and
    sparse blocks: adaLN-single on the timestep (+ size micro-conditions), cross-attention to T5 caption tokens."""
    FAMILY = "pixart"
    GUIDED_CHANNELS = None  # every noise channel is guided, as diffusers' pipeline and PixArt's DPM-Solver path do

    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self._init_core(Layout(config.layout), density_from_dict(config.density), config.token_grid)
        self.in_channels, self.out_channels, self.patch_size = config.in_channels, config.out_channels, p

        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)  # [cos | sin] of t / 10000^(k/128), as PixArt and diffusers
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))  # adaLN-single, shared by all blocks
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.caption_length,
                                          config.learned_null_caption)
        # Size micro-conditions (1024-MS): embed h, w and h/w with the timestep sinusoid, D/3 each.
        self.csize_embedder = TimestepEmbedder(D // 3) if config.micro_conditions else None
        self.ar_embedder = TimestepEmbedder(D // 3) if config.micro_conditions else None
        positions = sincos_pos_embed_2d(D, *self.token_grid, config.base_size, config.interpolation_scale)
        self.register_buffer("pos_embed", positions[None], persistent=False)  # (1, N, D), from the config
        self.blocks = nn.ModuleList([PixArtBlock(kind, D, config.num_heads, config.mlp_ratio)
                                     for kind in self.layout.kinds])
        self.final_layer = T2IFinalLayer(D, p, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt's initialisation: xavier linears, small embedder MLPs, randn/sqrt(D) scale-shift tables, zero
        caption cross-attention output and output layer (the patch conv keeps PyTorch's default bias, as there).
        Recovery merges start at W1 = 0, W2 = I."""
        D = self.config.hidden_size
        self._xavier_init()
        small = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                 self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        for embedder in (self.csize_embedder, self.ar_embedder):
            if embedder is not None:
                small += [embedder.mlp[0], embedder.mlp[2]]
        for layer in small:
            nn.init.normal_(layer.weight, std=0.02)
        with torch.no_grad():
            for table in [block.scale_shift_table for block in self.blocks] + [self.final_layer.scale_shift_table]:
                table.copy_(torch.randn(table.shape) / D ** 0.5)
            if self.y_embedder.y_embedding is not None:
                null = self.y_embedder.y_embedding
                null.copy_(torch.randn(null.shape) / null.shape[1] ** 0.5)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if block.merge is not None:
                block.merge.reset_to_identity()
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # --- guidance -----------------------------------------------------------------------------------
    def null_caption(self, batch_size: int) -> torch.Tensor:
        """(B, caption_length, caption_channels): the learned null caption, the unconditional input of the
        original PixArt's guidance (use it without a mask)."""
        null = self.y_embedder.y_embedding
        if null is None:
            raise FlexDiTError("this PixArt has no learned null caption (diffusers checkpoints carry none); "
                               "use the T5 encoding of the empty prompt with its mask, as diffusers' pipeline does")
        return null[None].expand(batch_size, *null.shape)

    @property
    def condition_kind(self) -> str:
        return "caption"

    @property
    def can_guide(self) -> bool:
        return self.config.learned_null_caption  # without it, guidance needs a negative caption per sample

    def prepare_condition(self, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Captions -> forward()'s conditioning, batch first: "caption" (B, L, C) and optional "caption_mask" (B, L);
        optional "negative_caption" / "negative_caption_mask" (B, L', C) / (B, L'), the unconditional input of
        guidance instead of the learned null caption (e.g. T5 of ""); the 1024-MS form's "resolution" (B, 2) and
        "aspect_ratio" (B,) default to the model's own size (latent side x 8 pixels)."""
        out = prepare_captions(condition, self.config.caption_channels, "a PixArt", ("resolution", "aspect_ratio"))
        B = out["caption"].shape[0]
        if self.config.micro_conditions:
            h, w = self.config.input_size
            out.setdefault("resolution", torch.tensor([[8.0 * h, 8.0 * w]]).expand(B, 2))
            out.setdefault("aspect_ratio", torch.full((B,), h / w))
        return out

    def guidance_condition(self, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditional batch followed by its unconditional twin, for guidance: the negative caption if given,
        else the learned null caption; captions of different lengths are padded under their masks."""
        caption = condition["caption"], condition.get("caption_mask")
        if "negative_caption" in condition:
            null = condition["negative_caption"], condition.get("negative_caption_mask")
        else:
            null = self.null_caption(caption[0].shape[0]).to(caption[0]), None
        doubled = with_null(caption, null)
        doubled.update({k: torch.cat([condition[k]] * 2) for k in ("resolution", "aspect_ratio") if k in condition})
        return doubled

    def dropped_condition(self, condition: dict[str, torch.Tensor], drop: torch.Tensor,
                          null: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Training's caption dropout: where drop (B,) is True the caption becomes the null caption, the learned one
        (as PixArt-alpha trains) or `null` = (embedding (L', C), mask (L',)), e.g. T5 of the empty prompt for a
        model without one; padded under the masks to a common length."""
        caption = condition["caption"], condition.get("caption_mask")
        if null is None:
            nulls = self.null_caption(caption[0].shape[0]).to(caption[0]), None
        else:
            nulls = expand_null(null, caption[0])
        return {**condition, **dropped_captions(caption, nulls, drop)}

    def example_condition(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments of forward() for `batch` samples (benchmarks, memory probes): a random
        caption of caption_length tokens (120: the length the FLOPs count), 1024 px micro-conditions."""
        c = self.config
        condition = {"caption": torch.randn(batch, c.caption_length, c.caption_channels, generator=generator)}
        if c.micro_conditions:
            side = 8.0 * c.input_size[0]
            condition.update(resolution=torch.full((batch, 2), side), aspect_ratio=torch.ones(batch))
        return condition

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor,
                caption_mask: torch.Tensor | None = None, resolution: torch.Tensor | None = None,
                aspect_ratio: torch.Tensor | None = None, grid: Grid | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) integer timesteps 0..999, caption (B, L, caption_channels) T5 embeddings of
        any length L, caption_mask (B, L) 1 = token, 0 = padding (None: all tokens); for the 1024-MS form
        resolution (B, 2) [height, width] in pixels and aspect_ratio (B,) or (B, 1) height / width.
        -> (B, out_channels, H, W).

        A FlexDiT runs its SDTMs at `grid` if given, else at the density's grid for each sample's timestep.
        """
        key_mask = self._check_inputs(x, t, caption, caption_mask, resolution, aspect_ratio)
        if aspect_ratio is not None:
            aspect_ratio = aspect_ratio.reshape(-1, 1)
        return self.dispatch((x, t, caption, key_mask, resolution, aspect_ratio), t, grid)

    def forward_grid(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None,
                     resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None,
                     sparse_grid: Grid | None) -> torch.Tensor:
        """The forward pass at one sparse grid (static shapes: compiles once per grid); caption_mask is bool."""
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        if self.csize_embedder is not None:
            c = c + self._micro_conditions(resolution, aspect_ratio)
        t0 = self.t_block(c)  # (B, 6D), computed once for all blocks
        y = self.y_embedder(caption)  # (B, L, D)
        tokens = self.walk(tokens, sparse_grid,
                           lambda block, h, context, grids: block(h, t0, y, caption_mask, context, grids))
        return unpatchify(self.final_layer(tokens, c), self.token_grid, self.patch_size, self.out_channels)

    def _micro_conditions(self, resolution: torch.Tensor, aspect_ratio: torch.Tensor) -> torch.Tensor:
        """(B, 2) [h, w] and (B, 1) h/w -> (B, D): [emb(h) | emb(w) | emb(h/w)], each D/3."""
        B = resolution.shape[0]
        size = self.csize_embedder(resolution.flatten()).reshape(B, -1)  # (B, 2D/3)
        ratio = self.ar_embedder(aspect_ratio.flatten()).reshape(B, -1)  # (B, D/3)
        return torch.cat([size, ratio], dim=1)

    def _check_inputs(self, x, t, caption, caption_mask, resolution, aspect_ratio) -> torch.Tensor | None:
        """Raise on inputs that do not fit; return the caption mask as bool (B, L), None when nothing is padded."""
        expected = (self.in_channels, *self.config.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise FlexDiTError(f"input of shape {tuple(x.shape)} does not fit the model; expected "
                               f"(B, {expected[0]}, {expected[1]}, {expected[2]})")
        B = x.shape[0]
        if t.shape != (B,):
            raise FlexDiTError(f"t must have shape ({B},), got {tuple(t.shape)}")
        key_mask = checked_caption(caption, caption_mask, B, self.config.caption_channels)
        self._check_micro_conditions(B, resolution, aspect_ratio)
        return key_mask

    def _check_micro_conditions(self, B: int, resolution, aspect_ratio) -> None:
        if not self.config.micro_conditions:
            if resolution is not None or aspect_ratio is not None:
                raise FlexDiTError("this PixArt has no micro-conditions (only the 1024-MS form does); "
                                   "drop resolution and aspect_ratio")
            return
        if resolution is None or aspect_ratio is None:
            raise FlexDiTError("this PixArt (1024-MS form) needs resolution (B, 2) [height, width] in pixels and "
                               "aspect_ratio (B,) height / width")
        if tuple(resolution.shape) != (B, 2) or aspect_ratio.numel() != B:
            raise FlexDiTError(f"resolution must have shape ({B}, 2) and aspect_ratio ({B},), got "
                               f"{tuple(resolution.shape)} and {tuple(aspect_ratio.shape)}")


# --- diffusers interop ------------------------------------------------------------------------------
# Options of PixArtTransformer2DModel that change the architecture, and the only values our model implements.
_DIFFUSERS_FIXED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False, "norm_eps": 1e-6, "attention_type": "default"}
# Its constructor's defaults, for fields a config.json leaves out.
_DIFFUSERS_DEFAULTS = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                       "num_layers": 28, "sample_size": 128, "patch_size": 2, "caption_channels": None,
                       "cross_attention_dim": 1152, "interpolation_scale": None, "use_additional_conditions": None}


def config_from_diffusers(config: dict) -> PixArtConfig:
    """Our dense config for a diffusers PixArtTransformer2DModel config (its config.json as a dict)."""
    for key, value in _DIFFUSERS_FIXED.items():
        if config.get(key, value) != value:
            raise FlexDiTError(f"diffusers PixArt option {key}={config[key]!r} is not supported (flexdit implements "
                               f"{key}={value!r}); use a PixArt-alpha checkpoint")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_channels"] is None:
        raise FlexDiTError("the diffusers PixArt config has no caption_channels; a PixArt-alpha transformer "
                           "projects T5 captions (caption_channels 4096)")
    if c["cross_attention_dim"] not in (None, hidden):
        raise FlexDiTError(f"diffusers PixArt cross_attention_dim {c['cross_attention_dim']} differs from the hidden "
                           f"size {hidden}; PixArt-alpha cross-attends to projected captions of the hidden size")
    in_ch, out_ch = c["in_channels"], c["out_channels"] or c["in_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise FlexDiTError(f"diffusers PixArt out_channels {out_ch} is neither in_channels {in_ch} nor twice it "
                           "(learned sigma)")
    size, scale, micro = c["sample_size"], c["interpolation_scale"], c["use_additional_conditions"]
    return PixArtConfig(
        input_size=(size, size), patch_size=c["patch_size"], in_channels=in_ch, hidden_size=hidden,
        num_heads=c["num_attention_heads"], caption_channels=c["caption_channels"], learn_sigma=out_ch == 2 * in_ch,
        micro_conditions=size == 128 if micro is None else bool(micro),
        interpolation_scale=float(max(size // 64, 1) if scale is None else scale),
        learned_null_caption=False, layout=Layout.dense(c["num_layers"]).kinds)


def config_to_diffusers(config: PixArtConfig) -> dict:
    """The PixArtTransformer2DModel constructor arguments of a dense PixArt (its sample_size fixes the position
    base: sample_size = base_size * patch_size)."""
    if not Layout(config.layout).is_dense or config.mlp_ratio != 4.0:
        raise FlexDiTError("diffusers' PixArtTransformer2DModel holds only the dense PixArt with MLP ratio 4; "
                           "convert the dense model (config.dense())")
    return {**_DIFFUSERS_FIXED, "num_attention_heads": config.num_heads,
            "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "num_layers": config.depth,
            "sample_size": config.base_size * config.patch_size, "patch_size": config.patch_size,
            "caption_channels": config.caption_channels, "cross_attention_dim": config.hidden_size,
            "interpolation_scale": config.interpolation_scale, "use_additional_conditions": config.micro_conditions,
            "num_embeds_ada_norm": 1000}


# (our module, the diffusers modules it concatenates along dim 0): the layers outside the blocks, and a block's
# self-attention + MLP and caption cross-attention (diffusers' Latte-1 shares all of them)
DIFFUSERS_TOP = (("x_embedder.proj", ("pos_embed.proj",)),
                 ("t_embedder.mlp.0", ("adaln_single.emb.timestep_embedder.linear_1",)),
                 ("t_embedder.mlp.2", ("adaln_single.emb.timestep_embedder.linear_2",)),
                 ("t_block.1", ("adaln_single.linear",)),
                 ("y_embedder.y_proj.fc1", ("caption_projection.linear_1",)),
                 ("y_embedder.y_proj.fc2", ("caption_projection.linear_2",)),
                 ("final_layer.linear", ("proj_out",)))
DIFFUSERS_SELF_ATTENTION = (("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                            ("attn.proj", ("attn1.to_out.0",)), ("mlp.fc1", ("ff.net.0.proj",)),
                            ("mlp.fc2", ("ff.net.2",)))
DIFFUSERS_CROSS_ATTENTION = (("cross_attn.q_linear", ("attn2.to_q",)),
                             ("cross_attn.kv_linear", ("attn2.to_k", "attn2.to_v")),
                             ("cross_attn.proj", ("attn2.to_out.0",)))


def _key_pairs(config: PixArtConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our key, the diffusers keys it concatenates along dim 0) for every tensor of the dense model."""
    modules = list(DIFFUSERS_TOP)
    if config.micro_conditions:
        for ours, theirs in (("csize_embedder", "resolution_embedder"), ("ar_embedder", "aspect_ratio_embedder")):
            modules += [(f"{ours}.mlp.{i}", (f"adaln_single.emb.{theirs}.linear_{j}",)) for i, j in ((0, 1), (2, 2))]
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        modules += [(ours + o, tuple(theirs + t for t in ts))
                    for o, ts in DIFFUSERS_SELF_ATTENTION + DIFFUSERS_CROSS_ATTENTION]
    pairs = [(f"{o}.{p}", tuple(f"{t}.{p}" for t in ts)) for o, ts in modules for p in ("weight", "bias")]
    tables = [("final_layer.scale_shift_table", ("scale_shift_table",))]
    tables += [(f"blocks.{i}.scale_shift_table", (f"transformer_blocks.{i}.scale_shift_table",))
               for i in range(config.depth)]
    return pairs + tables


def state_from_diffusers(state: dict[str, torch.Tensor], config: PixArtConfig) -> dict[str, torch.Tensor]:
    """A diffusers PixArtTransformer2DModel state dict -> ours for `config` (from config_from_diffusers)."""
    return state_from_pairs(state, _key_pairs(config), "diffusers PixArt")


def state_to_diffusers(state: dict[str, torch.Tensor], config: PixArtConfig) -> dict[str, torch.Tensor]:
    """Our dense state dict -> a diffusers PixArtTransformer2DModel's (the null caption has no place there)."""
    config_to_diffusers(config)  # validates: dense, MLP ratio 4
    return state_to_pairs(state, _key_pairs(config))
