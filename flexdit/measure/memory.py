"""Peak activation memory of a forward pass: the CUDA allocator's peak on GPU; on CPU, which keeps no
allocator statistics, the peak of live tensor storage created during the pass (tracked per operator).

Two figures matter: inference (no autograd: activations die as soon as the next block has read them,
so the peak is one block's working set) and training (autograd keeps every block's activations for the
backward pass, so the peak grows with the tokens each block processes)."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of tensor storage created inside the mode and still referenced; `peak` is the maximum.

    Storages that existed before (parameters, inputs) are ignored, so views of weights cost nothing.
    Buffers internal to one operator's kernel are not seen: the figure is a lower bound at op granularity.
    """

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._external = {t.untyped_storage().data_ptr() for t in existing}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [tensor references, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._external:
            return
        if key in self._live:
            self._live[key][0] += 1
        else:
            self._live[key] = [1, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]


def peak_forward_memory(fn, inputs: list[torch.Tensor], module: torch.nn.Module, training: bool = False) -> int:
    """Peak bytes allocated while running fn() beyond what was allocated before: with training=True the
    forward pass runs with autograd, so the activations kept for backward count."""
    device = inputs[0].device
    grad_mode = torch.enable_grad() if training else torch.inference_mode()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with grad_mode:
            out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before
    existing = list(inputs) + list(module.parameters()) + list(module.buffers())
    tracker = LiveTensorBytes(existing)
    with grad_mode, tracker:
        out = fn()
    del out
    return tracker.peak
