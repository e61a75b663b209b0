# Licensed under a 3-clause BSD style license - see LICENSE
"""
Data-only cache files of per-bin results (no pickle).

A cache entry is a NumPy ``.npz`` archive read with ``allow_pickle=False``:
the structure of the value (lists, dicts, named tuples of an allow-list of
cubesfh result classes, plain scalars) is a JSON document stored as bytes,
the arrays are stored as arrays, and a SHA-256 over both is checked on
reading. Loading a cache file therefore never runs code, whoever wrote it,
and a damaged entry is detected (and recomputed by the caller) instead of
raising deep inside an unpickler.
"""

import hashlib
import importlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ._io import atomic_write

__all__ = ["CacheFormatError", "load_entry", "save_entry"]

#: Classes a cache entry may hold, by the name stored in the file. Nothing else
#: is ever constructed when reading.
_TYPES = {
    "PopulationFit": ("cubesfh.baseline", "PopulationFit"),
    "Failed": ("cubesfh.parallel", "_Failed"),
}

_FORMAT = "cubesfh-cache-1"


class CacheFormatError(ValueError):
    """A cache file that is damaged, of another format, or holds an unknown type."""


def _resolve(name):
    try:
        module, attr = _TYPES[name]
    except KeyError:
        msg = f"unknown type {name!r} in the cache file"
        raise CacheFormatError(msg) from None
    return getattr(importlib.import_module(module), attr)


def _type_name(value):
    for name, (module, attr) in _TYPES.items():
        cls = type(value)
        if cls.__module__ == module and cls.__qualname__ == attr:
            return name
    return None


def _encode(value, arrays):
    """JSON-able description of ``value``; arrays are appended to ``arrays``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return {"f": repr(float(value))}  # exact, and NaN/inf survive strict JSON
    if isinstance(value, np.ma.MaskedArray):
        msg = "masked arrays cannot be cached (the mask would be lost)"
        raise TypeError(msg)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            msg = "object arrays cannot be cached"
            raise TypeError(msg)
        # np.ascontiguousarray would turn a 0-d array into a 1-d one
        arrays.append(value if value.flags.c_contiguous else value.copy(order="C"))
        return {"a": len(arrays) - 1}
    name = _type_name(value)
    if name == "Failed":
        return {"t": name, "v": {"message": str(value.message)}}
    if name is not None:  # a NamedTuple result class
        return {"t": name, "v": {k: _encode(v, arrays) for k, v in value._asdict().items()}}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            msg = "only dicts with string keys can be cached"
            raise TypeError(msg)
        return {"d": {k: _encode(v, arrays) for k, v in value.items()}}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        msg = f"named tuples of type {type(value).__name__} cannot be cached (not allowed)"
        raise TypeError(msg)
    if isinstance(value, (list, tuple)):
        return {"l" if isinstance(value, list) else "u": [_encode(v, arrays) for v in value]}
    msg = f"values of type {type(value).__name__} cannot be cached"
    raise TypeError(msg)


def _decode(node, arrays):
    if node is None or isinstance(node, (bool, int, str)):
        return node
    if not isinstance(node, dict) or len(node) not in (1, 2):
        msg = "malformed structure"
        raise CacheFormatError(msg)
    if "f" in node:
        return float(node["f"])
    if "a" in node:
        return arrays[f"a{int(node['a'])}"]
    if "d" in node:
        return {k: _decode(v, arrays) for k, v in node["d"].items()}
    if "l" in node:
        return [_decode(v, arrays) for v in node["l"]]
    if "u" in node:
        return tuple(_decode(v, arrays) for v in node["u"])
    if "t" in node:
        cls = _resolve(node["t"])
        fields = {k: _decode(v, arrays) for k, v in node["v"].items()}
        if node["t"] == "Failed":
            return cls(fields["message"])
        return cls(**fields)
    msg = "malformed structure"
    raise CacheFormatError(msg)


def _digest(structure, arrays):
    h = hashlib.sha256(structure)
    for a in arrays:
        h.update(str(a.dtype.str).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_entry(path, value):
    """
    Write ``value`` to ``path`` atomically (`~cubesfh.utils.atomic_write`:
    temporary file, fsync, rename).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The ``.npz`` file.
    value : object
        Lists, tuples, string-keyed dicts, NumPy arrays, scalars, `None` and
        the result classes of the allow-list.

    Raises
    ------
    TypeError
        If ``value`` holds something else.
    """
    path = Path(path)
    arrays = []
    structure = json.dumps({"format": _FORMAT, "value": _encode(value, arrays)},
                           allow_nan=False).encode()
    buffer = io.BytesIO()
    np.savez(buffer, structure=np.frombuffer(structure, dtype=np.uint8),
             sha256=np.frombuffer(_digest(structure, arrays).encode(), dtype=np.uint8),
             **{f"a{i}": a for i, a in enumerate(arrays)})
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_entry(path):
    """
    Read a cache entry written by `save_entry`, checking its checksum.

    Parameters
    ----------
    path : str or `~pathlib.Path`

    Returns
    -------
    value : object

    Raises
    ------
    CacheFormatError
        If the file is damaged (truncated, checksum mismatch), of another
        format, or names a type outside the allow-list.
    """
    try:
        data = Path(path).read_bytes()  # read whole: np.load leaks the file on a bad archive
    except OSError as exc:
        msg = f"cannot be read ({exc.strerror or exc})"
        raise CacheFormatError(msg) from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        msg = f"unreadable ({type(exc).__name__}: {exc})"
        raise CacheFormatError(msg) from None
    try:
        structure = arrays.pop("structure").tobytes()
        stored = arrays.pop("sha256").tobytes().decode()
    except (KeyError, UnicodeDecodeError):
        msg = "not a cubesfh cache file"
        raise CacheFormatError(msg) from None
    ordered = [arrays[f"a{i}"] for i in range(len(arrays)) if f"a{i}" in arrays]
    if len(ordered) != len(arrays) or _digest(structure, ordered) != stored:
        msg = "checksum mismatch (the file was changed or damaged)"
        raise CacheFormatError(msg)
    try:
        doc = json.loads(structure)
    except (ValueError, RecursionError):
        msg = "malformed structure"
        raise CacheFormatError(msg) from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        msg = f"format {doc.get('format') if isinstance(doc, dict) else None!r}, not {_FORMAT}"
        raise CacheFormatError(msg)
    try:
        return _decode(doc["value"], arrays)
    except CacheFormatError:
        raise
    except Exception as exc:  # any structure the encoder never writes
        msg = f"malformed structure ({type(exc).__name__}: {exc})"
        raise CacheFormatError(msg) from None
