"""Reading checkpoint files. The container is told from the first bytes, never from the name: safetensors,
torch.save's zip, or a legacy torch.save pickle. Nothing here unpickles code: safetensors, or
torch.load(weights_only=True)."""
import argparse
import json
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flexdit.errors import FlexDiTError
from flexdit.io import check_input_file

State = dict[str, torch.Tensor]
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_PROTO = b"\x80"  # legacy torch.save files (and plain pickles) open with the pickle PROTO opcode
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
# entries of a torch.save dict that hold a state dict, EMA first (the weights to sample with), and which they are
WRAPPERS = {"ema": "ema", "state_dict_ema": "ema", "model": "model", "state_dict": "model"}


@dataclass
class Source:
    """What a checkpoint holds, before its format is known."""

    path: str
    state: State  # the one state dict to load (a training checkpoint's EMA or model weights)
    metadata: dict[str, str]  # safetensors metadata, or the string entries of a torch.save dict
    config: dict | None = None  # a diffusers folder's config.json


def read_file(path: str | Path, weights: str | None = None) -> Source:
    """The state dict of one checkpoint file; `weights` picks "ema" or "model" in a training checkpoint."""
    p = Path(path)
    obj, metadata = _read_container(p)
    if metadata is None:
        metadata = {k: v for k, v in obj.items() if isinstance(v, str)}
    return Source(str(path), _unwrap(obj, str(path), weights), metadata)


def check_finite(source: Source) -> None:
    """NaN or inf weights (a diverged run, a damaged copy) would sample noise: refuse them at load."""
    bad = next((k for k, v in source.state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise FlexDiTError(f"{source.path} holds NaN or infinite values in {bad}; the weights are damaged "
                           "(a diverged run?): use another checkpoint")


def first_sentence(e: BaseException) -> str:
    """The first sentence of a library's message, whole: enough to name the problem, never cut mid-word."""
    line = (str(e).strip().splitlines() or [""])[0]
    return re.split(r"(?<=\.)\s", line, maxsplit=1)[0].rstrip(".") or type(e).__name__


# --- containers -------------------------------------------------------------------------------------------
def _read_container(p: Path) -> tuple[dict, dict | None]:
    """The top-level dict of the file, and its safetensors metadata (None for torch.save files)."""
    size = check_input_file(p, "checkpoint").st_size
    if size == 0:
        raise FlexDiTError(f"{p} is empty (0 bytes), not a checkpoint")
    head = _read_bytes(p, 0, 9)
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(p):
            raise FlexDiTError(f"{p} is truncated: a PyTorch zip checkpoint without the zip directory at its end")
        return _torch_load(p), None
    header_length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and header_length <= SAFETENSORS_MAX_HEADER:
        return _read_safetensors(p, size, header_length)
    if head.startswith(PICKLE_PROTO):
        return _torch_load(p), None
    raise FlexDiTError(f"{p} is not a checkpoint: neither safetensors nor a PyTorch file (torch.save's zip or "
                       "pickle)")


def _read_bytes(p: Path, offset: int, n: int) -> bytes:
    try:
        with open(p, "rb") as f:
            f.seek(offset)
            return f.read(n)
    except OSError as e:
        raise FlexDiTError(f"cannot read {p}: {e.strerror}") from None


def _read_safetensors(p: Path, size: int, header_length: int) -> tuple[State, dict]:
    """The tensors and metadata, once the file is known to hold every byte its header promises."""
    data_start = 8 + header_length
    if data_start > size:
        raise FlexDiTError(f"{p} is truncated: its safetensors header alone should take {data_start} bytes, "
                           f"the file has {size}")
    try:
        header = json.loads(_read_bytes(p, 8, header_length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, AttributeError, TypeError, KeyError, IndexError):  # not JSON, or not safetensors' layout
        raise FlexDiTError(f"{p} is a damaged safetensors file: its header is not a valid tensor index") from None
    if not all(isinstance(end, int) for end in ends):
        raise FlexDiTError(f"{p} is a damaged safetensors file: its header lists invalid tensor offsets")
    if data_start + max(ends, default=0) > size:
        raise FlexDiTError(f"{p} is truncated: its safetensors header promises {data_start + max(ends)} bytes, "
                           f"the file has {size}")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise FlexDiTError(f"{p} is a damaged safetensors file ({first_sentence(e)})") from None
    return state, header.get("__metadata__") or {}


def _torch_load(p: Path) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only; torch's advice to retry with
    weights_only=False (running the file's code) is never passed on."""
    try:
        # argparse.Namespace is plain data; the authors' training checkpoints store their "args" in one.
        # A file object, not the name: torch.load takes any name ending in .safetensors for safetensors.
        with open(p, "rb") as f, warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the load fails cleanly anyway
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        first = f" (first: {unsafe.group(1)})" if unsafe else ""
        raise FlexDiTError(f"{p} holds pickled Python objects{first} that flexdit will not unpickle (unsafe); "
                           "re-save only its tensors: torch.save(model.state_dict(), path) or safetensors") from None
    except EOFError:
        raise FlexDiTError(f"{p} is truncated: its PyTorch pickle ends early") from None
    except Exception as e:  # torch raises many types for damaged files
        raise FlexDiTError(f"{p} is a truncated or damaged PyTorch checkpoint ({first_sentence(e)})") from None
    if not isinstance(obj, dict):
        raise FlexDiTError(f"{p} holds a {type(obj).__name__}, not a state dict")
    return obj


# --- the state dict inside ------------------------------------------------------------------------------
def _unwrap(obj: dict, path: str, weights: str | None) -> State:
    """A training checkpoint {"model", "ema", "opt", ...}, a PixArt file {"state_dict", "state_dict_ema"?} or a bare
    state dict -> one state dict."""
    wrapped = [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
    if weights is not None:
        if weights not in ("ema", "model"):
            raise FlexDiTError(f"weights must be 'ema' or 'model', got {weights!r}")
        chosen = [k for k in wrapped if WRAPPERS[k] == weights]
        if not chosen:
            has = ", ".join(wrapped) or "a bare state dict"
            raise FlexDiTError(f"{path} has no {weights!r} weights (it has: {has})")
        obj = obj[chosen[0]]
    elif wrapped:
        obj = obj[wrapped[0]]  # EMA weights are the ones to sample and evaluate with
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FlexDiTError(f"{path} holds no tensors under {', '.join(map(repr, obj)) or 'its top level'}")
    return _unwrap_prefixes(tensors)


def _unwrap_prefixes(state: State) -> State:
    """Drop the prefixes added by DistributedDataParallel ('module.') and torch.compile ('_orig_mod.')."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
