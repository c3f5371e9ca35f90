"""Bad files on the command line: every case fails with exit status 2 and one line naming the problem, for
each command that reads a checkpoint, and `convert` never writes over its input or leaves a file behind."""
import os
from pathlib import Path

import pytest
import torch

from flexdit.models.layout import Layout

from conftest import cli_fails, tiny_model

NO_DEV_ZERO = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
NO_FIFO = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


class Hook:
    """A custom class: unpickling it would import and run this module's code."""


def _saved(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    tiny_model().save(path)
    return path


def _cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _torch_file(tmp: Path, obj, zip_format: bool = True) -> Path:
    path = tmp / "model.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def _nan_weights(tmp: Path) -> Path:
    model = tiny_model()
    with torch.no_grad():
        model.blocks[3].mlp.fc1.weight[0, 0] = float("nan")
    model.save(tmp / "nan.safetensors")
    return tmp / "nan.safetensors"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe")
    return tmp / "pipe"


def _broken_link(tmp: Path) -> Path:
    (tmp / "link.pt").symlink_to(tmp / "gone.pt")
    return tmp / "link.pt"


def _folder(tmp: Path) -> Path:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "weights.pt").write_bytes(b"x")
    return tmp / "folder"


def _write(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


RANDOM_BYTES = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8).tolist())
# make(tmp_path) -> the bad path, and the words its message must hold
BAD_FILES = [
    pytest.param(lambda tmp: tmp / "missing.pt", ["not found"], id="missing"),
    pytest.param(_broken_link, ["symbolic link", "does not exist"], id="broken-symlink"),
    pytest.param(_write("empty.safetensors", b""), ["is empty"], id="empty"),
    pytest.param(lambda tmp: _cut(_saved(tmp), 0.5), ["truncated", "safetensors"], id="truncated-safetensors"),
    pytest.param(lambda tmp: _cut(_saved(tmp), 0.001), ["truncated", "header"], id="truncated-safetensors-header"),
    pytest.param(lambda tmp: _cut(_torch_file(tmp, tiny_model().state_dict()), 0.5), ["truncated", "zip"],
                 id="truncated-zip"),
    pytest.param(lambda tmp: _cut(_torch_file(tmp, tiny_model().state_dict(), zip_format=False), 0.5),
                 ["truncated"], id="truncated-legacy-pickle"),
    pytest.param(_write("model.pt", RANDOM_BYTES), ["not a checkpoint"], id="random-bytes"),
    pytest.param(_write("model.safetensors", b"hello world\n"), ["not a checkpoint"], id="text"),
    pytest.param(_fifo, ["named pipe", "not a regular file"], id="fifo", marks=NO_FIFO),
    pytest.param(lambda tmp: Path("/dev/zero"), ["character device", "not a regular file"], id="dev-zero",
                 marks=NO_DEV_ZERO),
    pytest.param(_folder, ["is a directory", "config.json"], id="directory"),
    pytest.param(lambda tmp: _torch_file(tmp, {"model": tiny_model().state_dict(), "hook": Hook()}),
                 ["pickled Python objects", "Hook", "will not unpickle"], id="custom-class-pickle"),
    pytest.param(lambda tmp: _torch_file(tmp, tiny_model()), ["pickled Python objects", "DiT"],
                 id="whole-module-pickle"),
    pytest.param(_nan_weights, ["NaN", "blocks.3.mlp.fc1.weight"], id="nan-weights"),
]
COMMANDS = {
    "info": lambda path, tmp: ["info", path],
    "convert": lambda path, tmp: ["convert", path, tmp / "out.safetensors"],
    "sample": lambda path, tmp: ["sample", "--ckpt", path, "--out", tmp / "samples.png", "--device", "cpu"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("make, words", BAD_FILES)
def test_bad_checkpoint_file_is_one_clear_line(capsys, tmp_path, command, make, words):
    path = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    message = cli_fails(capsys, *COMMANDS[command](path, tmp_path))
    for word in words:
        assert word in message
    assert "weights_only" not in message and "Traceback" not in message  # torch's unsafe advice is never passed on
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temporary file


# --- convert never replaces its input and writes nothing when it refuses ----------------------------------
def _same_path(src: Path, tmp: Path) -> Path:
    return src


def _symlink_to_src(src: Path, tmp: Path) -> Path:
    (tmp / "link.safetensors").symlink_to(src)
    return tmp / "link.safetensors"


def _hard_link_to_src(src: Path, tmp: Path) -> Path:
    os.link(src, tmp / "hard.safetensors")
    return tmp / "hard.safetensors"


def _existing_dst(src: Path, tmp: Path) -> Path:
    (tmp / "old.safetensors").write_bytes(b"an earlier result")
    return tmp / "old.safetensors"


def _new_dst(src: Path, tmp: Path) -> Path:
    return tmp / "new.safetensors"


def _dst_folder(src: Path, tmp: Path) -> Path:
    (tmp / "outdir").mkdir()
    return tmp / "outdir"


def _dst_fifo(src: Path, tmp: Path) -> Path:
    os.mkfifo(tmp / "out-pipe")
    return tmp / "out-pipe"


# dst(src, tmp_path) -> the output path, extra arguments, and the words the message must hold
BAD_CONVERSIONS = [
    pytest.param(_same_path, [], ["is the input"], id="same-path"),
    pytest.param(_symlink_to_src, [], ["is the input"], id="symlink-dst"),
    pytest.param(_hard_link_to_src, [], ["is the input"], id="hard-link-dst"),
    pytest.param(_dst_folder, [], ["is a directory"], id="dst-is-a-folder"),
    pytest.param(_dst_fifo, [], ["named pipe"], id="dst-is-a-fifo", marks=NO_FIFO),
    pytest.param(_new_dst, ["--density", "abc"], ["cannot read --density"], id="bad-density-new-dst"),
    pytest.param(_existing_dst, ["--density", "0.9,0.5"], ["r_min <= r_max"], id="bad-density-existing-dst"),
    pytest.param(_new_dst, ["--grid", "100"], ["larger than", "token grid"], id="grid-larger-than-tokens"),
    pytest.param(_existing_dst, ["--layout", "2+4x1-3-1-1+2"], ["28 blocks", "depth 12"], id="bad-layout"),
]


@pytest.mark.parametrize("dst, extra, words", BAD_CONVERSIONS)
def test_refused_convert_changes_no_file(capsys, tmp_path, dst, extra, words):
    src = tmp_path / "dense.safetensors"
    tiny_model(Layout.dense(12)).save(src)  # depth 12: the default FlexDiT layout applies
    out = dst(src, tmp_path)
    files = sorted(tmp_path.rglob("*"))
    contents = {p: p.read_bytes() for p in files if p.is_file()}
    message = cli_fails(capsys, "convert", src, out, *extra)
    for word in words:
        assert word in message
    assert sorted(tmp_path.rglob("*")) == files  # nothing new, not even a temporary file
    assert {p: p.read_bytes() for p in contents} == contents  # and nothing changed


def test_convert_refuses_an_output_inside_the_source_folder(capsys, tmp_path):
    folder = _folder(tmp_path)
    message = cli_fails(capsys, "convert", folder, folder / "out.safetensors")
    assert "inside the input folder" in message and not (folder / "out.safetensors").exists()
