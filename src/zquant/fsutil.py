"""Filesystem helpers: atomic writes, file hashes, and zquant's cache root.

`atomic_directory` writes a directory under a temporary sibling ``.NAME.tmp-XXXX`` and puts it in
place with one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant NAME
is either the old complete directory or the new one. Where the kernel or filesystem cannot
exchange, it falls back to two renames (a crash between them leaves NAME absent, the old copy in
``.NAME.old-XXXX``), and says so once. Each writer holds an ``flock`` on its temporary siblings
while it lives; the next save removes the siblings whose lock it can take (their writer died),
never those of a writer still running.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2's system call number, for a libc that lacks the wrapper (glibc < 2.28, some musl builds).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_root() -> Path:
    """``$ZQUANT_CACHE`` (default ``~/.cache/zquant``): dequantized GGUF models, built kernels, benchmarks."""
    return Path(os.environ.get("ZQUANT_CACHE", Path.home() / ".cache" / "zquant"))


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """errno of ``renameat2(src, dst, flags)`` (0 on success, ENOSYS where there is no such call)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return errno.ENOSYS
    fn = getattr(libc, "renameat2", None)
    args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        result = fn(*args)
    elif platform.system() == "Linux" and platform.machine() in _SYS_RENAMEAT2:
        libc.syscall.restype = ctypes.c_long
        result = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), ctypes.c_int(args[0]), args[1],
                              ctypes.c_int(args[2]), args[3], ctypes.c_uint(flags))
    else:
        return errno.ENOSYS
    return ctypes.get_errno() if result != 0 else 0


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist); False where the
    kernel or filesystem has no exchange (the caller falls back). Other failures raise OSError."""
    err = _renameat2(a, b, _RENAME_EXCHANGE)
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if err:
        raise OSError(err, os.strerror(err), str(b))
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` and ``root`` itself, so the
    new data is on disk before the swap makes it the only copy."""
    for entry in root.rglob("*"):
        if not entry.is_symlink():
            _fsync(entry)
    _fsync(root)


def _remove(path: Path) -> None:
    """Delete whatever is at ``path`` (directory tree, file or symbolic link), never following links."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _locked_dir(prefix: str, parent: Path) -> tuple[Path, int]:
    """A new directory ``parent/prefixXXXX`` and an fd holding an exclusive ``flock`` on it. A
    cleaner may remove the directory between its creation and the lock: then make another."""
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` next to ``path`` left by interrupted saves: those
    whose lock can be taken now (a live writer holds its own). When ``path`` is missing, a stale
    ``.NAME.old-*`` (the previous copy) is first moved back to ``path``. Returns what was removed."""
    removed = []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    for sibling in path.parent.iterdir():
        if not sibling.name.startswith(prefixes) or sibling.is_symlink():
            continue
        try:
            fd = os.open(sibling, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)                       # its writer is alive
            continue
        try:
            if sibling.name.startswith(prefixes[1]) and not os.path.lexists(path):
                # A two-rename swap died between its renames: the previous copy goes back in place.
                with contextlib.suppress(OSError):
                    os.rename(sibling / "d", path)
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
        finally:
            os.close(fd)
    return removed


_warned_no_exchange: list[bool] = []


def _two_renames(tmp: Path, path: Path) -> tuple[Path, int] | None:
    """The fallback swap: ``path`` into a locked ``.NAME.old-XXXX/d``, then ``tmp`` onto ``path``.
    Returns the old directory and its lock fd, or None when another writer got in between."""
    if not _warned_no_exchange:
        _warned_no_exchange.append(True)
        warnings.warn(f"zquant: {path.parent} cannot exchange directories atomically (renameat2); replacing "
                      f"{path.name} with two renames", RuntimeWarning, stacklevel=5)
    old, fd = _locked_dir(f".{path.name}.old-", path.parent)

    def drop() -> None:
        _remove(old)
        os.close(fd)
    try:
        os.replace(path, old / "d")
    except OSError as e:
        drop()
        if e.errno == errno.ENOENT:            # another writer moved it away first
            return None
        raise
    try:
        os.rename(tmp, path)
        return old, fd
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            drop()                             # another writer's directory landed first: it is newer
            return None
        try:
            os.rename(old / "d", path)         # put the previous copy back before failing
        except OSError:
            os.close(fd)                       # keep .NAME.old-*: it holds the only previous copy
            raise e from None
        drop()
        raise


def _swap_in(tmp: Path, path: Path) -> tuple[Path | None, int | None]:
    """Put ``tmp`` at ``path``; returns where the old entry now is (to delete) and the fd of any
    lock taken for it. Retries (boundedly) when another writer creates or replaces ``path`` meanwhile."""
    for _ in range(100):
        if os.path.lexists(path):
            if exchange(tmp, path):
                return tmp, None
            moved = _two_renames(tmp, path)
            if moved is not None:
                return moved
            continue
        try:
            os.rename(tmp, path)
            return None, None
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
    raise OSError(errno.EBUSY, f"{path} keeps changing under concurrent writers; try again")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` (a directory,
    or with the caller's consent a file or link) atomically, after everything in it is fsynced."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"{str(path)!r}: name the directory to write, not '.' or '..'")
    path.parent.mkdir(parents=True, exist_ok=True)
    parent = path.parent
    remove_stale_siblings(path)
    tmp, fd = _locked_dir(f".{path.name}.tmp-", parent)
    old_fd = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())        # mkdtemp makes 0700: a checkpoint gets the user's usual mode
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):                # some writers (safetensors) create their files 0600
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)
        _fsync_tree(tmp)
        old, old_fd = _swap_in(tmp, path)
        _fsync(parent)                          # the swap itself is durable before the old copy goes
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(fd)
        if old_fd is not None:
            os.close(old_fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
