"""FlexDiT initialised from a dense DiT (paper Sec. 2): layer i takes the weights of dense layer i.
Any FlexDiTCore backbone converts the same way (DiT, PixArt-alpha): the result is the source's own class.

Cross-attention blocks split the dense qkv into q and kv; Poolingformer blocks keep only v; embedders
and the final layer are copied; the recovery merges start at W1 = 0, W2 = I. The report names the
new parameters and the dense parameters that were not used.
"""
from dataclasses import dataclass, field, replace

import torch

from flexdit.errors import FlexDiTError
from flexdit.models.dit import DEFAULT_DENSITY, DiT
from flexdit.models.layout import Layout
from flexdit.nn.blocks import CROSS_KINDS, DENSE, POOL, RECOVER, SPARSE
from flexdit.schedule import Density


@dataclass
class ConversionReport:
    new: list[str] = field(default_factory=list)  # parameters the dense model did not have
    unused: list[str] = field(default_factory=list)  # dense parameters (or row ranges) not carried over

    def to_dict(self) -> dict:
        return {"new": self.new, "unused": self.unused}


def block_state_from_dense(kind: str, dense: dict[str, torch.Tensor], prefix: str,
                           report: ConversionReport) -> dict[str, torch.Tensor]:
    """State of one block of `kind` from the state of a dense block (keys relative to the block)."""
    out = {k: v for k, v in dense.items() if not k.startswith("attn.qkv.")}
    if kind in (DENSE, SPARSE):
        out.update({k: v for k, v in dense.items() if k.startswith("attn.qkv.")})
        return out
    qkv_w, qkv_b = dense["attn.qkv.weight"], dense["attn.qkv.bias"]
    C = qkv_w.shape[1]
    if kind == POOL:
        out["attn.v.weight"], out["attn.v.bias"] = qkv_w[2 * C:], qkv_b[2 * C:]
        report.unused.append(f"{prefix}attn.qkv (q and k rows 0..{2 * C - 1})")
    elif kind in CROSS_KINDS:
        out["attn.q.weight"], out["attn.q.bias"] = qkv_w[:C], qkv_b[:C]
        out["attn.kv.weight"], out["attn.kv.bias"] = qkv_w[C:], qkv_b[C:]
    else:
        raise FlexDiTError(f"cannot initialise a {kind!r} block from a dense block")
    return out


def flexdit_from_dense(dense: DiT, layout: Layout | str | None = None,
                       density: Density | None = None) -> tuple[DiT, ConversionReport]:
    """A FlexDiT with `layout` (default: the paper's / our analogue for the depth) initialised from `dense`."""
    if not dense.layout.is_dense:
        raise FlexDiTError(f"the source model is already a FlexDiT (layout {dense.layout}); "
                           "convert from a dense DiT")
    depth = len(dense.layout)
    layout = dense.parse_layout("default" if layout is None else layout)
    if len(layout) != depth:
        raise FlexDiTError(f"layout {layout} has {len(layout)} blocks but the dense model has {depth}")
    if layout.has_sparse_tokens and density is None:
        density = dense.density or DEFAULT_DENSITY
    config = replace(dense.config, layout=layout.kinds,
                     density=density.to_dict() if layout.has_sparse_tokens else None)
    flex = type(dense)(config).to(device=dense.pos_embed.device, dtype=dense.pos_embed.dtype)

    report = ConversionReport()
    source = dense.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith("blocks.")}
    for i, kind in enumerate(layout.kinds):
        prefix = f"blocks.{i}."
        block_dense = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
        for k, v in block_state_from_dense(kind, block_dense, prefix, report).items():
            state[prefix + k] = v
        if kind == RECOVER:
            merge = flex.blocks[i].merge
            for k, v in merge.state_dict().items():
                state[f"{prefix}merge.{k}"] = v
                report.new.append(f"{prefix}merge.{k}")
    flex.load_state_dict(state, strict=True)
    return flex, report
