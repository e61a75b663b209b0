# Licensed under a 3-clause BSD style license - see LICENSE
"""Helpers shared by several test modules (``pythonpath = ["tests"]`` in pyproject.toml)."""

import re

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS


def one_line(text):
    """``text`` as a string, after checking that it is a single line."""
    assert "\n" not in str(text).strip(), f"not one line: {text!r}"
    return str(text)


def check_error(excinfo, cls, patterns):
    """Exact class, one line, and every pattern found in the message."""
    assert type(excinfo.value) is cls, f"{type(excinfo.value).__name__}: {excinfo.value}"
    text = one_line(excinfo.value)
    for pattern in patterns:
        assert re.search(pattern, text), f"{pattern!r} not in {text!r}"


def rotated_muse_wcs():
    """MUSE-like celestial WCS, 0.2 arcsec spaxels, rotated by 30 degrees (CD matrix)."""
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CUNIT1"], header["CUNIT2"] = "deg", "deg"
    header["CRPIX1"], header["CRPIX2"] = 5.5, 4.0
    header["CRVAL1"], header["CRVAL2"] = 150.1, 2.2
    s, t = 0.2 / 3600, np.deg2rad(30.0)
    header["CD1_1"], header["CD1_2"] = -s * np.cos(t), s * np.sin(t)
    header["CD2_1"], header["CD2_2"] = s * np.sin(t), s * np.cos(t)
    header["RADESYS"] = "ICRS"
    return WCS(header)


def gaussian_broaden(flux, sigma_kms, dv):
    """
    Brute-force convolution of a log-sampled spectrum with a Gaussian.

    ``sigma_kms`` (scalar or per pixel) is the Gaussian width and ``dv`` the
    pixel size, both in km/s; the ends are padded with the edge values.
    """
    s_pix = np.atleast_1d(np.asarray(sigma_kms, float) / dv)
    half = int(np.ceil(5 * s_pix.max()))
    padded = np.pad(flux, half, mode="edge")
    num = np.zeros_like(flux)
    den = np.zeros_like(flux)
    for k in range(-half, half + 1):
        w = np.exp(-0.5 * (k / s_pix) ** 2)
        num += w * padded[half + k: half + k + flux.size]
        den += w
    return num / den


def example_with_kinematics(directory, *, shape=(12, 12), seed=0):
    """
    The generated example observation plus ``kin.fits``: DAP-like ``V_STARS`` and
    ``SIGMA_STARS`` maps of its true kinematics (``example.kin``; ``example.dir``).
    """
    from pathlib import Path

    from cubesfh.datasets import make_example_observation

    directory = Path(directory)
    example = make_example_observation(directory, shape=shape, seed=seed)
    with fits.open(example.truth_path) as h:
        vel, sig, head = h["VELOCITY"].data, h["SIGMA"].data, h["VELOCITY"].header
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(vel, head, name="V_STARS"),
                  fits.ImageHDU(sig, head, name="SIGMA_STARS")]).writeto(directory / "kin.fits")
    example.kin = directory / "kin.fits"
    example.dir = directory
    return example


def true_kinematics_file(truth_path, path):
    """A PHANGS-DAP-like ``MAPS`` file (V_STARS, SIGMA_STARS) of a mock's true kinematics.

    Lets the pipeline tests skip the kinematic fits, which have tests of their own.
    """
    with fits.open(truth_path) as h:
        fits.HDUList([fits.PrimaryHDU(),
                      fits.ImageHDU(h["V"].data, h["V"].header, name="V_STARS"),
                      fits.ImageHDU(h["SIGMA"].data, h["SIGMA"].header, name="SIGMA_STARS")]
                     ).writeto(path)
    return path
