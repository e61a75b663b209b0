# Licensed under a 3-clause BSD style license - see LICENSE
"""The pixel-integrated Gaussian broadening shared by the kinematics and the template builder."""

import numpy as np
import pytest

from cubesfh._spectral import gaussian_broadening_matrix


def _moments(row, wave):
    w = row / row.sum()
    mean = np.sum(w * wave)
    return mean, np.sum(w * (wave - mean) ** 2)


def test_broadening_width_and_normalisation():
    # 1 A pixels, sigma 3 A: the response to a delta has unit sum, is centred on
    # the pixel and has variance sigma^2 + 1/12 (the Gaussian integrated over a
    # pixel: Sheppard's correction).
    wave = np.arange(4000.0, 4200.0)
    sigma = np.full(wave.size, 3.0)
    m = gaussian_broadening_matrix(wave, sigma).toarray()
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-12)
    mean, var = _moments(m[100], wave)
    assert mean == pytest.approx(wave[100], abs=1e-9)
    assert var == pytest.approx(3.0**2 + 1.0 / 12.0, rel=1e-4)
    # a constant spectrum stays constant, edges included (rows normalised)
    np.testing.assert_allclose(m @ np.full(wave.size, 2.5), 2.5, rtol=1e-12)


def test_broadening_zero_and_varying_sigma():
    wave = np.exp(np.linspace(np.log(4600.0), np.log(4700.0), 300))  # log-sampled
    sigma = np.zeros(wave.size)
    np.testing.assert_array_equal(gaussian_broadening_matrix(wave, sigma).toarray(),
                                  np.eye(wave.size))
    # a sigma that grows along the spectrum: each row has its own width
    sigma = np.linspace(0.5, 2.0, wave.size)
    m = gaussian_broadening_matrix(wave, sigma)
    for i in (60, 150, 240):
        step = np.diff(wave)[i]
        _, var = _moments(m[i].toarray().ravel(), wave)
        assert var == pytest.approx(sigma[i] ** 2 + step**2 / 12.0, rel=2e-3)
    # the variance of independent pixels goes through the squared weights
    var_in = np.full(wave.size, 4.0)
    var_out = m.power(2) @ var_in
    i = 150
    assert var_out[i] == pytest.approx(4.0 * np.sum(m[i].toarray() ** 2), rel=1e-12)
    # ... about var / (2 sqrt(pi) sigma / pixel) for a smooth sigma many pixels wide
    assert var_out[i] == pytest.approx(4.0 / (2 * np.sqrt(np.pi) * sigma[i] / np.diff(wave)[i]),
                                       rel=0.01)
