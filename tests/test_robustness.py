# Licensed under a 3-clause BSD style license - see LICENSE
"""Issue 17: attenuation laws, extended histories, model systematics, gaps as inputs."""

import numpy as np
import pytest
from astropy import units as u

from cubesfh.network._data import (
    AO_NOTCH_OBSERVED,
    GAP_REDSHIFT_RANGE,
    downsample_valid,
    gap_masks,
)
from cubesfh.synthesis.model import attenuation_curve, dust_transmission, ism_transmission
from cubesfh.synthesis.trainingset import (
    EXTENDED_TYPES,
    extended_history,
    spectral_systematics_basis,
)


def test_attenuation_curves_known_values():
    w = np.array([2750.0, 4400.0, 5500.0, 8000.0])
    # Calzetti et al. (2000) eq. 4 by hand, R_V = 4.05, over its value at 0.55 micron
    k = lambda x: 2.659 * (-2.156 + 1.509 / x - 0.198 / x**2 + 0.011 / x**3) + 4.05  # noqa: E731
    k_red = 2.659 * (-1.857 + 1.040 / 0.8) + 4.05
    expect = np.array([k(0.275), k(0.44), k(0.55), k_red]) / k(0.55)
    np.testing.assert_allclose(attenuation_curve(w, "calzetti"), expect, rtol=1e-12)
    np.testing.assert_allclose(attenuation_curve(w, "smc"), (w / 5500.0) ** -1.2)
    mw = attenuation_curve(np.array([1900.0, 2175.0, 2500.0, 5500.0]), "mw")
    assert mw[1] > mw[0] and mw[1] > mw[2]  # the 2175 A bump
    assert mw[3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="calzetti"):
        attenuation_curve(w, "lmc")


def test_ism_transmission_per_spectrum_law():
    w = np.linspace(2000.0, 9000.0, 50)
    tau = np.array([0.5, 0.5, 1.0])
    t = ism_transmission(w, tau, -0.7, np.array([0, 1, 3]))
    np.testing.assert_allclose(t[0], dust_transmission(w, 0.5))
    np.testing.assert_allclose(t[1], np.exp(-0.5 * attenuation_curve(w, "calzetti")))
    np.testing.assert_allclose(t[2], np.exp(-1.0 * attenuation_curve(w, "mw")))


def test_extended_histories():
    from cubesfh.templates import TemplateLibrary

    edges = TemplateLibrary.load().age_edges.to_value(u.yr)
    mass, kind = extended_history(np.random.default_rng(3), 4000, edges)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0)
    assert (mass >= 0).all()
    assert set(np.unique(kind % 10)) == set(range(len(EXTENDED_TYPES)))
    assert 0.25 < np.mean(kind >= 10) < 0.35  # a late burst in 30 %
    mid = 0.5 * (edges[1:] + edges[:-1])
    young5 = mass[:, mid < 5e9].sum(axis=1)
    # constant star formation over 13.5 Gyr puts ~37 % of the mass below 5 Gyr;
    # rising histories more, declining ones less: the 0.1-0.6 range is well covered
    assert np.mean((young5 > 0.1) & (young5 < 0.6)) > 0.5
    rising = (kind % 10) == 2
    constant = (kind % 10) == 0
    assert np.median(young5[rising]) > np.median(young5[constant])


@pytest.fixture(scope="module")
def two_models():
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.trainingset import training_library

    return [ForwardModel(training_library(n)) for n in ("bc03", "m11_miles")]


def test_spectral_systematics_basis(two_models):
    basis, scale = spectral_systematics_basis(two_models, n_components=6)
    assert basis.shape == (6, 1761)
    np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-10)
    assert (np.diff(scale) <= 0).all() and scale[0] > 0
    # the same library twice has no differences to learn from
    with pytest.raises(Exception, match="at least two libraries"):
        spectral_systematics_basis([two_models[0], two_models[0]])


def test_training_set_carries_the_systematics(tmp_path, two_models):
    import h5py

    from cubesfh.synthesis.trainingset import PHOT_SYSTEMATIC_MAG, make_training_set

    path = make_training_set(tmp_path / "ts.h5", n=400, chunk_size=200, seed=4,
                             libraries=("bc03", "m11_miles"), progress_bar=False)
    with h5py.File(path) as f:
        assert f.attrs["format"] == 2
        offs = f["phot_offset_rms"][:]
        sys_rms = f["systematics_rms"][:]
        law = f["ism_law"][:]
        ext = f["extended"][:]
        assert np.isfinite(f["spectra"][:]).all() and (f["photometry"][:] > 0).all()
    expect = np.sqrt(np.mean(np.square(PHOT_SYSTEMATIC_MAG)))
    assert 0.7 * expect < np.sqrt(np.mean(offs**2)) < 1.3 * expect
    assert np.median(sys_rms) > 0.005
    assert set(np.unique(law)) == {0.0, 1.0, 2.0, 3.0}
    assert 0.2 < np.mean(ext >= 0) < 0.4


def test_gap_masks():
    rng = np.random.default_rng(1)
    valid = gap_masks(rng, 5000)
    w = 4800.625 + 2.5 * np.arange(880)
    hit = (valid == 0).any(axis=1)
    assert 0.27 < hit.mean() < 0.33
    assert set(np.unique(valid)) == {0.0, 1.0}
    # the AO notch (270 A observed, 255-270 A at rest) in half of the 30 %
    lo = AO_NOTCH_OBSERVED[0] / (1 + GAP_REDSHIFT_RANGE[1])
    window = (w >= lo) & (w <= AO_NOTCH_OBSERVED[1])
    notch = (valid[:, window] == 0).sum(axis=1) >= 100
    assert 0.13 < notch.mean() < 0.2
    again = gap_masks(np.random.default_rng(1), 5000)
    np.testing.assert_array_equal(valid, again)


def test_downsample_valid():
    s = np.arange(12, dtype=float).reshape(2, 6)
    s[0, 1] = np.nan
    s[1, 2:4] = np.nan
    out, valid = downsample_valid(s)
    np.testing.assert_allclose(out, [[0.0, 2.5, 4.5], [6.5, 0.0, 10.5]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 1]])


torch = pytest.importorskip("torch")


def test_widened_network_is_the_old_one_on_complete_spectra():
    from cubesfh.network._model import SFHNet
    from cubesfh.network._train import widen_first_convolution

    torch.manual_seed(0)
    old = SFHNet().eval()
    new = SFHNet(mask_channel=True).eval()
    new.load_state_dict(widen_first_convolution(old.state_dict(), new.state_dict()))
    x = torch.randn(3, 880)
    p = torch.randn(3, 5)
    m = torch.ones(3, 5)
    with torch.no_grad():
        a = old(x, p, m)
        b = new(x, p, m, torch.ones(3, 880))
        gap = torch.ones(3, 880)
        gap[:, 400:500] = 0
        c = new(x, p, m, gap)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    # with the gap the widened network equals the old one on x zeroed over the gap
    with torch.no_grad():
        d = old(x * gap, p, m)
    torch.testing.assert_close(c[0], d[0])


def test_fast_path_with_validity_channel():
    from cubesfh.network._fast import FastSFHNet
    from cubesfh.network._model import SFHNet
    from cubesfh.network._uncertainty import continuum_pixels

    torch.manual_seed(1)
    net = SFHNet(mask_channel=True, uncertainty=True).eval()
    with torch.no_grad():
        net.conv[0].conv.weight[:, 1] += 0.3  # a validity channel that matters
        net.conv[2].act.weight[:3] = torch.tensor([1.3, -0.2, 0.5])  # slopes > 1 and < 0
    std = np.full(880, 0.5, np.float32)
    fast = FastSFHNet(net, std, continuum_pixels())
    assert fast.supports
    x = torch.randn(4, 880)
    p = torch.randn(4, 5)
    m = torch.ones(4, 5)
    valid = torch.ones(4, 880)
    valid[1, 300:420] = 0
    valid[2, 10:30] = 0
    with torch.no_grad():
        z_ref = net.encode(x * valid, p, m, valid)
        f_ref, zh_ref = net.decode(z_ref)
        ls_ref, rec, _ = net.heads(z_ref)
        z = fast.encode(x * valid, p, m, valid)
        f, zh = fast.decode(z)
        ls, _, r2 = fast.heads(z, x * valid, valid)
    torch.testing.assert_close(z, z_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(f, f_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ls, ls_ref, atol=2e-5, rtol=1e-4)
    keep = torch.from_numpy(continuum_pixels()) & (valid > 0)
    resid = ((x * valid - rec) * 0.5) ** 2
    expect = (resid * keep).sum(dim=1) / keep.sum(dim=1)
    torch.testing.assert_close(r2, expect, atol=1e-5, rtol=1e-4)


def test_cumulative_fractions_known_answer():
    from cubesfh.conventions import AGE_BIN_EDGES
    from cubesfh.network._predict import cumulative_fractions

    f = np.zeros((1, 16))
    f[0, :] = 1 / 16
    out = cumulative_fractions(f)
    edges = AGE_BIN_EDGES.to_value(u.Gyr)
    # 1 Gyr lies in the bin 0.687-1.089 Gyr: 9 whole bins and (1 - 0.687) / 0.402 of one
    i = np.searchsorted(edges, 1.0) - 1
    expect = (i + (1.0 - edges[i]) / (edges[i + 1] - edges[i])) / 16
    assert out["mass_younger_1gyr"][0] == pytest.approx(expect)
    assert out["mass_younger_0.1gyr"][0] < out["mass_younger_1gyr"][0] < \
        out["mass_younger_5gyr"][0]
