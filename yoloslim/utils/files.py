"""Atomic file output: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from yoloslim.utils.errors import YoloslimError


def output_path(out: str | Path | None, default: Path, source: str | Path) -> Path:
    """Where a stage writes: `out`, or `default` when none is given; never its input file, never a folder."""
    target = Path(out) if out else Path(default)
    if target.resolve() == Path(source).resolve():
        raise YoloslimError(f"out {target} is the input file; yoloslim never overwrites its input, choose another path")
    if target.is_dir():
        raise YoloslimError(f"out {target} is a folder; pass a file path, such as {target / Path(default).name}")
    return target


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block finishes."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise YoloslimError(
            f"cannot write {target} ({e.strerror}); choose an output path in a writable folder"
        ) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs get the usual permissions
        os.replace(tmp, target)  # atomic on POSIX and Windows when on the same filesystem
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode())


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; move it onto `target` only if the block finishes.

    For a folder whose content is decided by its name (a cache entry), two processes may build it at once: the first
    to finish wins and the other's copy is dropped, instead of failing on the non-empty folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, to recognise the same input under another path or a changed one under the same."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
