# Licensed under a 3-clause BSD style license - see LICENSE
"""
File helpers: atomic output (write to a temporary file beside the target, then
rename) and positional block reads of FITS image extensions.
"""

import contextlib
import errno
import functools
import os
import socket
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np

from .exceptions import CubeSFHError, CubeSFHWarning

__all__ = ["FileExtension", "atomic_write", "check_not_input", "check_writable",
           "describe_os_error", "file_digest", "output_lock", "sha256_file"]

#: Input files up to this size are hashed whole for the provenance; larger ones
#: (PHANGS mosaics of tens of GB) over their first `PARTIAL_HASH_BYTES` bytes.
WHOLE_HASH_LIMIT = 4 << 30

#: Bytes hashed of an input larger than `WHOLE_HASH_LIMIT`.
PARTIAL_HASH_BYTES = 64 << 20

# Largest single positional read (bytes); Linux caps one read at ~2 GB.
_MAX_READ = 1 << 30


@contextlib.contextmanager
def atomic_write(path, *, overwrite=False):
    """
    Context manager yielding a temporary path that replaces ``path`` on success.

    A crash or exception inside the block leaves ``path`` untouched (or absent)
    and removes the temporary file, so no half-written product is ever seen.
    The file gets the permissions of any new file (0666 less the umask), not
    the private 0600 of the temporary file.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Final file name.
    overwrite : bool, optional
        Replace an existing file. If `False` and ``path`` exists,
        `FileExistsError` is raised before anything is written.

    Yields
    ------
    tmp : `~pathlib.Path`
        Temporary file in the same directory as ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is `False`.
    IsADirectoryError
        If ``path`` is a directory.
    PermissionError, NotADirectoryError
        If the output folder is not writable, or is not a folder; the
        message names it.
    """
    path = Path(path)
    if path.is_dir():
        msg = (f"{path} is a directory; give the name of the file to write (e.g. "
               f"{path / 'maps.fits'}).")
        raise IsADirectoryError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True (or --overwrite) to replace it."
        raise FileExistsError(msg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError:
        msg = (f"cannot write {path}: the folder {path.parent} is not writable (permission "
               "denied); choose another output folder or fix its permissions.")
        raise PermissionError(msg) from None
    except (FileExistsError, NotADirectoryError):
        msg = (f"cannot write {path}: {path.parent} is not a folder (a file of that name is "
               "in the way); choose another output path.")
        raise NotADirectoryError(msg) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            _fsync(tmp)
            # mkstemp creates the file 0600; give the product the mode any other new
            # file would get (0666 less the umask), so colleagues can read it
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path):
    """Flush a file (or a folder's entries) to disk; best effort where not supported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:  # pragma: no cover - e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync
        pass
    finally:
        os.close(fd)


def check_not_input(output, inputs, *, option="the output"):
    """
    Refuse an output path that is one of the inputs (same path, link or inode).

    Parameters
    ----------
    output : str or `~pathlib.Path`
        The file about to be written.
    inputs : iterable of str or `~pathlib.Path`
        Files read by the same run (`None` entries are skipped).
    option : str, optional
        How the output was given, for the message (e.g. ``'-o/--output'``).

    Raises
    ------
    CubeSFHError
        If writing ``output`` would replace an input.
    """
    out = Path(output)
    for item in inputs:
        if item is None:
            continue
        src = Path(item)
        same = os.path.abspath(out) == os.path.abspath(src)
        if not same and out.exists() and src.exists():
            try:
                same = os.path.samefile(out, src)
            except OSError:  # pragma: no cover - vanished between the checks
                same = False
        if same:
            msg = (f"{option} {out} is the input file {src}: writing it would replace the "
                   "input; choose another output file name.")
            raise CubeSFHError(msg)


def _lock_owner_alive(text):
    """Whether the ``host:pid`` written in a lock file is a running process here."""
    host, _, pid = text.strip().rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine (shared file system), or unreadable: assume alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists under another user
        return True
    return True


def _busy(path, lock, owner):
    msg = (f"another cubesfh run ({owner.strip() or 'unknown process'}) is writing {path}; "
           f"wait for it to finish, choose another output, or remove {lock} if that run is "
           "no longer running.")
    return CubeSFHError(msg)


@contextlib.contextmanager
def output_lock(path):
    """
    Hold ``.<name>.lock`` beside ``path`` while a run that will write it works.

    Two runs writing the same product must not both "succeed": the second
    fails at once with a message naming the first. Where the system has
    ``flock`` (Linux, macOS) the lock is an advisory lock on that file, which
    the kernel releases when the process ends however it ends, so a run that
    was killed leaves no stale lock; the file is removed on release.
    Elsewhere the file is created exclusively and a lock whose process is
    gone is taken over with a warning.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The product the run will write.

    Raises
    ------
    CubeSFHError
        If another running process holds the lock.
    """
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    me = f"{socket.gethostname()}:{os.getpid()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None:  # pragma: no cover - Windows
        with _exclusive_file_lock(path, lock, me):
            yield lock
        return
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 256, 0).decode(errors="replace")
            finally:
                os.close(fd)
            raise _busy(path, lock, owner) from None
        # the file may have been released and removed between open and flock:
        # hold the lock only on the file that is still at that path
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # still holding the lock: nobody else can have it now
        os.close(fd)


@contextlib.contextmanager
def _exclusive_file_lock(path, lock, me):  # pragma: no cover - systems without flock
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = lock.read_text()
            except OSError:
                owner = ""
            if _lock_owner_alive(owner):
                raise _busy(path, lock, owner) from None
            msg = f"removing the stale lock {lock} of a run that is gone ({owner.strip()})."
            warnings.warn(msg, CubeSFHWarning)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        msg = f"could not take the lock {lock} of {path}; try again."
        raise CubeSFHError(msg)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == me:
                lock.unlink()


_ERRNO_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or write elsewhere",
    errno.EROFS: "the file system is read-only; write to another location",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EIO: "the disk or network file system reported an input/output error; "
               "check it and try again",
    errno.ENAMETOOLONG: "use a shorter file name",
}


def describe_os_error(exc):
    """
    One plain sentence for an `OSError`: the file, what happened, what to do.

    Messages that cubesfh wrote itself (no ``errno``) are returned unchanged.

    Parameters
    ----------
    exc : `OSError`

    Returns
    -------
    text : str
    """
    if exc.errno is None or not exc.strerror:
        return " ".join(str(exc).split()) or type(exc).__name__
    what = exc.strerror[0].lower() + exc.strerror[1:]
    where = f"{exc.filename}: " if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}: "
    hint = _ERRNO_HINTS.get(exc.errno)
    return f"{where}{what}" + (f"; {hint}." if hint else ".")


def check_writable(path, *, overwrite=False):
    """
    Check, before any work, that `atomic_write` will be able to write ``path``.

    A temporary file is created in the output folder (created if needed) and
    removed again, so that a run that would fail only when writing its
    product fails at once instead.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The output file.
    overwrite : bool, optional
        Whether an existing file may be replaced.

    Raises
    ------
    FileExistsError, IsADirectoryError, PermissionError, NotADirectoryError
        As `atomic_write` would.
    """
    try:
        with atomic_write(path, overwrite=overwrite):
            # abandon the write: the temporary file is removed, path left as it is
            raise _Probe
    except _Probe:
        pass


class _Probe(Exception):
    """Raised inside `check_writable`'s `atomic_write` block to abandon the write."""


def sha256_file(path, *, nbytes=None):
    """
    SHA-256 (hex) of a file, or of its first ``nbytes`` bytes.

    Parameters
    ----------
    path : str or `~pathlib.Path`
    nbytes : int, optional
        Hash only the beginning of the file (cheap provenance for huge cubes).

    Returns
    -------
    digest : str
    """
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if nbytes is not None:
            h.update(f.read(nbytes))
        else:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _cached_digest(path, size, mtime_ns, nbytes):
    return sha256_file(path, nbytes=nbytes)


def file_digest(path):
    """
    SHA-256 of an input file for the provenance, and what exactly was hashed.

    Files up to `WHOLE_HASH_LIMIT` bytes are hashed whole; larger ones over
    their first `PARTIAL_HASH_BYTES` bytes (hashing a 40 GB mosaic would add
    minutes to a run). The digest is computed once per file version (path,
    size and modification time) in a process.

    Parameters
    ----------
    path : str or `~pathlib.Path`

    Returns
    -------
    digest : str
        The 64 hexadecimal characters of the SHA-256.
    what : str
        ``'whole file'`` or ``'first N bytes'``.
    """
    path = os.path.abspath(path)
    st = os.stat(path)
    nbytes = None if st.st_size <= WHOLE_HASH_LIMIT else PARTIAL_HASH_BYTES
    digest = _cached_digest(path, st.st_size, st.st_mtime_ns, nbytes)
    what = "whole file" if nbytes is None else f"first {nbytes} bytes"
    return digest, what


class FileExtension:
    """
    Positional reads of blocks of a FITS image extension (no memory map).

    Reading through a memory map would leave every touched page of the file
    mapped, so the resident memory of the process would grow to the size of
    the cube; ``pread`` into a fresh buffer keeps it at the size of a chunk.
    The file descriptor is opened once, so a cube keeps reading the file it
    was read from even if the path is later replaced.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.
    offset : int
        Byte offset of the extension's data.
    dtype : `numpy.dtype`
        On-disk (big-endian) data type.
    shape : tuple of int
        NumPy shape of the array, ``(nlam, ny, nx)``.
    """

    def __init__(self, path, offset, dtype, shape):
        self.path = str(path)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def _pread(self, buffer, offset):
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            part = view[done:done + _MAX_READ]
            if hasattr(os, "preadv"):
                count = os.preadv(self._fd, [part], offset + done)
            else:  # pragma: no cover - Windows
                os.lseek(self._fd, offset + done, os.SEEK_SET)
                data = os.read(self._fd, len(part))
                count = len(data)
                part[:count] = data
            if count == 0:
                actual = os.fstat(self._fd).st_size
                msg = (f"{self.path} ended before the end of the cube: the file is truncated "
                       f"({actual} bytes, data needed up to byte {offset + len(view)}); copy "
                       "or download it again.")
                raise CubeSFHError(msg)
            done += count

    def read(self, lam, ys, xs):
        """Read ``[lam, ys, xs]`` (absolute, step-1 slices) as a native-endian array."""
        _, ny, nx = self.shape
        nlam, nrow, ncol = lam.stop - lam.start, ys.stop - ys.start, xs.stop - xs.start
        item = self.dtype.itemsize
        out = np.empty((nlam, nrow, ncol), dtype=self.dtype)
        if nlam * nrow * ncol == 0:
            return out.astype(self.dtype.newbyteorder("="))
        full_x = ncol == nx
        if full_x and nrow == ny:
            self._pread(out, self.offset + lam.start * ny * nx * item)
        else:
            buffer = None if full_x else np.empty((nrow, nx), dtype=self.dtype)
            for i, plane in enumerate(range(lam.start, lam.stop)):
                position = self.offset + (plane * ny + ys.start) * nx * item
                if full_x:
                    self._pread(out[i], position)
                else:
                    self._pread(buffer, position)
                    out[i] = buffer[:, xs]
        if self.dtype.byteorder not in ("=", "|") and self.dtype != self.dtype.newbyteorder("="):
            out.byteswap(inplace=True)
            out = out.view(self.dtype.newbyteorder("="))
        return out
