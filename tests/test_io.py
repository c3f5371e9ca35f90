"""Atomic writes: the file appears whole, with the permissions a plain open() would give it."""
import os

import torch
from safetensors.torch import load_file, save_file

from flexdit.io import TEMP_PREFIX, atomic_write


def test_atomic_write_gives_umask_permissions_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.safetensors"
    atomic_write(path, lambda tmp: save_file({"w": torch.ones(3)}, str(tmp)))  # safetensors creates files 0600
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))
