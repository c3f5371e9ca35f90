"""CPU inference tuning, for `flexdit sample` and `flexdit bench` (on by default, `--no-cpu-tuning` to compare).

Two costs dominate a DiT-family forward on a CPU besides the arithmetic itself:
- PyTorch's fp32 `F.linear` calls MKL, which on AMD CPUs runs far below the oneDNN kernels PyTorch also ships
  (2.5-3x on a 2-core AMD EPYC with AVX512), and its bf16 `F.linear` reorders the weight on every call. A
  `PackedLinear` reorders its weight once into oneDNN's blocked layout and calls oneDNN's kernel.
- An MLP's GELU is a separate pass over its widest activation, (N, 4D); oneDNN applies it inside the first
  product instead (1.6x faster for that product with its GELU in bf16 at 256 rows, 1.1x in fp32).
- glibc returns large freed blocks to the OS, so every activation of a few MB is a fresh mapping whose pages
  fault in again on first touch: 26,000-36,000 page faults in every forward of a dense PixArt-XL/2 at 256 px,
  none once `keep_freed_memory` keeps them mapped.

Measured figures: README "Speed and memory, side by side" and docs/backbones.md.
"""
import ctypes
import ctypes.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexdit.nn.blocks import Mlp

PACKED_DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's CPU linear takes
# glibc's mallopt parameters and the values used: blocks up to 32 MiB (glibc's largest threshold) come from the
# heap instead of their own mapping, and the heap is never trimmed back to the OS while the process runs
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 1024 * 1024, 2**31 - 1


def can_pack() -> bool:
    return torch.backends.mkldnn.is_available()


class PackedLinear(nn.Linear):
    """An nn.Linear that, for inference on the CPU in fp32 or bf16, multiplies with a copy of its weight reordered
    once into oneDNN's layout (repacked when the weight changes: moved, cast or loaded). Everywhere else (autograd,
    GPU, other dtypes) it is the plain linear, so training and `.to()` work as before. The copy costs the weight's
    memory once more.

    `gelu` (None, "tanh" or "none": GELU's `approximate`) makes it a linear followed by that GELU, on every path;
    `pack_linears` sets it where an MLP's GELU follows the layer."""
    gelu: str | None = None

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        # an inference tensor keeps no version counter: a weight made under inference_mode is taken as fixed
        key = (w.data_ptr(), w.dtype, 0 if w.is_inference() else w._version)
        cached = self.__dict__.get("_packed")  # not a buffer: `.to()` and state_dict must not see it
        if cached is None or cached[0] != key:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
            self.__dict__["_packed"] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_packed", None)  # oneDNN's opaque tensor cannot be copied or pickled; it is rebuilt on use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.dtype not in PACKED_DTYPES or x.dtype != w.dtype
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            y = F.linear(x, w, self.bias)
            return y if self.gelu is None else F.gelu(y, approximate=self.gelu)
        post_op, algorithm = ("none", "") if self.gelu is None else ("gelu", self.gelu)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, post_op, [], algorithm)


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` in place by a PackedLinear sharing its parameters, and move each Mlp's
    GELU into its fc1 (the Mlp's `act` becomes an identity); returns how many linears were replaced. Without oneDNN
    in this PyTorch build nothing changes."""
    if not can_pack():
        return 0
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                packed = PackedLinear.__new__(PackedLinear)
                packed.__dict__.update(child.__dict__)  # the same Parameter objects, hooks and flags
                setattr(parent, name, packed)
                replaced += 1
    for mlp in model.modules():
        if isinstance(mlp, Mlp) and isinstance(mlp.act, nn.GELU) and type(mlp.fc1) is PackedLinear:
            mlp.fc1.gelu = mlp.act.approximate
            mlp.act = nn.Identity()
    return replaced


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks of up to 32 MiB for reuse instead of unmapping them (process-wide, for the
    rest of the process). Returns whether it applied (False off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def tune_for_cpu_inference(model: nn.Module, device: torch.device) -> bool:
    """Both tunings above where `device` is the CPU; returns whether they applied."""
    if device.type != "cpu":
        return False
    keep_freed_memory()
    return pack_linears(model) > 0
