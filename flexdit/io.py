"""Files: atomic writes (a temporary file in the target's folder, flushed to disk, then renamed over the target,
so a crash, even SIGKILL, leaves either the old file or the new one, never half of one), and the checks that
keep a read from blocking on a FIFO or a device and a write from replacing its own input."""
import os
import stat
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from flexdit.errors import FlexDiTError

TEMP_PREFIX = ".flexdit-tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary path beside `path` (same name ending, so writers that add suffixes such
    as np.savez do not); it is fsynced and renamed to `path`, and the folder is fsynced."""
    path = Path(path)
    check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexDiTError(f"cannot create the folder for {path}: {e.strerror}") from None
    # The dot keeps a name part before the last dot even for `out`: torch.save refuses names without one.
    tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}.{path.name[-64:]}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it (some writers create 0600 files)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FlexDiTError(f"cannot write {path}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Tensors (copied to the CPU, contiguous) and string metadata as one safetensors file, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def check_input_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """The stat of `path` if it is a regular file; a folder, a FIFO or a device (/dev/zero, a terminal) is
    refused before it is opened, since reading one blocks or never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FlexDiTError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise FlexDiTError(f"{what} not found: {path}") from None
    except OSError as e:
        raise FlexDiTError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FlexDiTError(f"{path} is a directory, not a {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise FlexDiTError(f"{path} is a {_kind(st.st_mode)}, not a regular file; give the path of a {what} file")
    return st


def check_output(path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse an output path that is a folder or a special file, or that is (or lies in) the `source` it is
    made from, also through a symbolic or hard link: the write would replace its own input."""
    try:
        st = os.stat(path)
    except OSError:
        st = None  # a new file; the write itself reports an unwritable folder
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise FlexDiTError(f"cannot write {path}: it is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise FlexDiTError(f"cannot write {path}: it is a {_kind(st.st_mode)}, not a regular file; give a file name")
    if source is None or not os.path.exists(source):
        return
    if st is not None and os.path.samefile(source, path):
        raise FlexDiTError(f"{path} is the input {source} itself; write the output to another file")
    if os.path.isdir(source) and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(source)):
        raise FlexDiTError(f"{path} lies inside the input folder {source}, where it could replace the input's "
                           "files; write the output outside it")


def check_writable(path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Fail before a long run, not after it, when an output cannot be written: a folder or special file in its
    place, a file where a folder of its path should be, no permission, or the `source` it is made from."""
    check_output(path, source)
    target = Path(path).resolve()
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FlexDiTError(f"cannot write {path}: {parent} is a file, not a folder; choose another path")
            break
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f"{TEMP_PREFIX}probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise FlexDiTError(f"cannot write {path}: {e.strerror}; choose another output path") from None


def check_png_output(path: str | os.PathLike, flag: str, source: str | os.PathLike | None = None) -> None:
    """A writable path that says .png: flexdit writes PNG images, and a .jpg name holding PNG bytes misleads."""
    if Path(path).suffix.lower() != ".png":
        raise FlexDiTError(f"{flag} {path}: flexdit writes PNG images; give a path ending in .png")
    check_writable(path, source)


def check_output_folder(path: str | os.PathLike, flag: str = "--out", source: tuple[str, str] | None = None) -> None:
    """Fail before a long run when an output folder cannot be made or written: a file in its place or on its
    path, no permission, or inside the input folder `source` (its flag and path), whose contents it would join.
    Creates nothing: a refused command leaves no empty folder behind."""
    folder = Path(path)
    if source is not None and folder.resolve().is_relative_to(Path(source[1]).resolve()):
        raise FlexDiTError(f"{flag} {path} lies inside {source[0]} {source[1]}, where its files would join the "
                           "input; give a folder outside it")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies inside the file {existing}"
        raise FlexDiTError(f"{flag} {path} {where}; give a folder")
    probe = existing / f"{TEMP_PREFIX}probe-{os.getpid()}"  # where the folder, or its first new parent, goes
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise FlexDiTError(f"cannot write to {flag} {path}: {e.strerror}; choose another folder") from None


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporary files a killed process left in `folder` (they are never valid outputs)."""
    for stale in Path(folder).glob(f"{TEMP_PREFIX}*"):
        stale.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
