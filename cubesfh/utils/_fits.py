# Licensed under a 3-clause BSD style license - see LICENSE
"""
Opening FITS inputs with a one-line error for each usual way a file is broken.

`open_fits` is what the readers of cubes and HST images use instead of a bare
`astropy.io.fits.open`: missing paths, directories, empty files, files that are
not FITS (text, an HTML error page, a PNG), corrupt or truncated gzip/bzip2
files and truncated FITS files (astropy opens those lazily and only fails, or
silently drops the last extensions, when the data are read) are reported with
the name of the file, what is wrong and what to do.
"""

import bz2
import gzip
import math
import os
import warnings
import zlib
from pathlib import Path

from astropy.io import fits

from .exceptions import CubeSFHError

__all__ = ["FITS_BLOCK", "check_input_file", "describe_content", "fits_size_problem",
           "open_fits"]

#: Size of a FITS block: every header and every data unit fills whole blocks.
FITS_BLOCK = 2880

_FITS_SIGNATURE = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"

_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x80\x02", "a Python pickle"),
)


def describe_content(head):
    """
    A few words on what the first bytes of a file look like, for messages.

    Parameters
    ----------
    head : bytes
        The first bytes of the file.

    Returns
    -------
    description : str
        E.g. ``'a PNG image'``, ``"text starting 'hello world'"``, ``'binary data'``.
    """
    if not head:
        return "nothing (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    stripped = head.lstrip()
    if stripped[:1] == b"<" and b"html" in stripped[:200].lower():
        return "an HTML page (a web error page saved in place of the file?)"
    try:
        text = head[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"text starting {first!r}"
    return "binary data"


def check_input_file(path, what="file"):
    """
    Check that ``path`` is a non-empty file.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The input.
    what : str, optional
        What the file should be, for the messages (e.g. ``'MUSE cube'``).

    Returns
    -------
    path : `~pathlib.Path`
        The path, with ``~`` expanded.
    size : int
        Its size in bytes.

    Raises
    ------
    FileNotFoundError
        If it does not exist.
    IsADirectoryError
        If it is a directory.
    CubeSFHError
        If it is empty.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        msg = (f"{what} {str(path)!r} is a directory, not a file; give the path of the FITS "
               "file itself.")
        raise IsADirectoryError(msg)
    if not path.is_file():
        msg = (f"{what} {str(path)!r} not found (working directory {os.getcwd()}); check the "
               "path and the file name.")
        raise FileNotFoundError(msg)
    size = path.stat().st_size
    if size == 0:
        msg = (f"{what} {path} is empty (0 bytes): the copy or download did not complete; "
               "fetch the file again.")
        raise CubeSFHError(msg)
    return path, size


def _decompressed(path, kind, what):
    """Size and first block of a gzip/bzip2 file, reading it all (checks the CRC)."""
    opener = gzip.open if kind == "gzip" else bz2.open
    size = 0
    head = b""
    try:
        with opener(path, "rb") as stream:
            while True:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                if size < FITS_BLOCK:
                    head += chunk[:FITS_BLOCK]
                size += len(chunk)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        msg = (f"{what} {path} is a corrupt or truncated {kind} file ({exc}; {size} bytes "
               f"could be decompressed); copy or download it again (check it with "
               f"'{'gzip' if kind == 'gzip' else 'bzip2'} -t').")
        raise CubeSFHError(msg) from None
    return size, head


def fits_size_problem(hdul, actual, *, tail=None):
    """
    Why a FITS file of ``actual`` bytes cannot hold what its headers describe.

    The expected size is the end of the last data unit, from the headers'
    data sizes (``BITPIX``, ``NAXISn``, ``PCOUNT``, ``GCOUNT``) and their
    offsets in the file, padded to whole 2880-byte blocks.

    Parameters
    ----------
    hdul : `~astropy.io.fits.HDUList`
        The file, opened with ``lazy_load_hdus=False`` (every header read).
    actual : int
        Size of the (decompressed) file in bytes.
    tail : bytes, optional
        The bytes after the end of the last data unit, when known; a tail
        starting with ``XTENSION`` that is not a whole number of blocks is an
        extension header cut short.

    Returns
    -------
    problem : str or `None`
        ``'truncated: ...'`` with the expected and actual sizes, or `None` if
        the size is consistent.
    """
    expected, last = 0, None
    for index, hdu in enumerate(hdul):
        try:
            info = hdul.fileinfo(index)
        except (AttributeError, KeyError, IndexError, ValueError):
            continue
        if not info or info.get("datLoc") is None:
            continue
        end = int(info["datLoc"]) + int(info.get("datSpan") or 0)
        if end >= expected:
            expected, last = end, hdu.name or f"#{index}"
    if last is None:
        return None
    if actual < expected:
        return (f"truncated: its headers describe {expected} bytes (extension {last} ends "
                f"there) but the file has only {actual} bytes ({expected - actual} missing)")
    extra = actual - expected
    if extra % FITS_BLOCK and (tail is None or tail.startswith(b"XTENSION")):
        whole = math.ceil(actual / FITS_BLOCK) * FITS_BLOCK
        return (f"truncated: it ends inside the header of the extension after {last} "
                f"({actual} bytes, not a whole number of 2880-byte FITS blocks; at least "
                f"{whole} expected)")
    return None


def open_fits(path, *, what="FITS file", memmap=False):
    """
    Open a FITS file (plain, gzip or bzip2), refusing broken files with a clear error.

    Every header is read (``lazy_load_hdus=False``) and the size of the file
    is compared with what the headers describe, so a truncated file fails
    here, naming the expected and actual sizes, instead of later (as a missing
    extension or a memory-map error). Compressed files are decompressed once
    to check their integrity.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The file.
    what : str, optional
        What the file should be, for the messages (``'MUSE cube'``, ``'HST image'``).
    memmap : bool, optional
        Passed to `astropy.io.fits.open`.

    Returns
    -------
    hdul : `~astropy.io.fits.HDUList`
        Open; close it (or use it as a context manager).

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        For a missing path or a directory.
    CubeSFHError
        For an empty file, a file that is not FITS, a corrupt compressed file
        or a truncated FITS file.
    """
    path, size = check_input_file(path, what)
    with open(path, "rb") as handle:
        head = handle.read(FITS_BLOCK)
    kind = "gzip" if head.startswith(_GZIP_MAGIC) else (
        "bzip2" if head.startswith(_BZIP2_MAGIC) else None)
    if kind is not None:
        actual, head = _decompressed(path, kind, what)
        inside = f" once decompressed ({kind})"
    else:
        actual, inside = size, ""
    if not head.startswith(_FITS_SIGNATURE):
        msg = (f"{what} {path} is not a FITS file: it holds {describe_content(head)}{inside} "
               "instead of a FITS header (SIMPLE = T); check that the path points to the "
               "FITS file.")
        raise CubeSFHError(msg)
    with warnings.catch_warnings():
        # a truncated file or extra bytes: checked below, with a better message
        warnings.filterwarnings("ignore", message="File may have been truncated")
        warnings.filterwarnings("ignore", message="Error validating header")
        try:
            hdul = fits.open(path, memmap=memmap, lazy_load_hdus=False)
        except (OSError, ValueError, EOFError) as exc:
            if actual < FITS_BLOCK or actual % FITS_BLOCK:
                whole = math.ceil(actual / FITS_BLOCK) * FITS_BLOCK
                msg = (f"{what} {path} is truncated: it ends inside its first header "
                       f"({actual} bytes, not a whole number of 2880-byte FITS blocks; at "
                       f"least {whole} expected); copy or download it again.")
            else:
                msg = (f"{what} {path} is a corrupt FITS file ({exc}); copy or download it "
                       "again.")
            raise CubeSFHError(msg) from None
    try:
        tail = None
        if kind is None:
            ends = [hdul.fileinfo(i) for i in range(len(hdul))]
            end = max((int(e["datLoc"]) + int(e.get("datSpan") or 0) for e in ends
                       if e and e.get("datLoc") is not None), default=0)
            if 0 < end < actual:
                with open(path, "rb") as handle:
                    handle.seek(end)
                    tail = handle.read(8)
        problem = fits_size_problem(hdul, actual, tail=tail)
    except Exception:
        hdul.close()
        raise
    if problem is not None:
        hdul.close()
        msg = f"{what} {path} is {problem}; copy or download it again."
        raise CubeSFHError(msg)
    return hdul
