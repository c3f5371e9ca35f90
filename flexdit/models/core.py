"""The FlexDiT walk that every backbone shares (DiT today; PixArt-alpha and Latte plug in the same way).

A backbone subclass supplies its embedders, its blocks (one per layout entry, each with a `kind` and its own
conditioning) and its head, and implements `forward_grid(*batch, sparse_grid)`: embed, `self.walk(...)`, head.
The core supplies what is the same for all of them:
- `walk`: runs the layout over the blocks. The first `gen` block of an SDTM pools the dense tokens to the sparse
  grid and keeps the dense ones as its keys/values; `recover` merges back to the dense grid; every other block maps
  tokens to tokens of the same grid.
- `dispatch`: the grid for each sample's timestep (or a fixed grid), the batch cut into groups of one grid each,
  each group run through `forward_grid` (the compiled one after `compile_grids`) and the outputs put back in order.
- `compile_grids`: shapes are static per grid, so `torch.compile` compiles each grid once.
"""
import json
import os
from dataclasses import asdict, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

from flexdit.errors import FlexDiTError
from flexdit.io import save_safetensors
from flexdit.models.layout import Layout
from flexdit.nn.blocks import GEN, RECOVER
from flexdit.nn.density import Grid, pool_tokens
from flexdit.schedule import Density, FixedGrid

# call(block, tokens, context, grids) -> tokens: how a backbone runs one of its blocks with its own conditioning
SAVED_CONFIG_KEY = "flexdit_config"  # the safetensors metadata entry `save` writes the config to
SAVED_FAMILY_KEY = "flexdit_family"  # ... and the backbone family ("dit" when absent: files of flexdit 0.1)
BlockCall = Callable[[nn.Module, torch.Tensor, torch.Tensor | None, tuple[Grid, Grid] | None], torch.Tensor]


class BackboneConfig:
    """What every backbone's config dataclass shares (fields input_size, patch_size, in_channels, learn_sigma,
    layout, density): the derived sizes and the JSON form saved in our files."""

    def _check_geometry(self) -> None:
        """Normalise input_size and layout and refuse sizes no backbone can build (a damaged or hand-edited config
        would otherwise fail deep inside torch)."""
        if isinstance(self.input_size, int):
            self.input_size = (self.input_size, self.input_size)
        sizes = [(name, getattr(self, name)) for name in ("hidden_size", "num_heads", "patch_size", "in_channels")]
        sizes += [("input_size", side) for side in self.input_size]
        bad = next(((name, v) for name, v in sizes if isinstance(v, bool) or not isinstance(v, int) or v < 1), None)
        if bad is not None:
            raise FlexDiTError(f"the model config's {bad[0]} is {bad[1]!r}; every size must be a positive integer "
                               "(is the checkpoint's config damaged?)")
        self.input_size = tuple(self.input_size)
        self.layout = Layout(tuple(self.layout)).kinds
        if any(s % self.patch_size for s in self.input_size):
            raise FlexDiTError(f"input size {self.input_size[0]}x{self.input_size[1]} is not divisible by "
                               f"patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise FlexDiTError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads; "
                               "pass the right num_heads")
        if self.hidden_size % 4:
            raise FlexDiTError(f"hidden size {self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")

    @property
    def depth(self) -> int:
        return len(self.layout)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def token_grid(self) -> Grid:
        return (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)

    def dense(self):
        """The all-dense model of the same size and resolution."""
        return replace(self, layout=Layout.dense(self.depth).kinds, density=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"], d["layout"] = list(self.input_size), list(self.layout)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise FlexDiTError(f"unknown {cls.__name__} keys {unknown}; the file was written by a newer flexdit?")
        return cls(**d)


class FlexDiTCore(nn.Module):
    """Token-density control over a backbone's blocks; see the module docstring."""
    FAMILY: str  # the backbone's name in our files and in flexdit.models.families

    def _init_core(self, layout: Layout, density: Density | None, token_grid: tuple[int, int]) -> None:
        self.layout = layout
        self.density = density
        self.token_grid = token_grid
        self._compiled_forward_grid = None
        self.grad_checkpointing = False  # recompute each block in backward instead of storing activations

    def _xavier_init(self) -> None:
        """The initialisation every backbone starts from (DiT's, PixArt's, Latte's): xavier-uniform linears with
        zero biases, and the patch convolution xavier-uniform as a linear map (its bias is the backbone's choice)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # --- description ------------------------------------------------------------------------------
    @property
    def is_flexdit(self) -> bool:
        return not self.layout.is_dense

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's input (= noise) shape without the batch: (C, H, W) for images (a video backbone adds F)."""
        return (self.config.in_channels, *self.config.input_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def default_layout(depth: int) -> Layout:
        """The backbone's default FlexDiT layout for `depth` layout entries (Latte has its own)."""
        return Layout.default_flexdit(depth)

    def parse_layout(self, spec: "str | Layout") -> Layout:
        """A layout of this model's depth: a Layout, 'dense', 'default' (the backbone's) or a spec."""
        if isinstance(spec, Layout):
            return spec
        depth = len(self.layout)
        return self.default_layout(depth) if spec.strip() == "default" else Layout.parse(spec, depth)

    @property
    def condition_kind(self) -> str:
        """What a sample is conditioned on: "class" (DiT), "caption" (PixArt) or "none" (unconditional Latte)."""
        return "class"

    def save(self, path: str | os.PathLike) -> None:
        """Write our format: safetensors with the family and JSON config in its metadata (atomically); flexdit.load
        reads it."""
        metadata = {"format": "flexdit", SAVED_FAMILY_KEY: self.FAMILY,
                    SAVED_CONFIG_KEY: json.dumps(self.config.to_dict())}
        save_safetensors(path, self.state_dict(), metadata)

    def with_density(self, density: Density | None) -> "FlexDiTCore":
        """Set the density used when forward() is not given a grid (and the config's record of it); returns self."""
        self.density = density
        self.config = replace(self.config, density=density.to_dict() if density else None)
        return self

    def grids_for(self, t: torch.Tensor) -> list[Grid]:
        """The sparse grid each sample of the batch runs at, read from the density at its timestep."""
        if self.density is None:
            raise FlexDiTError("this FlexDiT has no density schedule; set one (--density R_MIN,R_MAX or "
                               "--grid G, or model.with_density(...)) or pass grid= to forward")
        return self.density.grids(t.detach().cpu(), self.token_grid)

    def compile_grids(self, **compile_kwargs) -> "FlexDiTCore":
        """torch.compile the per-grid forward: shapes are static per grid, so each grid compiles once."""
        import torch._dynamo

        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        self._compiled_forward_grid = torch.compile(self.forward_grid, dynamic=False, **compile_kwargs)
        return self

    # --- the walk ---------------------------------------------------------------------------------
    def walk(self, tokens: torch.Tensor, sparse_grid: Grid | None, call: BlockCall) -> torch.Tensor:
        """(B, N, D) dense tokens through every block of the layout -> (B, N', D), N' = N unless the layout
        ends inside an SDTM (it cannot: Layout validates that every SDTM recovers)."""
        dense_input = None  # the SDTM's dense input while tokens are sparse
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()

        def run(block: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, grids=None) -> torch.Tensor:
            if checkpointed:
                return torch.utils.checkpoint.checkpoint(call, block, x, context, grids, use_reentrant=False)
            return call(block, x, context, grids)

        for block in self.blocks:
            if block.kind == GEN:
                if dense_input is None:
                    dense_input = tokens
                    tokens = pool_tokens(tokens, self.token_grid, sparse_grid)  # (B, M, D)
                tokens = run(block, tokens, dense_input)
            elif block.kind == RECOVER:
                tokens = run(block, dense_input, tokens, (sparse_grid, self.token_grid))  # (B, N, D)
                dense_input = None
            else:
                tokens = run(block, tokens)
        return tokens

    def dispatch(self, batch: tuple[torch.Tensor | None, ...], t: torch.Tensor, grid: Grid | None) -> torch.Tensor:
        """forward_grid(*batch, sparse_grid) for the whole batch: at `grid` if given, else at each sample's
        scheduled grid, samples that need different grids running as separate groups. Every tensor of `batch`
        has the batch first (None entries stay None)."""
        run = self._compiled_forward_grid or self.forward_grid
        if not self.layout.has_sparse_tokens:
            return run(*batch, None)
        if grid is not None:
            return run(*batch, FixedGrid(*grid).grid(0, self.token_grid))
        grids = self.grids_for(t)
        distinct = sorted(set(grids))
        if len(distinct) == 1:
            return run(*batch, distinct[0])
        out = None
        for g in distinct:
            idx = torch.tensor([i for i, gi in enumerate(grids) if gi == g], device=t.device)
            group_out = run(*(None if b is None else b[idx] for b in batch), g)
            if out is None:
                out = group_out.new_empty(t.shape[0], *group_out.shape[1:])
            out[idx] = group_out
        return out
