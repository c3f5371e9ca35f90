"""One class-conditional DiT that runs any layout: the all-dense DiT and every FlexDiT.

Structure and parameter names follow facebookresearch/DiT's models.py, so the all-dense layout is
the original DiT and its checkpoints load as they are.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.utils.checkpoint

from flexdit.errors import FlexDiTError
from flexdit.models.core import BackboneConfig, FlexDiTCore
from flexdit.models.layout import Layout
from flexdit.nn.blocks import Block, FinalLayer
from flexdit.nn.density import Grid
from flexdit.nn.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from flexdit.schedule import Density, DensitySchedule, density_from_dict

# Standard sizes: depth, hidden size, heads (DiT paper, Table 1).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in SIZES.values()}
DEFAULT_DENSITY = DensitySchedule(0.61, 0.86)  # the paper's main setting at 256 and 512 px


@dataclass
class DiTConfig(BackboneConfig):
    input_size: tuple[int, int] = (32, 32)  # latent (H, W)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # > 0 adds the null class (row num_classes) for guidance
    learn_sigma: bool = True
    layout: tuple[str, ...] = field(default_factory=lambda: Layout.dense(28).kinds)
    density: dict | None = None  # {"r_min", "r_max"} or {"grid": [h, w]}; required by sparse layouts
    timestep_freq_shift: int = 0  # 0: original DiT; 1: diffusers' DiT port

    def __post_init__(self):
        self._check_geometry()
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise FlexDiTError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.density is not None:
            density_from_dict(self.density)  # validates


class DiT(FlexDiTCore):
    """Class-conditional diffusion transformer over a token grid, with any layout of dense, pooling and sparse
    blocks (adaLN-Zero conditioning on timestep + class)."""
    FAMILY = "dit"
    GUIDED_CHANNELS = 3  # classifier-free guidance of the first three channels, as the original DiT samples

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self._init_core(Layout(config.layout), density_from_dict(config.density), config.token_grid)
        self.in_channels, self.out_channels, self.patch_size = config.in_channels, config.out_channels, p

        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        # Fixed sin-cos positions; a persistent buffer under DiT's key so official files load as they are.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, *self.token_grid)[None], persistent=True)
        self.blocks = nn.ModuleList([Block(kind, D, config.num_heads, config.mlp_ratio) for kind in self.layout.kinds])
        self.final_layer = FinalLayer(D, p, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: adaLN-Zero (every block starts as identity), zero output layer."""
        self._xavier_init()
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.merge is not None:
                block.merge.reset_to_identity()
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- description ------------------------------------------------------------------------------
    @property
    def has_null_class(self) -> bool:
        return self.y_embedder.has_null_class

    @property
    def can_guide(self) -> bool:
        return self.has_null_class

    def prepare_condition(self, labels: torch.Tensor | list[int] | dict) -> dict[str, torch.Tensor]:
        """Class ids (or {"y": ids}) -> forward()'s conditioning {"y": (B,) long}, each id within the model's
        classes (checked before any tensor conversion, so a huge id is an error, not an overflow)."""
        labels = labels["y"] if isinstance(labels, dict) else labels
        ids = [int(c) for c in (labels.flatten().tolist() if isinstance(labels, torch.Tensor) else labels)]
        n = self.config.num_classes
        bad = [c for c in ids if not 0 <= c < n]
        if bad:
            raise FlexDiTError(f"unknown class id {bad[0]}; this model has classes 0..{n - 1}")
        return {"y": torch.tensor(ids, dtype=torch.long)}

    def guidance_condition(self, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditional batch followed by its unconditional twin (the null class), for guidance."""
        y = condition["y"]
        return {"y": torch.cat([y, torch.full_like(y, self.config.num_classes)])}

    def dropped_condition(self, condition: dict[str, torch.Tensor], drop: torch.Tensor, null=None) -> dict:
        """Training's condition dropout: the null class where drop (B,) is True."""
        return {"y": torch.where(drop, self.config.num_classes, condition["y"])}

    def example_condition(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditioning keyword arguments of forward() for `batch` samples (benchmarks, memory probes)."""
        return {"y": torch.randint(0, self.config.num_classes, (batch,), generator=generator)}

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) integer timesteps 0..999, y (B,) class ids -> (B, out_channels, H, W).

        A FlexDiT runs its SDTMs at `grid` if given, else at the density's grid for each sample's timestep;
        samples whose timesteps need different grids run as separate groups.
        """
        self._check_inputs(x, t, y)
        return self.dispatch((x, t, y), t, grid)

    def forward_grid(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, sparse_grid: Grid | None) -> torch.Tensor:
        """The forward pass at one sparse grid (static shapes: compiles once per grid)."""
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        tokens = self.walk(tokens, sparse_grid, lambda block, h, context, grids: block(h, c, context, grids))
        return unpatchify(self.final_layer(tokens, c), self.token_grid, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = 3, grid: Grid | None = None) -> torch.Tensor:
        """Classifier-free guidance with the original DiT's calling convention.

        x and y hold the conditional half then the unconditional half (y = null class); only the first
        half of x is used. guided_channels=3 guides the first three channels as the original DiT does
        "for exact reproducibility"; None guides all in_channels noise channels (the standard form).
        Learned-variance channels are never guided (a 1-channel model guides its one noise channel).
        """
        if not self.has_null_class:
            raise FlexDiTError("classifier-free guidance needs a model with a null class "
                               "(class_dropout_prob > 0); use cfg scale 1")
        if x.shape[0] % 2:
            raise FlexDiTError(f"forward_with_cfg needs an even batch (conditional + unconditional halves), "
                               f"got {x.shape[0]}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y, grid=grid)
        n = self.in_channels if guided_channels is None else min(guided_channels, self.in_channels)
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        expected = (self.in_channels, *self.config.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise FlexDiTError(f"input of shape {tuple(x.shape)} does not fit the model; expected "
                               f"(B, {expected[0]}, {expected[1]}, {expected[2]})")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise FlexDiTError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        top = self.config.num_classes if self.has_null_class else self.config.num_classes - 1
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > top):
            raise FlexDiTError(f"class ids must lie in 0..{top}, got {int(y.min())}..{int(y.max())}")


def parse_model_name(name: str) -> tuple[bool, str, int]:
    """'DiT-XL/2' -> (False, 'XL', 2); 'FlexDiT-B/4' -> (True, 'B', 4)."""
    family, _, rest = name.partition("-")
    size, _, patch = rest.partition("/")
    if family not in ("DiT", "FlexDiT") or size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        names = ", ".join(f"{f}-{s}/{p}" for f in ("DiT", "FlexDiT") for s in SIZES for p in PATCH_SIZES)
        raise FlexDiTError(f"unknown model {name!r}; choose one of {names}")
    return family == "FlexDiT", size, int(patch)


def model_config(name: str, input_size: int | tuple[int, int] = 32, layout: str | Layout | None = None,
                 density: Density | None = None, depth: int | None = None, **overrides) -> DiTConfig:
    """Config of a standard size. FlexDiT-* names, and DiT-* names given a density, get the default FlexDiT
    layout of their depth and, unless given, the paper's density r in [0.61, 0.86]; `layout` overrides
    either (e.g. 'dense', 'default', '2+4x1-3-1-1+2').
    `depth` and other DiTConfig fields (hidden_size, num_heads, ...) override the size for custom models."""
    flex, size, patch = parse_model_name(name)
    standard_depth, hidden, heads = SIZES[size]
    depth = depth or standard_depth
    if layout is None:
        layout = Layout.default_flexdit(depth) if flex or density is not None else Layout.dense(depth)
    elif isinstance(layout, str):
        layout = Layout.parse(layout, depth)
    if not layout.has_sparse_tokens and density is not None:
        raise FlexDiTError(f"a density or grid was given for the dense layout {layout}; drop --density/--grid, or "
                           "give a FlexDiT layout (--layout default)")
    if density is None and layout.has_sparse_tokens:
        density = DEFAULT_DENSITY
    config = dict(input_size=input_size, patch_size=patch, hidden_size=hidden, num_heads=heads,
                  layout=layout.kinds, density=density.to_dict() if density else None)
    config.update(overrides)
    return DiTConfig(**config)


def create_model(name: str, input_size: int | tuple[int, int] = 32, **kwargs) -> DiT:
    """A randomly initialised standard model, e.g. create_model('FlexDiT-XL/2', input_size=32)."""
    return DiT(model_config(name, input_size, **kwargs))
