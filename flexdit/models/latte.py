"""Latte (video diffusion transformer: spatial and temporal blocks in turn) on the FlexDiT core, any layout.

Two forms, one LatteConfig (`conditioning`):
- "none" / "class": the original Vchitect/Latte (models/latte.py; extras 1 and 2). DiT adaLN-Zero blocks on
  c = t (+ class), `temp_embed` added before the first temporal block (also at F = 1, as there), DiT's final layer
  on c. Its files interleave `blocks.{2i}` (spatial) and `blocks.{2i+1}` (temporal): `config_from_original`,
  `state_from_original`. The text form (extras 78) is not supported.
- "caption": diffusers' LatteTransformer3DModel (Latte-1). Spatial blocks are PixArt blocks with T5 caption
  cross-attention, temporal blocks adaLN-single self-attention + MLP with their own tables, the frame positions are
  added before the first temporal block only when F > 1, PixArt's final layer. `config_from_diffusers`,
  `state_from_diffusers` and the reverse `config_to_diffusers`, `state_to_diffusers`.

Design:
- Videos are (B, C, F, H, W) in and out, as in diffusers (the original takes (B, F, C, H, W); only its state maps).
  F is the config's `frames`: the frame positions and the temporal blocks are trained for it.
- The layout has one entry per spatial/temporal pair (Latte-XL/2: 14, Latte-1: 28). An entry's kind (dense, pool,
  gen, sparse, recover) is the pair's spatial block's; the temporal block always attends over the F frames at every
  token position the spatial stage holds, so inside an SDTM both get cheaper (flexdit.nn.latte_blocks). The core's
  walk runs the pairs on (B*F, N, D): pooling and upsampling act per frame.
- Our names: the spatial block's parameters directly under `blocks.{i}.` (DiT's / PixArt's block names), the
  temporal block's under `blocks.{i}.temporal.`; so flexdit_from_dense converts a dense Latte unchanged.
- adaLN (and the caption's keys and values) is computed once per sample and broadcast; measure/flops counts it so.
- Default FlexDiT layouts per pair depth (`default_layout`, LATTE_LAYOUTS: 28, 24, 14, 12, 6, and 3-4 for tiny
  models): DiT's with every SDTM's dense pair made sparse, so that Latte-XL/2 saves over half its FLOPs.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from flexdit.errors import FlexDiTError
from flexdit.models.captions import checked_caption, dropped_captions, expand_null, prepare_captions, with_null
from flexdit.models.core import BackboneConfig, FlexDiTCore
from flexdit.models.dit import DEFAULT_DENSITY
from flexdit.models.keymap import state_from_pairs, state_to_pairs
from flexdit.models.layout import Layout
from flexdit.models.pixart import DIFFUSERS_CROSS_ATTENTION, DIFFUSERS_SELF_ATTENTION, DIFFUSERS_TOP
from flexdit.nn.blocks import FinalLayer
from flexdit.nn.density import Grid
from flexdit.nn.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from flexdit.nn.latte_blocks import LatteCaptionPair, LattePair, sincos_pos_embed_1d
from flexdit.nn.pixart_blocks import CaptionEmbedder, T2IFinalLayer
from flexdit.schedule import Density, density_from_dict

CONDITIONINGS = ("none", "class", "caption")
# Standard sizes: pairs (the original's depth / 2), hidden size, heads (Vchitect/Latte models/latte.py).
SIZES = {"S": (6, 384, 6), "B": (6, 768, 12), "L": (12, 1024, 16), "XL": (14, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in SIZES.values()}
LATTE_1_PAIRS = 28  # diffusers' Latte-1 (maxin-cn/Latte-1): XL/2 width with 28 + 28 blocks
UCF101_CLASSES = 101  # the released class-conditional model's labels
# Default FlexDiT layouts per pair depth. The paper's SDTM [gen, 3 sparse, recover, dense] saves only ~42% here: pool,
# recover and dense pairs keep full-cost temporal blocks. So each is DiT's default (28: the paper's; 24, 12: ours)
# with every SDTM's dense pair made sparse, 14 (Latte-XL) and 6 (Latte-S/B) those of 28 and 12 halved; 3-4 for tests.
# Latte-XL/2, 16 x 256 px, r in [0.61, 0.86] over DDPM-250: 910.4 G of 1862.8 (-51.1%); Latte-1 at 256 px: -50.9%.
LATTE_LAYOUTS = {28: "2+4x1-4-1-0+2", 24: "2+4x1-3-1-0+2", 14: "1+2x1-4-1-0+1", 12: "2+2x1-3-1-0+0",
                 6: "1+1x1-3-1-0+0", 4: "1+1x1-1-1-0+0", 3: "1+1x1-0-1-0+0"}


@dataclass
class LatteConfig(BackboneConfig):
    input_size: tuple[int, int] = (32, 32)  # latent (H, W) of one frame
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    frames: int = 16
    conditioning: str = "none"  # "none" / "class": the original Latte; "caption": diffusers' Latte-1
    num_classes: int | None = None  # "class" only
    class_dropout_prob: float = 0.1  # "class": > 0 adds the null class (row num_classes) for guidance
    caption_channels: int = 4096  # "caption": T5-XXL
    caption_length: int = 120  # "caption": the token count FLOPs and example captions use
    interpolation_scale: float = 1.0  # "caption": positions span [0, grid / scale), as diffusers' PatchEmbed
    learn_sigma: bool = True
    layout: tuple[str, ...] = field(default_factory=lambda: Layout.dense(SIZES["XL"][0]).kinds)  # one kind a pair
    density: dict | None = None  # {"r_min", "r_max"} or {"grid": [h, w]}; required by sparse layouts

    def __post_init__(self):
        self._check_geometry()
        if self.conditioning not in CONDITIONINGS:
            raise FlexDiTError(f"unknown Latte conditioning {self.conditioning!r}; choose {', '.join(CONDITIONINGS)}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise FlexDiTError(f"frames must be a positive integer, got {self.frames!r}")
        if self.conditioning == "class":
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
                raise FlexDiTError(f"a class-conditional Latte needs num_classes, a positive integer; got "
                                   f"{self.num_classes!r}")
        elif self.num_classes is not None:
            raise FlexDiTError(f"num_classes applies to class-conditional Latte models only, not "
                               f"conditioning={self.conditioning!r}; drop it")
        if self.conditioning == "caption":
            if self.caption_length < 1 or self.caption_channels < 1:
                raise FlexDiTError(f"caption_length and caption_channels must be positive, got {self.caption_length} "
                                   f"and {self.caption_channels}")
            if not self.interpolation_scale > 0:
                raise FlexDiTError(f"interpolation_scale must be positive, got {self.interpolation_scale}")
        if self.density is not None:
            density_from_dict(self.density)  # validates

    @property
    def learned_null_caption(self) -> bool:
        """Latte-1 carries no learned null caption: guidance and caption dropout use T5 of the empty prompt."""
        return False


def default_layout(pairs: int) -> Layout:
    """The default FlexDiT layout of a Latte with `pairs` spatial/temporal pairs (LATTE_LAYOUTS)."""
    if pairs not in LATTE_LAYOUTS:
        raise FlexDiTError(f"no default FlexDiT layout for a Latte of {pairs} pairs (defaults exist for "
                           f"{sorted(LATTE_LAYOUTS)}); give one, e.g. --layout 1+2x1-4-1-0+1")
    return Layout.parse(LATTE_LAYOUTS[pairs])


def parse_latte_name(name: str) -> tuple[bool, int, int, int, int, str | None]:
    """'Latte-XL/2' -> (flex, pairs, hidden, heads, patch, conditioning or None); 'FlexDiT-Latte-...' is the
    default FlexDiT layout; 'Latte-1' is diffusers' text-to-video Latte-1 (XL/2 width, 28 pairs, captions)."""
    flex = name.startswith("FlexDiT-")
    base = name[len("FlexDiT-"):] if flex else name
    if base == "Latte-1":
        _, hidden, heads = SIZES["XL"]
        return flex, LATTE_1_PAIRS, hidden, heads, 2, "caption"
    size, _, patch = base.removeprefix("Latte-").partition("/")
    if not base.startswith("Latte-") or size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        names = ", ".join(f"Latte-{s}/{p}" for s in SIZES for p in PATCH_SIZES)
        raise FlexDiTError(f"unknown Latte model {name!r}; choose Latte-1 or one of {names} (FlexDiT-Latte-... for "
                           "the default FlexDiT layout)")
    pairs, hidden, heads = SIZES[size]
    return flex, pairs, hidden, heads, int(patch), None


def latte_config(name: str = "Latte-XL/2", frames: int = 16, image_size: int = 256, layout: str | Layout | None = None,
                 density: Density | None = None, conditioning: str = "none", num_classes: int | None = None,
                 depth: int | None = None, **overrides) -> LatteConfig:
    """Config of a standard Latte at `frames` x `image_size` px (latent = image_size / 8). FlexDiT-* names, and any
    name given a density, take default_layout(pairs) and, unless given, the paper's r in [0.61, 0.86]. 'Latte-1'
    is the caption form with 28 pairs (its native size is 512 px). conditioning="class" defaults to UCF-101's 101
    classes; `depth` (pairs) and other LatteConfig fields override the size."""
    flex, pairs, hidden, heads, patch, named_conditioning = parse_latte_name(name)
    conditioning = named_conditioning or conditioning
    pairs = depth or pairs
    if layout is None:
        layout = default_layout(pairs) if flex or density is not None else Layout.dense(pairs)
    elif isinstance(layout, str):
        layout = default_layout(pairs) if layout.strip() == "default" else Layout.parse(layout, pairs)
    if len(layout) != pairs:
        raise FlexDiTError(f"layout {layout} has {len(layout)} entries but {name} has {pairs} pairs; give one entry "
                           "per spatial/temporal pair")
    if density is not None and not layout.has_sparse_tokens:
        raise FlexDiTError(f"a density or grid was given for the dense layout {layout}; drop --density/--grid, or "
                           "give a FlexDiT layout (--layout default)")
    if density is None and layout.has_sparse_tokens:
        density = DEFAULT_DENSITY
    latent = image_size // 8
    config = dict(input_size=(latent, latent), patch_size=patch, hidden_size=hidden, num_heads=heads, frames=frames,
                  conditioning=conditioning, layout=layout.kinds, density=density.to_dict() if density else None)
    if conditioning == "class":
        config["num_classes"] = UCF101_CLASSES if num_classes is None else num_classes
    elif num_classes is not None:
        config["num_classes"] = num_classes  # refused by LatteConfig
    if conditioning == "caption":
        config["interpolation_scale"] = float(max(latent // 64, 1))  # diffusers' rule for its sample_size
    config.update(overrides)
    return LatteConfig(**config)


def positions(config: LatteConfig) -> dict[str, torch.Tensor]:
    """The fixed sin-cos tables: "pos_embed" (1, N, D) over a frame's grid (integer positions; the caption form
    spans [0, grid / interpolation_scale) as diffusers' PatchEmbed) and "temp_embed" (1, F, D) over the frames."""
    grid, D = config.token_grid, config.hidden_size
    scaling = (grid[0], config.interpolation_scale) if config.conditioning == "caption" else ()
    return {"pos_embed": sincos_pos_embed_2d(D, *grid, *scaling)[None],
            "temp_embed": sincos_pos_embed_1d(D, config.frames)[None]}


class Latte(FlexDiTCore):
    """Video diffusion transformer (Latte) over F frames of a token grid, with one layout entry per
    spatial/temporal pair: unconditional, class-conditional (adaLN-Zero) or caption-conditional (adaLN-single and
    T5 cross-attention in the spatial blocks)."""
    FAMILY = "latte"
    default_layout = staticmethod(default_layout)  # the FlexDiT layout of a pair depth, for conversions

    def __init__(self, config: LatteConfig):
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self._init_core(Layout(config.layout), density_from_dict(config.density), config.token_grid)
        self.in_channels, self.out_channels, self.patch_size = config.in_channels, config.out_channels, p
        self.frames, self.conditioning = config.frames, config.conditioning
        captioned = config.conditioning == "caption"

        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)  # [cos | sin] of t / 10000^(k/128): the original's and diffusers'
        if config.conditioning == "class":
            self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        elif captioned:
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))  # adaLN-single, shared
            self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.caption_length,
                                              learned_null_caption=False)
        for name, table in positions(config).items():  # rebuilt from the config, not stored
            self.register_buffer(name, table, persistent=False)
        # diffusers adds the frame positions only to videos of more than one frame; the original always.
        self.adds_frame_positions = not captioned or config.frames > 1
        pair = LatteCaptionPair if captioned else LattePair
        self.blocks = nn.ModuleList([pair(kind, D, config.num_heads, config.mlp_ratio) for kind in self.layout.kinds])
        self.final_layer = T2IFinalLayer(D, p, config.out_channels) if captioned else \
            FinalLayer(D, p, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's initialisation (DiT's: xavier linears, adaLN-Zero, zero output layer) or, for captions,
        PixArt's (randn/sqrt(D) tables, zero caption cross-attention output). Recovery merges start at W1 = 0,
        W2 = I."""
        D = self.config.hidden_size
        self._xavier_init()
        nn.init.zeros_(self.x_embedder.proj.bias)
        small = [self.t_embedder.mlp[0], self.t_embedder.mlp[2]]
        if self.conditioning == "caption":
            small += [self.t_block[1], self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
            with torch.no_grad():
                tables = [self.final_layer.scale_shift_table]
                for block in self.blocks:
                    tables += [block.scale_shift_table, block.temporal.scale_shift_table]
                for table in tables:
                    table.copy_(torch.randn(table.shape) / D ** 0.5)
            zeroed = [block.cross_attn.proj for block in self.blocks] + [self.final_layer.linear]
        else:
            if self.conditioning == "class":
                nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
            zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
            for block in self.blocks:
                zeroed += [block.adaLN_modulation[-1], block.temporal.adaLN_modulation[-1]]
        for layer in small:
            nn.init.normal_(layer.weight, std=0.02)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for block in self.blocks:
            if block.merge is not None:
                block.merge.reset_to_identity()

    # --- description ------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's input (= noise) shape without the batch: (C, F, H, W)."""
        return (self.in_channels, self.frames, *self.config.input_size)

    @property
    def GUIDED_CHANNELS(self) -> int | None:
        """Noise channels classifier-free guidance acts on: the original guides 4 (its forward_with_cfg), diffusers'
        pipeline all (None)."""
        return None if self.conditioning == "caption" else 4

    @property
    def has_null_class(self) -> bool:
        return self.conditioning == "class" and self.y_embedder.has_null_class

    @property
    def condition_kind(self) -> str:
        return self.conditioning

    @property
    def can_guide(self) -> bool:
        """Guidance without a negative caption: class models with a null class (caption models need one)."""
        return self.has_null_class

    # --- conditioning for the sampler and trainer ---------------------------------------------------
    def prepare_condition(self, condition) -> dict[str, torch.Tensor]:
        """forward()'s conditioning, batch first. Class models: class ids (or {"y": ids}) -> {"y"}. Caption models:
        {"caption" (B, L, C), "caption_mask" (B, L)?, "negative_caption"?, "negative_caption_mask"?}. Unconditional
        models: a number of videos, or ids whose count only matters -> {"y": zeros (B,)}, a placeholder forward()
        ignores as the original does."""
        if self.conditioning == "caption":
            return self._prepare_captions(condition)
        if isinstance(condition, int) and not isinstance(condition, bool) and self.conditioning == "none":
            return {"y": torch.zeros(condition, dtype=torch.long)}
        labels = condition["y"] if isinstance(condition, dict) else condition
        ids = [int(c) for c in (labels.flatten().tolist() if isinstance(labels, torch.Tensor) else labels)]
        if self.conditioning == "none":
            return {"y": torch.zeros(len(ids), dtype=torch.long)}
        n = self.config.num_classes
        bad = [c for c in ids if not 0 <= c < n]
        if bad:
            raise FlexDiTError(f"unknown class id {bad[0]}; this model has classes 0..{n - 1}")
        return {"y": torch.tensor(ids, dtype=torch.long)}

    def _prepare_captions(self, condition) -> dict[str, torch.Tensor]:
        return prepare_captions(condition, self.config.caption_channels, "a caption Latte")

    def guidance_condition(self, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditional batch followed by its unconditional twin: the null class, or the negative caption
        (captions of different lengths padded under their masks)."""
        if self.conditioning == "class":
            y = condition["y"]
            return {"y": torch.cat([y, torch.full_like(y, self.config.num_classes)])}
        if self.conditioning == "none" or "negative_caption" not in condition:
            raise FlexDiTError("this Latte cannot guide: it has no null class or null caption; give a negative "
                               "caption (T5 of the empty prompt) to a caption model, or use --cfg 1")
        return with_null((condition["caption"], condition.get("caption_mask")),
                         (condition["negative_caption"], condition.get("negative_caption_mask")))

    def dropped_condition(self, condition: dict[str, torch.Tensor], drop: torch.Tensor,
                          null: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Training's condition dropout where drop (B,) is True: the null class; for captions `null` = (embedding
        (L', C), mask (L',)), e.g. T5 of the empty prompt; an unconditional model keeps its condition."""
        if self.conditioning == "none":
            return condition
        if self.conditioning == "class":
            return {"y": torch.where(drop, self.config.num_classes, condition["y"])}
        if null is None:
            raise FlexDiTError("caption dropout of a Latte needs a null caption (T5 of the empty prompt): Latte-1 "
                               "carries no learned one")
        caption = condition["caption"], condition.get("caption_mask")
        return {**condition, **dropped_captions(caption, expand_null(null, caption[0]), drop)}

    def example_condition(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments of forward() for `batch` samples (benchmarks, memory probes); captions of
        caption_length tokens (the length the FLOPs count)."""
        c = self.config
        if c.conditioning == "class":
            return {"y": torch.randint(0, c.num_classes, (batch,), generator=generator)}
        if c.conditioning == "caption":
            return {"caption": torch.randn(batch, c.caption_length, c.caption_channels, generator=generator)}
        return {}

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                caption: torch.Tensor | None = None, caption_mask: torch.Tensor | None = None,
                grid: Grid | None = None) -> torch.Tensor:
        """x (B, C, F, H, W) latent videos, t (B,) integer timesteps 0..999 -> (B, out_channels, F, H, W).
        Class models take y (B,) class ids (unconditional ones ignore y, as the original does); caption models take
        caption (B, L, caption_channels) T5 embeddings and caption_mask (B, L) 1 = token, 0 = padding (None: all).

        A FlexDiT runs its SDTMs at `grid` if given, else at the density's grid for each sample's timestep.
        """
        key_mask = self._check_inputs(x, t, y, caption, caption_mask)
        if self.conditioning != "class":
            y = None
        return self.dispatch((x, t, y, caption, key_mask), t, grid)

    def forward_grid(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, caption: torch.Tensor | None,
                     caption_mask: torch.Tensor | None, sparse_grid: Grid | None) -> torch.Tensor:
        """The forward pass at one sparse grid (static shapes: compiles once per grid)."""
        B, C, F, H, W = x.shape
        tokens = self.x_embedder(x.transpose(1, 2).reshape(B * F, C, H, W)) + self.pos_embed  # (B*F, N, D)
        c = self.t_embedder(t)  # (B, D)
        first = self.blocks[0]
        positions = self.temp_embed if self.adds_frame_positions else None

        def frame_positions(block: nn.Module) -> torch.Tensor | None:
            return positions if block is first else None  # before the first temporal block only

        if self.conditioning == "caption":
            t0 = self.t_block(c)  # (B, 6D), shared by every block
            y_tokens = self.y_embedder(caption)  # (B, L, D), once per sample
            tokens = self.walk(tokens, sparse_grid, lambda block, h, context, grids: block(
                h, t0, y_tokens, caption_mask, frame_positions(block), context, grids))
        else:
            if y is not None:
                c = c + self.y_embedder(y)
            tokens = self.walk(tokens, sparse_grid, lambda block, h, context, grids: block(
                h, c, frame_positions(block), context, grids))
        N = tokens.shape[1]
        out = self.final_layer(tokens.reshape(B, F * N, -1), c)  # modulated once per sample
        frames = unpatchify(out.reshape(B * F, N, -1), self.token_grid, self.patch_size, self.out_channels)
        return frames.reshape(B, F, self.out_channels, H, W).transpose(1, 2)  # (B, C_out, F, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                         cfg_scale: float = 7.0, guided_channels: int | None | str = "model",
                         caption: torch.Tensor | None = None, caption_mask: torch.Tensor | None = None,
                         grid: Grid | None = None) -> torch.Tensor:
        """Classifier-free guidance with the original Latte's calling convention: x and the conditioning hold the
        conditional half then the unconditional half (the null class, or a negative caption); only the first half
        of x is used. guided_channels "model" guides GUIDED_CHANNELS (the original: 4 noise channels), None all
        in_channels; learned-variance channels are never guided."""
        if self.conditioning == "none" or (self.conditioning == "class" and not self.has_null_class):
            raise FlexDiTError("classifier-free guidance needs a class model with a null class (class_dropout_prob > "
                               "0) or a caption model with a negative caption; use cfg scale 1")
        if x.shape[0] % 2:
            raise FlexDiTError(f"forward_with_cfg needs an even batch (conditional + unconditional halves), "
                               f"got {x.shape[0]}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half]), t, y, caption, caption_mask, grid=grid)
        guided = self.GUIDED_CHANNELS if guided_channels == "model" else guided_channels
        n = self.in_channels if guided is None else min(guided, self.in_channels)
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    def _check_inputs(self, x, t, y, caption, caption_mask) -> torch.Tensor | None:
        """Raise on inputs that do not fit; return the caption mask as bool (B, L), None when nothing is padded."""
        C, F, (H, W) = self.in_channels, self.frames, self.config.input_size
        if x.dim() != 5 or tuple(x.shape[1:]) != (C, F, H, W):
            layout_hint = ""
            if x.dim() == 5 and tuple(x.shape[1:3]) == (F, C) and F != C:
                layout_hint = " (this looks like the original Latte's (B, F, C, H, W): permute it)"
            elif x.dim() == 5 and x.shape[1] == C and tuple(x.shape[3:]) == (H, W):
                layout_hint = f" (this model runs {F} frames: its frame positions and temporal blocks are trained so)"
            raise FlexDiTError(f"input of shape {tuple(x.shape)} does not fit the model; expected (B, C, F, H, W) = "
                               f"(B, {C}, {F}, {H}, {W}){layout_hint}")
        B = x.shape[0]
        if t.shape != (B,):
            raise FlexDiTError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if self.conditioning == "caption":
            return self._check_caption(B, y, caption, caption_mask)
        if caption is not None or caption_mask is not None:
            form = "class-conditional" if self.conditioning == "class" else "unconditional"
            raise FlexDiTError(f"this Latte is {form}; drop caption and caption_mask")
        if self.conditioning == "none":
            if y is not None and y.shape != (B,):
                raise FlexDiTError(f"y must have shape ({B},) or be None, got {tuple(y.shape)}")
            return None
        if y is None or y.shape != (B,):
            raise FlexDiTError(f"a class-conditional Latte needs y, class ids of shape ({B},); got "
                               f"{None if y is None else tuple(y.shape)}")
        top = self.config.num_classes if self.has_null_class else self.config.num_classes - 1
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > top):
            raise FlexDiTError(f"class ids must lie in 0..{top}, got {int(y.min())}..{int(y.max())}")
        return None

    def _check_caption(self, B, y, caption, caption_mask) -> torch.Tensor | None:
        if y is not None:
            raise FlexDiTError("a caption Latte takes caption= (T5 embeddings), not class ids y; drop y")
        return checked_caption(caption, caption_mask, B, self.config.caption_channels)


# --- the original Vchitect/Latte files ------------------------------------------------------------------
_ORIGINAL_BLOCK = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
_ORIGINAL_TOP = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
                 "final_layer.adaLN_modulation.1")
_ORIGINAL_POSITIONS = ("pos_embed", "temp_embed")  # frozen sin-cos tables the original stores


def _original_depth(state: dict[str, torch.Tensor]) -> int:
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks or blocks != set(range(len(blocks))) or len(blocks) % 2:
        raise FlexDiTError(f"the Latte state's blocks {sorted(blocks)[:4]}... are not an even run 0..2n-1 of "
                           "spatial and temporal blocks; is this an original Vchitect/Latte file?")
    return len(blocks) // 2


def config_from_original(state: dict[str, torch.Tensor], overrides: dict | None = None) -> LatteConfig:
    """Our dense config for an original Vchitect/Latte state dict (models/latte.py, extras 1 or 2), read from its
    shapes: depth, hidden, patch and channels from the weights, frames from temp_embed, the input size from
    pos_embed, classes from y_embedder's rows (with the null class) or unconditional; heads from the standard sizes
    unless overrides give num_heads. overrides: other LatteConfig fields (num_classes, layout, density, ...)."""
    overrides = dict(overrides or {})
    if "text_embedding_projection.1.weight" in state:
        raise FlexDiTError("this Latte file is the CLIP text form (extras 78), which flexdit does not implement; "
                           "use an unconditional, class-conditional or Latte-1 (diffusers) checkpoint")
    missing = [k for k in ("x_embedder.proj.weight", *_ORIGINAL_POSITIONS, "final_layer.linear.weight",
                           "blocks.0.mlp.fc1.weight") if k not in state]
    if missing:
        raise FlexDiTError(f"the Latte state lacks {missing[0]}; is this an original Vchitect/Latte file?")
    patch_w = state["x_embedder.proj.weight"]  # (D, C, p, p)
    D, in_channels, p = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    N, frames = state["pos_embed"].shape[1], state["temp_embed"].shape[1]
    side = round(N ** 0.5)
    if side * side != N:
        raise FlexDiTError(f"the Latte state's pos_embed holds {N} positions, not a square grid; the original "
                           "Latte is square")
    out_channels = state["final_layer.linear.weight"].shape[0] // (p * p)
    if out_channels not in (in_channels, 2 * in_channels):
        raise FlexDiTError(f"the Latte state's output has {out_channels} channels, neither in_channels "
                           f"{in_channels} nor twice it (learned sigma)")
    config = dict(input_size=(side * p, side * p), patch_size=p, in_channels=in_channels, hidden_size=D,
                  mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / D, frames=frames,
                  learn_sigma=out_channels == 2 * in_channels, layout=Layout.dense(_original_depth(state)).kinds)
    if "y_embedder.embedding_table.weight" in state:
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        classes = overrides.pop("num_classes", rows - 1)
        if rows not in (classes, classes + 1):
            raise FlexDiTError(f"the Latte state's label table has {rows} rows, which does not fit num_classes "
                               f"{classes} (with or without the null class)")
        config.update(conditioning="class", num_classes=classes, class_dropout_prob=0.1 if rows > classes else 0.0)
    if "num_heads" not in overrides and D not in HEADS_BY_HIDDEN:
        raise FlexDiTError(f"hidden size {D} is not a standard Latte size ({', '.join(map(str, HEADS_BY_HIDDEN))}); "
                           "pass num_heads")
    config["num_heads"] = HEADS_BY_HIDDEN.get(D)
    unknown = sorted(set(overrides) - set(LatteConfig.__dataclass_fields__))
    if unknown:
        raise FlexDiTError(f"unknown Latte option {unknown[0]!r}; give LatteConfig fields")
    config.update(overrides)
    return LatteConfig(**config)


def _original_pairs(config: LatteConfig) -> list[tuple[str, str]]:
    """(our key, the original's key) for every tensor of the dense model."""
    modules = [(m, m) for m in _ORIGINAL_TOP]
    for i in range(config.depth):
        modules += [(f"blocks.{i}.{m}", f"blocks.{2 * i}.{m}") for m in _ORIGINAL_BLOCK]
        modules += [(f"blocks.{i}.temporal.{m}", f"blocks.{2 * i + 1}.{m}") for m in _ORIGINAL_BLOCK]
    pairs = [(f"{o}.{p}", f"{t}.{p}") for o, t in modules for p in ("weight", "bias")]
    if config.conditioning == "class":
        pairs.append(("y_embedder.embedding_table.weight",) * 2)
    return pairs


def state_from_original(state: dict[str, torch.Tensor], config: LatteConfig) -> dict[str, torch.Tensor]:
    """An original Vchitect/Latte state dict (bare: the loader picks "ema" or "model") -> ours for `config` (from
    config_from_original). The stored pos_embed and temp_embed must be Latte's sin-cos tables, which we rebuild."""
    if config.conditioning == "caption" or not Layout(config.layout).is_dense:
        raise FlexDiTError("original Latte files hold a dense unconditional or class-conditional model; build the "
                           "config with config_from_original")
    pairs = _original_pairs(config)
    expected = {theirs for _, theirs in pairs} | set(_ORIGINAL_POSITIONS)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FlexDiTError(f"the Latte weights do not fit the config: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}; build the config with config_from_original")
    reference = positions(config)
    for key in _ORIGINAL_POSITIONS:
        stored = state[key].float().cpu()
        if stored.shape != reference[key].shape or not torch.allclose(stored, reference[key], atol=1e-4):
            raise FlexDiTError(f"the Latte file's {key} is not the sin-cos table of its shape; the file is damaged "
                               "or from a modified Latte")
    return {ours: state[theirs] for ours, theirs in pairs}


# --- diffusers LatteTransformer3DModel (Latte-1) ------------------------------------------------------
# Options that change the architecture, and the only values our model implements.
_DIFFUSERS_FIXED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False, "norm_eps": 1e-6}
# Its constructor's defaults, for fields a config.json leaves out.
_DIFFUSERS_DEFAULTS = {"num_attention_heads": 16, "attention_head_dim": 88, "in_channels": None,
                       "out_channels": None, "num_layers": 1, "sample_size": 64, "patch_size": None,
                       "caption_channels": None, "cross_attention_dim": None, "video_length": 16,
                       "norm_type": "layer_norm", "activation_fn": "geglu", "attention_bias": False,
                       "norm_elementwise_affine": True, "norm_eps": 1e-5}


def config_from_diffusers(config: dict) -> LatteConfig:
    """Our dense caption config for a diffusers LatteTransformer3DModel config (its config.json as a dict)."""
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    for key, value in _DIFFUSERS_FIXED.items():
        if c[key] != value:
            raise FlexDiTError(f"diffusers Latte option {key}={c[key]!r} is not supported (flexdit implements "
                               f"{key}={value!r}); use a Latte-1 checkpoint")
    for key in ("in_channels", "patch_size", "caption_channels"):
        if c[key] is None:
            raise FlexDiTError(f"the diffusers Latte config has no {key}; Latte-1 sets it (check config.json)")
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if c["cross_attention_dim"] != hidden:
        raise FlexDiTError(f"diffusers Latte cross_attention_dim {c['cross_attention_dim']} differs from the hidden "
                           f"size {hidden}; Latte-1 cross-attends to captions projected to the hidden size")
    in_ch, out_ch = c["in_channels"], c["out_channels"] or c["in_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise FlexDiTError(f"diffusers Latte out_channels {out_ch} is neither in_channels {in_ch} nor twice it "
                           "(learned sigma)")
    size = c["sample_size"]
    return LatteConfig(
        input_size=(size, size), patch_size=c["patch_size"], in_channels=in_ch, hidden_size=hidden,
        num_heads=c["num_attention_heads"], frames=c["video_length"], conditioning="caption",
        caption_channels=c["caption_channels"], interpolation_scale=float(max(size // 64, 1)),
        learn_sigma=out_ch == 2 * in_ch, layout=Layout.dense(c["num_layers"]).kinds)


def config_to_diffusers(config: LatteConfig) -> dict:
    """The LatteTransformer3DModel constructor arguments of a dense caption Latte."""
    H, W = config.input_size
    if config.conditioning != "caption" or not Layout(config.layout).is_dense or config.mlp_ratio != 4.0 \
            or H != W or config.interpolation_scale != max(H // 64, 1):
        raise FlexDiTError("diffusers' LatteTransformer3DModel holds only the dense caption Latte (Latte-1) with "
                           "square frames, MLP ratio 4 and its own position scale; convert the dense model "
                           "(config.dense())")
    return {**_DIFFUSERS_FIXED, "num_attention_heads": config.num_heads,
            "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "num_layers": config.depth, "sample_size": H,
            "patch_size": config.patch_size, "caption_channels": config.caption_channels,
            "cross_attention_dim": config.hidden_size, "video_length": config.frames, "num_embeds_ada_norm": 1000}


def _diffusers_pairs(config: LatteConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our key, the diffusers keys it concatenates along dim 0) for every tensor of the dense caption model."""
    modules = list(DIFFUSERS_TOP)
    self_attention, cross_attention = DIFFUSERS_SELF_ATTENTION, DIFFUSERS_CROSS_ATTENTION
    tables = [("final_layer.scale_shift_table", ("scale_shift_table",))]
    for i in range(config.depth):
        for ours, theirs, parts in ((f"blocks.{i}.", f"transformer_blocks.{i}.", self_attention + cross_attention),
                                    (f"blocks.{i}.temporal.", f"temporal_transformer_blocks.{i}.", self_attention)):
            modules += [(ours + o, tuple(theirs + t for t in ts)) for o, ts in parts]
            tables.append((ours + "scale_shift_table", (theirs + "scale_shift_table",)))
    return [(f"{o}.{p}", tuple(f"{t}.{p}" for t in ts)) for o, ts in modules for p in ("weight", "bias")] + tables


def state_from_diffusers(state: dict[str, torch.Tensor], config: LatteConfig) -> dict[str, torch.Tensor]:
    """A diffusers LatteTransformer3DModel state dict -> ours for `config` (from config_from_diffusers)."""
    return state_from_pairs(state, _diffusers_pairs(config), "diffusers Latte")


def state_to_diffusers(state: dict[str, torch.Tensor], config: LatteConfig) -> dict[str, torch.Tensor]:
    """Our dense caption state dict -> a diffusers LatteTransformer3DModel's."""
    config_to_diffusers(config)  # validates: dense caption form
    return state_to_pairs(state, _diffusers_pairs(config))
