# Licensed under a 3-clause BSD style license - see LICENSE
"""Atomic output."""

import os
import stat

import pytest

from cubesfh.utils import atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_write_respects_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / "maps.fits"
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"SIMPLE")
        mode = stat.S_IMODE(target.stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o666 & ~umask
    assert target.read_bytes() == b"SIMPLE"


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "maps.fits"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
