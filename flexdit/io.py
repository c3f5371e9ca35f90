"""Atomic file writes: a temporary file in the target's folder, flushed to disk, then renamed over the target,
so a crash (even SIGKILL) leaves either the old file or the new one, never half of one."""
import os
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from flexdit.errors import FlexDiTError

TEMP_PREFIX = ".flexdit-tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary path beside `path` (same name ending, so writers that add suffixes such
    as np.savez do not); it is fsynced and renamed to `path`, and the folder is fsynced."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexDiTError(f"cannot create the folder for {path}: {e.strerror}") from None
    tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{path.name[-64:]}"
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
