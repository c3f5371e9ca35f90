"""Atomic writes: the file appears whole, with the permissions a plain open() would give it, under any name,
and never in place of a folder or a special file."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexdit.errors import FlexDiTError
from flexdit.io import TEMP_PREFIX, atomic_write


def test_atomic_write_gives_umask_permissions_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.safetensors"
    atomic_write(path, lambda tmp: save_file({"w": torch.ones(3)}, str(tmp)))  # safetensors creates files 0600
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_atomic_write_takes_torch_save_to_a_name_without_a_dot(tmp_path):
    # torch.save refuses a file name with nothing before its last dot, as a bare ".prefix-out" would be.
    atomic_write(tmp_path / "out", lambda tmp: torch.save({"w": torch.ones(2)}, tmp))
    assert torch.equal(torch.load(tmp_path / "out", weights_only=True)["w"], torch.ones(2))


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: os.mkfifo(p), "named pipe"),
], ids=["directory", "fifo"])
def test_atomic_write_never_replaces_a_folder_or_special_file(tmp_path, make, words):
    target = tmp_path / "target"
    make(target)
    with pytest.raises(FlexDiTError, match=words):
        atomic_write(target, lambda tmp: tmp.write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"] and not target.is_file()
