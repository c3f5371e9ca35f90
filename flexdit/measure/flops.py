"""FLOPs accounting, one convention everywhere (DESIGN.md):

multiply-adds (MACs) of one forward pass for one image, every matmul included (linear layers, the patch
convolution, attention's Q K^T and A V; for PixArt the caption projection and cross-attention over 120 caption
tokens), classifier-free-guidance doubling, the VAE and the text encoder excluded.
Elementwise work (norms, activations, softmax, pooling, upsampling) is not counted, as in the DiT paper
(DiT-XL/2: 118.6 G at 256 px, 525 G at 512 px).

For Latte, one video of F frames: each pair's spatial block per frame (N dense or M sparse tokens), its temporal
block at each of the n token positions the spatial stage holds (n = M inside an SDTM), adaLN once per sample and, in
the caption form, the caption's keys and values once per sample, as flexdit.nn.latte_blocks runs them.

The counts are closed-form per block kind; tests check them against torch's FlopCounterMode on
tiny models, so they describe the code that runs.
"""
from dataclasses import dataclass

from flexdit.errors import FlexDiTError
from flexdit.models.core import BackboneConfig, FlexDiTCore
from flexdit.models.latte import LatteConfig
from flexdit.models.pixart import PixArtConfig
from flexdit.nn.blocks import DENSE, GEN, POOL, RECOVER, SPARSE
from flexdit.nn.density import Grid
from flexdit.schedule import Density, density_from_dict

FREQUENCY_EMBEDDING_SIZE = 256


def _attention(C: int, queries: int, keys: int) -> int:
    return 2 * queries * keys * C  # Q K^T and A V over all heads


def block_macs(kind: str, C: int, mlp_hidden: int, N: int, M: int, adaln: bool = True, caption_tokens: int = 0) -> int:
    """MACs of one block: N dense tokens, M sparse tokens (the SDTM's grid). `adaln`: the block's own adaLN-Zero
    linear (DiT; PixArt's blocks add a shared vector to a table instead). `caption_tokens` L > 0: PixArt's caption
    cross-attention after the mixer, on the tokens the block holds (q, proj), the caption (k, v) and their scores."""
    own = 6 * C * C if adaln else 0
    if kind in (DENSE, SPARSE):
        n = N if kind == DENSE else M
        mixer = 4 * C * C * n + _attention(C, n, n) + 2 * C * mlp_hidden * n
    elif kind == POOL:  # v and proj act on the mean token only (O(N) mixer); the MLP on every token
        n, mixer = N, 2 * C * C + 2 * C * mlp_hidden * N
    elif kind == GEN:  # sparse queries over dense keys/values
        n, mixer = M, C * C * M + 2 * C * C * N + _attention(C, M, N) + C * C * M + 2 * C * mlp_hidden * M
    elif kind == RECOVER:  # merge (W1 on sparse before upsampling, W2 on dense), dense queries over sparse k/v
        n = N
        mixer = C * C * M + C * C * N + C * C * N + 2 * C * C * M + _attention(C, N, M) + C * C * N \
            + 2 * C * mlp_hidden * N
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    L = caption_tokens
    cross = 2 * C * C * n + 2 * C * C * L + _attention(C, n, L) if L else 0
    return own + mixer + cross


def latte_macs(config: LatteConfig, M: int) -> int:
    """MACs of one Latte video (config.frames frames) at M sparse tokens per frame (N when dense); the caption form
    with a caption of config.caption_length tokens."""
    C, p, F, L = config.hidden_size, config.patch_size, config.frames, config.caption_length
    N = config.token_grid[0] * config.token_grid[1]
    mlp_hidden = int(C * config.mlp_ratio)
    captioned = config.conditioning == "caption"
    embed = F * N * C * config.in_channels * p * p + FREQUENCY_EMBEDDING_SIZE * C + C * C  # patches, timestep MLP
    head = F * N * C * p * p * config.out_channels
    if captioned:
        embed += 6 * C * C + L * (config.caption_channels * C + C * C)  # adaLN-single's t_block, caption MLP
    else:
        head += 2 * C * C  # the final adaLN
    blocks = 0
    for kind in config.layout:
        n = M if kind in (GEN, SPARSE) else N  # tokens per frame the spatial block hands to the temporal one
        spatial = F * block_macs(kind, C, mlp_hidden, N, M, adaln=False)
        temporal = n * block_macs(DENSE, C, mlp_hidden, F, F, adaln=False)  # over the F frames at each position
        if captioned:  # q and proj on the frames' tokens; k, v on the caption once per sample
            spatial += 2 * C * C * F * n + 2 * C * C * L + _attention(C, F * n, L)
        else:  # each block's own adaLN-Zero linear, once per sample
            spatial, temporal = spatial + 6 * C * C, temporal + 6 * C * C
        blocks += spatial + temporal
    return embed + blocks + head


def model_macs(config: BackboneConfig, sparse_grid: Grid | None = None) -> int:
    """MACs of one forward pass of one image (a Latte: one video) at one sparse grid (ignored by dense layouts);
    PixArt with a caption of config.caption_length tokens (120, as the paper counts)."""
    C, p = config.hidden_size, config.patch_size
    gh, gw = config.token_grid
    N = gh * gw
    M = sparse_grid[0] * sparse_grid[1] if sparse_grid is not None else N
    if isinstance(config, LatteConfig):
        return latte_macs(config, M)
    mlp_hidden = int(C * config.mlp_ratio)
    embed = N * C * config.in_channels * p * p + FREQUENCY_EMBEDDING_SIZE * C + C * C  # patches, timestep MLP
    head = N * C * p * p * config.out_channels
    if isinstance(config, PixArtConfig):
        L = config.caption_length
        embed += 6 * C * C + L * (config.caption_channels * C + C * C)  # adaLN-single's t_block, caption MLP
        if config.micro_conditions:  # h, w and h/w, each through a timestep MLP of width C / 3
            embed += 3 * (FREQUENCY_EMBEDDING_SIZE * (C // 3) + (C // 3) ** 2)
        blocks = sum(block_macs(kind, C, mlp_hidden, N, M, adaln=False, caption_tokens=L) for kind in config.layout)
        return embed + blocks + head
    head += 2 * C * C  # DiT's final adaLN
    return embed + sum(block_macs(kind, C, mlp_hidden, N, M) for kind in config.layout) + head


@dataclass
class FlopsReport:
    gflops: float  # average over the timesteps (the figure to quote)
    dense_gflops: float  # the all-dense model of the same size and resolution
    per_grid: dict[str, float]  # "HxW" -> GFLOPs at that grid
    steps_per_grid: dict[str, int]  # "HxW" -> how many of the timesteps use it

    @property
    def saving(self) -> float:
        return 1.0 - self.gflops / self.dense_gflops

    def to_dict(self) -> dict:
        return {"gflops": self.gflops, "dense_gflops": self.dense_gflops, "flops_ratio": self.dense_gflops / self.gflops,
                "saving": self.saving, "per_grid": self.per_grid, "steps_per_grid": self.steps_per_grid}


def grid_name(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def flops_report(model_or_config: FlexDiTCore | BackboneConfig, timesteps: list[int],
                 density: Density | None = None) -> FlopsReport:
    """Average GFLOPs over the timesteps a sampler visits, and the figure of each grid used."""
    config = model_or_config.config if isinstance(model_or_config, FlexDiTCore) else model_or_config
    if density is None:
        density = model_or_config.density if isinstance(model_or_config, FlexDiTCore) else density_from_dict(config.density)
    dense = model_macs(config.dense())
    if GEN not in config.layout:
        g = dense / 1e9 if all(k == DENSE for k in config.layout) else model_macs(config) / 1e9
        name = grid_name(config.token_grid)
        return FlopsReport(g, dense / 1e9, {name: g}, {name: len(timesteps)})
    if density is None:
        raise FlexDiTError("a FlexDiT needs a density (--density R_MIN,R_MAX or --grid G) to count its FLOPs")
    grids = density.grids(timesteps, config.token_grid) if timesteps else []
    steps: dict[str, int] = {}
    per_grid: dict[str, float] = {}
    for g in grids:
        name = grid_name(g)
        steps[name] = steps.get(name, 0) + 1
        per_grid.setdefault(name, model_macs(config, g) / 1e9)
    average = sum(per_grid[n] * k for n, k in steps.items()) / max(1, len(grids))
    return FlopsReport(average, dense / 1e9, per_grid, steps)
