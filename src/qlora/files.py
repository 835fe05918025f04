"""Outputs that appear whole or not at all: staged beside their final path, then renamed; and
refused up front where their disk cannot hold them."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _give_ordinary_modes(staged: Path) -> None:
    """Every file in `staged` (a file, or a directory's files at any depth) given the mode an
    ordinary open() gives: writers such as safetensors' save_file create their files 0600
    (a private temp file renamed into place), and an output is for whoever may read its folder."""
    mode = 0o666 & ~_umask()
    files = [staged] if staged.is_file() else [p for p in staged.rglob("*") if p.is_file()]
    for path in files:
        if not path.is_symlink():  # chmod would change the file a link points to
            os.chmod(path, mode)


@contextmanager
def staged_dir(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a new directory beside `final`; it becomes `final` only if the block completes.

    `replace` lets it take the place of an existing `final` (an adapter saved again); otherwise
    an existing `final` is left alone and the error raised by the caller's own check stands.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an output is an ordinary dir
    try:
        yield tmp
        _give_ordinary_modes(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} appeared while it was being written")
            remove_dir(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: str | Path) -> None:
    """Delete directory `path` so that it is never seen half-deleted: it is first renamed to a
    hidden sibling (one atomic step), then removed. A crash during the removal leaves only the
    hidden name, which readers skip and `staged_dir`'s users clean up."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".deleted", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` that is renamed to `final` if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _give_ordinary_modes(tmp)  # mkstemp's 0600, or a writer's that replaced the file
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def refuse_existing(path: str | Path, option: str) -> None:
    """Refuse (QloraError) an output that exists: outputs are new files, never overwritten."""
    from qlora.errors import QloraError

    if Path(path).exists():
        raise QloraError(f"{option} {path} exists; give a new {option} path (nothing is overwritten)")


def check_writable(path: str | Path, what: str) -> None:
    """Refuse (QloraError) an output `path` that cannot be created or written, before any slow
    work: its nearest existing ancestor must be a directory this process may write into."""
    from qlora.errors import QloraError

    path = Path(path)
    target = path if path.is_dir() else path.parent
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise QloraError(f"{what} {path} cannot be created: {probe} is a file, not a directory; "
                         f"choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QloraError(f"{what} {path} cannot be written: no write permission in {probe}; "
                         f"choose a path in a writable folder (or fix its permissions)")


def replaceable(folder: Path, ours: Callable[[], bool]) -> bool:
    """Whether a command may delete `folder` and write it again: missing, an empty directory, or
    a directory `ours` says a previous run of the command wrote (asked only then). A user's
    files are never lost to an output path given by mistake."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    return not any(folder.iterdir()) or ours()


def check_readable(path: str | Path, option: str) -> None:
    """Refuse (QloraError) an input `path` (a file, or a folder such as datasets' save_to_disk
    writes) that is missing or unreadable. Called before any slow work or output: found only
    where it is read, at a command's end, it would leave that command's outputs written and
    the rerun refused because they exist."""
    from qlora.errors import QloraError

    path = Path(path)
    if not path.exists():
        raise QloraError(f"{option} {path}: no such file; give the path of an existing file")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise QloraError(f"{option} {path} cannot be read: no read permission; fix its "
                         f"permissions or give another file")


def check_free_space(folder: str | Path, needed: int, total: int, what: str) -> None:
    """Refuse (QloraError) an output that would fill the disk: `needed` more bytes are to be
    written into `folder` (of a file `total` bytes in all), and its disk has fewer free. Checked
    before the slow work, not discovered at its end."""
    from qlora.errors import QloraError

    free = shutil.disk_usage(folder).free
    if free < needed:
        raise QloraError(f"{what}: {folder} has {free:,} bytes free ({free / 1e9:.2f} GB), and the "
                         f"file written there needs {needed:,} more ({total:,} bytes in all, "
                         f"{total / 1e9:.2f} GB); free that much space there, or give an {what} "
                         "on a disk with room")


@contextmanager
def disk_full_refused(folder: str | Path, what: str) -> Iterator[None]:
    """A write in the block that finds `folder`'s disk full (ENOSPC) raised as a QloraError naming
    `what`: a disk with less free than the metadata written before check_free_space can run, or
    one that other writers fill meanwhile."""
    from qlora.errors import QloraError

    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise QloraError(f"{what}: the disk of {folder} filled up while the file was written "
                         f"({shutil.disk_usage(folder).free:,} bytes free); free space there, or "
                         f"give an {what} on a disk with room") from err
