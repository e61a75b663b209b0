# Licensed under a 3-clause BSD style license - see LICENSE
"""
The spectro-photometric forward model (Galceran et al. 2026, sections 2.2-2.3).

:class:`ForwardModel` turns star formation histories (mass formed per age
sub-interval of the template library) into what the network sees:

1. **Chemical evolution** (eq. 2): the metallicity of the stars formed in
   each sub-interval is Z = Z_start + (Z_final - Z_start) m/M, where m/M is
   the fraction of the total mass formed before the middle of the
   sub-interval (Z_start = 0.008, Z_final ~ U(0.010, 0.030)). The spectra at
   that Z interpolate the library linearly in log Z.
2. **Dust** (eq. 1, Charlot & Fall 2000): every population is attenuated by
   exp[-tau_ISM (lambda / 5500 A)^-0.7] and populations younger than 10 Myr,
   with their nebular emission, additionally by exp[-tau_BC (lambda / 5500 A)^-0.7];
   tau_ISM ~ N(0.3, 0.08) (clipped at 0), tau_BC log-uniform in 0.5-4. The paper
   writes the exponent as the "slope n = 0.7"; we use the Charlot & Fall sign
   convention (optical depth decreasing with wavelength).
3. **Nebular emission** of the populations younger than 10 Myr: the Cloudy
   continuum and lines of the library (log U = -3, no escape of ionising
   photons), the lines drawn as Gaussians with the same width as the stellar
   features.
4. **HST fluxes**: photon-weighted mean f_lambda through the WFC3/UVIS
   throughputs (the PHOTFLAM convention).
5. **MUSE spectra**: the library (MILES, FWHM 2.5 A) degraded to the MUSE
   line-spread function and broadened by 150 km/s, i.e. a Gaussian of
   sigma^2 = sigma_MUSE(lambda)^2 - sigma_MILES^2 + (150 km/s lambda / c)^2, rebinned
   flux-conservingly to 4800-7000 A at 1.25 A (1761 pixels), the same
   resolution as an observed spectrum after :func:`~cubesfh.restframe.prepare_spectra`.
6. **Normalisation** by the mean flux in 5300-5500 A; the photometry is divided
   by the same number.
7. **Noise** (optional): Poisson-like, variance proportional to the flux,
   scaled so that the S/N *per Angstrom* in 5300-5500 A equals the requested
   value (per 1.25 A pixel it is sqrt(1.25) times higher), the convention of
   :meth:`cubesfh.Cube.signal_noise` and of the Voronoi binning; plus a
   Gaussian relative error on each HST flux (default 2 %).

All of it is linear algebra on templates pre-processed once: the per-sample
cost is two matrix products and a few element-wise operations.
"""

import numpy as np
from astropy import constants as const
from astropy import units as u

from .._spectral import gaussian_smooth, rebin_flux_conserving
from ..conventions import (
    AGE_BIN_CENTERS,
    HST_BANDS,
    N_AGE_BINS,
    NORM_WINDOW,
    OUTPUT_WAVELENGTH,
    SIGMA_TARGET,
    Z_SUN,
)
from ..lsf import FWHM_TO_SIGMA, muse_lsf_fwhm

__all__ = ["ATTENUATION_LAWS", "ForwardModel", "attenuation_curve", "dust_transmission",
           "metallicity_history"]

C_KMS = const.c.to_value(u.km / u.s)
#: Charlot & Fall (2000) attenuation slope and pivot.
DUST_SLOPE = -0.7
DUST_PIVOT = 5500.0
#: Age below which populations sit in their birth clouds (yr).
BIRTH_CLOUD_AGE = 1.0e7
Z_START = 0.008
#: Window defining the V-band light of the light-weighted means (A).
V_WINDOW = (5450.0, 5550.0)


def dust_transmission(wavelength, tau, *, slope=DUST_SLOPE, pivot=DUST_PIVOT):
    """
    Transmission exp[-tau (lambda / pivot)^slope] of eq. 1.

    Parameters
    ----------
    wavelength : `~numpy.ndarray` or `~astropy.units.Quantity`
        Wavelengths (A if plain numbers), shape ``(n_pix,)``.
    tau : float or `~numpy.ndarray`
        Optical depth at ``pivot``, shape ``(n,)`` for ``n`` spectra.
    slope : float or `~numpy.ndarray`, optional
        Exponent (Charlot & Fall 2000: -0.7); one value, or one per spectrum
        (shape ``(n,)``).
    pivot : float, optional
        Pivot wavelength (A).

    Returns
    -------
    t : `~numpy.ndarray`
        Shape ``(n, n_pix)`` (or ``(n_pix,)`` for scalar ``tau``).
    """
    w = u.Quantity(wavelength, u.AA).value
    tau = np.asarray(tau, float)
    slope = np.asarray(slope, float)
    return np.exp(-tau[..., None] * (w / pivot) ** slope[..., None])


#: Shapes of the ISM attenuation curve the broad simulator draws from
#: (`attenuation_curve`): the power law of eq. 1 (Charlot & Fall 2000, with
#: its slope drawn), the starburst curve of Calzetti et al. (2000), an
#: SMC-bar-like curve (no 2175 A bump; Gordon et al. 2003) and the Milky Way
#: curve of Cardelli, Clayton & Mathis (1989), R_V = 3.1 (with the bump, which
#: falls in F275W).
ATTENUATION_LAWS = ("power", "calzetti", "smc", "mw")


def attenuation_curve(wavelength, law):
    """
    Attenuation curve A(lambda) / A(5500 A) of a named law.

    Parameters
    ----------
    wavelength : `~numpy.ndarray` or `~astropy.units.Quantity`
        Wavelengths (A if plain numbers), 1000 A to 3 micron.
    law : {'calzetti', 'smc', 'mw'}
        ``'calzetti'``: Calzetti et al. (2000, eq. 4), R_V = 4.05, extended
        below 1200 A and above 2.2 micron by its end segments.
        ``'smc'``: the SMC-bar form ``A ~ lambda^-1.2`` of Prevot et al.
        (1984) / Bouchet et al. (1985), which matches Gordon et al. (2003)
        to a few per cent from 1500 A to 1 micron (no bump).
        ``'mw'``: `cubesfh.extinction.ccm89`, R_V = 3.1.

    Returns
    -------
    curve : `~numpy.ndarray`
        Same shape as ``wavelength``; 1 at 5500 A.

    Examples
    --------
    >>> import numpy as np
    >>> from cubesfh.synthesis.model import attenuation_curve
    >>> np.round(attenuation_curve([2750.0, 5500.0, 8000.0], "calzetti"), 3)
    array([1.816, 1.   , 0.635])
    """
    w = u.Quantity(wavelength, u.AA).to_value(u.micron)

    def calzetti(x):
        x = np.asarray(x, float)
        k = np.where(x < 0.63,
                     2.659 * (-2.156 + 1.509 / x - 0.198 / x**2 + 0.011 / x**3) + 4.05,
                     2.659 * (-1.857 + 1.040 / x) + 4.05)
        return k

    if law == "calzetti":
        return calzetti(w) / calzetti(0.55)
    if law == "smc":
        return (w / 0.55) ** -1.2
    if law == "mw":
        from ..extinction import ccm89

        return ccm89(w * u.micron) / float(ccm89(5500.0 * u.AA))
    msg = f"law={law!r}: choose one of {ATTENUATION_LAWS[1:]} (or 'power', eq. 1)."
    raise ValueError(msg)


def ism_transmission(wavelength, tau, slope, law):
    """
    ISM transmission of spectra with per-spectrum attenuation laws.

    Parameters
    ----------
    wavelength : `~numpy.ndarray`
        A, ``(n_pix,)``.
    tau : `~numpy.ndarray`
        Optical depth at 5500 A, ``(n,)``.
    slope : float or `~numpy.ndarray`
        Exponent of the power law (used where ``law`` is 0).
    law : `~numpy.ndarray`
        ``(n,)`` integer index into `ATTENUATION_LAWS`.

    Returns
    -------
    t : `~numpy.ndarray`
        ``(n, n_pix)``.
    """
    w = np.asarray(wavelength, float)
    tau = np.asarray(tau, float)
    law = np.broadcast_to(np.asarray(law, int), tau.shape)
    out = dust_transmission(w, tau, slope=slope)
    for j in np.unique(law[law > 0]):
        sel = law == j
        # outside 0.1-3 micron the filters carry no weight; hold the curve there
        curve = attenuation_curve(np.clip(w, 1000.0, 30000.0), ATTENUATION_LAWS[j])
        out[sel] = np.exp(-tau[sel, None] * curve[None, :])
    return out


def metallicity_history(mass, z_final, *, z_start=Z_START):
    """
    Metallicity of the stars formed in each sub-interval (eq. 2).

    Parameters
    ----------
    mass : `~numpy.ndarray`
        Mass formed per sub-interval, shape ``(n, n_age)``, ordered by
        increasing look-back time (youngest first).
    z_final : `~numpy.ndarray`
        Metallicity of the youngest stars, shape ``(n,)``.
    z_start : float or `~numpy.ndarray`, optional
        Metallicity of the first stars (one value, or one per history).

    Returns
    -------
    z : `~numpy.ndarray`
        Shape ``(n, n_age)``: Z at the middle (in mass) of each sub-interval.
    """
    mass = np.asarray(mass, float)
    total = mass.sum(axis=1, keepdims=True)
    # cumulative mass formed from the oldest population up to each sub-interval
    older = np.cumsum(mass[:, ::-1], axis=1)[:, ::-1] - mass  # formed before it
    frac = (older + 0.5 * mass) / total
    z_start = np.asarray(z_start, float)
    if z_start.ndim:
        z_start = z_start[:, None]
    return z_start + (np.asarray(z_final, float)[:, None] - z_start) * frac


def _log_z_weights(z, grid):
    """Linear-in-log Z interpolation weights, shape z.shape + (n_grid,)."""
    lz = np.log10(np.clip(z, grid[0], grid[-1]))
    lg = np.log10(grid)
    j = np.clip(np.searchsorted(lg, lz, side="right") - 1, 0, grid.size - 2)
    t = (lz - lg[j]) / (lg[j + 1] - lg[j])
    w = np.zeros(z.shape + (grid.size,))
    np.put_along_axis(w, j[..., None], (1 - t)[..., None], axis=-1)
    np.put_along_axis(w, (j + 1)[..., None], t[..., None], axis=-1)
    return w


class ForwardModel:
    """
    Spectra and HST fluxes of star formation histories, as the network sees them.

    Parameters
    ----------
    library : `~cubesfh.templates.TemplateLibrary`, optional
        Default: the shipped library.
    sigma_target : `~astropy.units.Quantity`, optional
        Velocity broadening on top of the MUSE LSF (150 km/s).
    lsf : callable, optional
        MUSE FWHM versus wavelength (:func:`~cubesfh.lsf.muse_lsf_fwhm`),
        evaluated at the rest wavelength (z ~ 0.002 for PHANGS).
    output_wavelength : `~astropy.units.Quantity`, optional
        Output grid (4800-7000 A at 1.25 A).
    bands : sequence of str, optional
        HST bands (default: the five PHANGS-HST bands).
    """

    def __init__(self, library=None, *, sigma_target=SIGMA_TARGET, lsf=muse_lsf_fwhm,
                 output_wavelength=OUTPUT_WAVELENGTH, bands=HST_BANDS):
        from ..templates import TemplateLibrary, load_filters

        lib = TemplateLibrary.load() if library is None else library
        self.library = lib
        self.bands = tuple(bands)
        self.wavelength = output_wavelength.to(u.AA)
        self.sigma_target = sigma_target.to(u.km / u.s)
        w = lib.wavelength.to_value(u.AA)
        wout = self.wavelength.value
        nz, na = lib.n_metallicity, lib.n_age
        # Gaussian kernel: MUSE LSF minus the template resolution, plus sigma_target
        sig_lsf = lsf(w * u.AA).to_value(u.AA) * FWHM_TO_SIGMA
        sig_tmp = lib.fwhm.to_value(u.AA) * FWHM_TO_SIGMA
        sig_v = self.sigma_target.value * w / C_KMS
        self._lsf_sigma = sig_lsf
        self._kernel_sigma = np.sqrt(np.clip(sig_lsf**2 - sig_tmp**2, 0, None) + sig_v**2)
        flat = lib.flux.reshape(nz * na, -1).astype(float)
        smooth = gaussian_smooth(w, flat, self._kernel_sigma[None, :])
        self.stellar = rebin_flux_conserving(w, smooth, wout).reshape(nz, na, -1)

        # nebular emission of the birth-cloud populations (< 10 Myr)
        edges = lib.age_edges.to_value(u.yr)
        self.young = edges[1:] <= BIRTH_CLOUD_AGE + 1.0
        self.n_young = int(self.young.sum())
        ny = self.n_young
        sed_w = lib.sed_wavelength.to_value(u.AA)
        neb_cont = lib.nebular_sed[:, :ny]
        neb_opt = np.stack([[np.interp(wout, sed_w, s) for s in zz] for zz in neb_cont])
        lw = lib.line_wavelength.to_value(u.AA)
        lines = lib.nebular_lines[:, :ny]  # L_sun / M_sun
        in_opt = (lw > wout[0] - 30) & (lw < wout[-1] + 30)
        sig_line = np.interp(lw[in_opt], w, self._kernel_sigma)
        de = rebin_edges = _edges(wout)
        prof = _gaussian_pixel_integrals(rebin_edges, lw[in_opt], sig_line) / np.diff(de)[None]
        self._nebular_continuum = neb_opt
        neb_opt = neb_opt + np.einsum("zyl,lp->zyp", lines[..., in_opt], prof)
        self.nebular = neb_opt  # (nz, n_young, n_pix)
        # per-line luminosities for lines of any width (see `synthesize`)
        self._line_lum = lines[..., in_opt]  # (nz, n_young, n_lines)
        self._line_wave = lw[in_opt]
        self._line_profile = prof  # (n_lines, n_pix) unit-flux, stellar-kernel width

        # SEDs for the photometry: stellar, and nebular continuum + lines in 10 A pixels
        self.sed_wavelength = lib.sed_wavelength
        sed_edges = _edges(sed_w)
        in_sed = (lw > sed_edges[0]) & (lw < sed_edges[-1])
        idx = np.searchsorted(sed_edges, lw[in_sed]) - 1
        neb_sed = lib.nebular_sed[:, :ny].astype(float).copy()
        self._sed_nebular_continuum = neb_sed.copy()
        for k, j in zip(np.flatnonzero(in_sed), idx):
            neb_sed[:, :, j] += lines[:, :, k] / (sed_edges[j + 1] - sed_edges[j])
        self.sed_stellar = lib.sed_flux.astype(float)
        self.sed_nebular = neb_sed
        filters = load_filters(self.bands)
        for f in filters:
            f.check_coverage(lib.sed_wavelength)
        self.band_weights = np.stack([f.weights(lib.sed_wavelength) for f in filters], axis=1)
        self._sed_line_index = np.flatnonzero(in_sed)
        self._sed_line_wave = lw[in_sed]

        # V-band light per unit mass of each template (dust-free stars)
        vsel = (w >= V_WINDOW[0]) & (w <= V_WINDOW[1])
        self.v_light = lib.flux[:, :, vsel].mean(axis=2).astype(float)  # (nz, na)
        nsel = (wout >= NORM_WINDOW[0].to_value(u.AA)) & (wout <= NORM_WINDOW[1].to_value(u.AA))
        self._norm_pixels = nsel
        self._bin_matrix = np.zeros((N_AGE_BINS, na))
        self._bin_matrix[lib.age_bin, np.arange(na)] = 1.0
        self.log_age_centers = np.log10(AGE_BIN_CENTERS.to_value(u.yr))

    # ------------------------------------------------------------------
    def coefficients(self, mass, z):
        """
        Template weights ``(n, n_metallicity, n_age)`` for masses and metallicities.

        Parameters
        ----------
        mass, z : `~numpy.ndarray`
            Mass formed and metallicity per sub-interval, shape ``(n, n_age)``.
        """
        wz = _log_z_weights(np.asarray(z, float), self.library.metallicity)  # (n, na, nz)
        return np.einsum("na,naz->nza", np.asarray(mass, float), wz)

    def synthesize(self, mass, z, tau_ism, tau_bc, *, nebular=True, ism_slope=DUST_SLOPE,
                   line_sigma=None, line_scale=None, ism_law=None):
        """
        Noise-free, un-normalised spectra and HST fluxes.

        Parameters
        ----------
        mass : `~numpy.ndarray`
            Mass formed per sub-interval (solar masses), ``(n, n_age)``.
        z : `~numpy.ndarray`
            Metallicity per sub-interval, ``(n, n_age)``.
        tau_ism, tau_bc : `~numpy.ndarray`
            Optical depths at 5500 A, ``(n,)``.
        nebular : bool, optional
            Include the nebular continuum and lines.
        ism_slope : float or `~numpy.ndarray`, optional
            Exponent of the ISM attenuation curve (one value or one per
            spectrum; Charlot & Fall 2000: -0.7). The birth clouds keep -0.7.
        line_sigma : `~numpy.ndarray`, optional
            Velocity dispersion (km/s, ``(n,)``) of the nebular lines on top of
            the MUSE line-spread function, in the frame of the network inputs,
            i.e. sqrt(sigma_gas^2 + sigma_target^2 - sigma_star^2) for a gas
            dispersion sigma_gas in a galaxy of stellar dispersion sigma_star.
            Default: the lines have the width of the stellar features (the
            paper's model).
        line_scale : `~numpy.ndarray`, optional
            Multiplier of the nebular line luminosities, ``(n,)`` (default 1).
        ism_law : `~numpy.ndarray`, optional
            ``(n,)`` index into `ATTENUATION_LAWS` of the ISM curve of each
            spectrum (default: all 0, the power law with ``ism_slope``).

        Returns
        -------
        spectra : `~numpy.ndarray`
            ``(n, 1761)`` in L_sun / A.
        photometry : `~numpy.ndarray`
            ``(n, n_bands)`` in L_sun / A (mean f_lambda in each band).
        """
        coef = self.coefficients(mass, z)
        n = coef.shape[0]
        ny = self.n_young
        c_old = coef.copy()
        c_old[:, :, :ny] = 0.0
        c_young = coef[:, :, :ny]
        nz, na = coef.shape[1:]
        cy = c_young.reshape(n, -1)
        wout = self.wavelength.value
        sed_w = self.sed_wavelength.to_value(u.AA)
        law = np.zeros(n, int) if ism_law is None else np.asarray(ism_law, int)
        t_ism = ism_transmission(wout, tau_ism, ism_slope, law)
        t_bc = dust_transmission(wout, tau_bc)
        custom = line_sigma is not None or line_scale is not None
        young_opt = cy @ self.stellar[:, :ny].reshape(nz * ny, -1)
        if nebular and not custom:
            young_opt += cy @ self.nebular.reshape(nz * ny, -1)
        elif nebular:
            scale = np.ones(n) if line_scale is None else np.asarray(line_scale, float)
            young_opt += cy @ self._nebular_continuum.reshape(nz * ny, -1)
            lum = (cy @ self._line_lum.reshape(nz * ny, -1)) * scale[:, None]
            if line_sigma is None:
                young_opt += lum @ self._line_profile
            else:
                young_opt += self.line_spectra(lum, self._line_wave, line_sigma)
        spec = c_old.reshape(n, -1) @ self.stellar.reshape(nz * na, -1)
        spec = t_ism * (spec + t_bc * young_opt)
        ts_ism = ism_transmission(sed_w, tau_ism, ism_slope, law)
        ts_bc = dust_transmission(sed_w, tau_bc)
        young_sed = cy @ self.sed_stellar[:, :ny].reshape(nz * ny, -1)
        if nebular and not custom:
            young_sed += cy @ self.sed_nebular.reshape(nz * ny, -1)
        elif nebular:
            young_sed += cy @ self._sed_nebular_continuum.reshape(nz * ny, -1)
        sed = c_old.reshape(n, -1) @ self.sed_stellar.reshape(nz * na, -1)
        sed = ts_ism * (sed + ts_bc * young_sed)
        phot = sed @ self.band_weights
        if nebular and custom:
            k = self._sed_line_index
            lum = (cy @ self.library.nebular_lines[:, :ny][..., k].reshape(nz * ny, -1))
            lum *= scale[:, None]
            lw = self._sed_line_wave
            trans = (ism_transmission(lw, tau_ism, ism_slope, law)
                     * dust_transmission(lw, tau_bc))
            phot = phot + self.line_photometry(lum * trans, lw)
        return spec, phot

    def stellar_budget(self, mass, z, tau_ism, tau_bc, *, ism_slope=DUST_SLOPE, ism_law=None):
        """
        Present-day stellar mass and V-band light of star formation histories.

        The truths behind the physical maps (:mod:`cubesfh.physical`): the
        mass in living stars and in remnants, and the dust-free and
        attenuated stellar light in the V window (5450-5550 A; the
        attenuation is evaluated at 5500 A, with the same dust model as
        `synthesize`; nebular emission is not stellar light and is left out).

        Parameters
        ----------
        mass, z, tau_ism, tau_bc, ism_slope, ism_law
            As in `synthesize`.

        Returns
        -------
        budget : dict of `~numpy.ndarray`
            ``(n,)`` arrays: ``living`` and ``remnants`` (solar masses),
            ``v_intrinsic`` and ``v_attenuated`` (mean L_lambda in the V
            window, L_sun / A).
        """
        coef = self.coefficients(mass, z)  # (n, nz, na)
        lib = self.library
        n = coef.shape[0]
        living = np.einsum("nza,za->n", coef, lib.living_fraction)
        remnants = np.einsum("nza,za->n", coef, lib.remnant_fraction)
        light = coef * self.v_light[None]
        young = light[:, :, :self.n_young].sum(axis=(1, 2))
        old = light.sum(axis=(1, 2)) - young
        law = np.zeros(n, int) if ism_law is None else np.asarray(ism_law, int)
        v = np.array([DUST_PIVOT])
        t_ism = ism_transmission(v, np.asarray(tau_ism, float), ism_slope, law)[:, 0]
        t_bc = dust_transmission(v, np.asarray(tau_bc, float))[:, 0]
        return {"living": living, "remnants": remnants, "v_intrinsic": old + young,
                "v_attenuated": t_ism * (old + t_bc * young)}

    def line_spectra(self, flux, wavelength, sigma_kms):
        """
        Gaussian emission lines on the output grid, each spectrum with its own width.

        Parameters
        ----------
        flux : `~numpy.ndarray`
            Line fluxes ``(n, n_lines)`` (any flux unit; the result is per A).
        wavelength : `~numpy.ndarray`
            Rest wavelengths of the lines (A), ``(n_lines,)``.
        sigma_kms : `~numpy.ndarray`
            Velocity dispersion on top of the MUSE LSF, ``(n,)`` km/s.

        Returns
        -------
        spectra : `~numpy.ndarray`
            ``(n, n_pix)``.

        Notes
        -----
        The profiles are computed exactly on a geometric grid of dispersions
        (10-600 km/s, 5 % steps) and each spectrum takes the nearest one: a
        2.5 % error on the width at most.
        """
        flux = np.atleast_2d(np.asarray(flux, float))
        wavelength = np.asarray(wavelength, float)
        sig = np.clip(np.asarray(sigma_kms, float), 10.0, 600.0)
        grid = 10.0 * 1.05 ** np.round(np.log(sig / 10.0) / np.log(1.05))
        wout = self.wavelength.value
        e = _edges(wout)
        lsf = np.interp(wavelength, self.library.wavelength.to_value(u.AA), self._lsf_sigma)
        out = np.zeros((flux.shape[0], wout.size))
        for g in np.unique(grid):
            sel = grid == g
            s = np.sqrt(lsf**2 + (g * wavelength / C_KMS) ** 2)
            prof = _gaussian_pixel_integrals(e, wavelength, s) / np.diff(e)[None]
            out[sel] = flux[sel] @ prof
        return out

    def synthesize_native(self, mass, z, tau_ism, tau_bc, *, nebular=True,
                          gas_sigma=30 * u.km / u.s):
        """
        Noise-free rest-frame spectra at the template resolution (for mock cubes).

        Same model as `synthesize`, on the library's optical grid
        (:attr:`~cubesfh.templates.TemplateLibrary.wavelength`, FWHM 2.5 A)
        without the MUSE LSF or the 150 km/s broadening; nebular lines have
        the template resolution plus ``gas_sigma``. Observe the result with
        :func:`cubesfh.datasets.broaden_and_shift`.

        Returns
        -------
        spectra : `~numpy.ndarray`
            ``(n, n_wavelength)`` in L_sun / A.
        """
        lib = self.library
        coef = self.coefficients(mass, z)
        n, nz, na = coef.shape
        ny = self.n_young
        w = lib.wavelength.to_value(u.AA)
        c_old = coef.copy()
        c_old[:, :, :ny] = 0.0
        c_young = coef[:, :, :ny]
        flux = lib.flux.astype(float)
        young = c_young.reshape(n, -1) @ flux[:, :ny].reshape(nz * ny, -1)
        if nebular:
            sed_w = lib.sed_wavelength.to_value(u.AA)
            cont = np.stack([[np.interp(w, sed_w, s) for s in zz]
                             for zz in lib.nebular_sed[:, :ny]])
            lw = lib.line_wavelength.to_value(u.AA)
            sel = (lw > w[0] - 30) & (lw < w[-1] + 30)
            sig = np.sqrt((lib.fwhm.to_value(u.AA) * FWHM_TO_SIGMA) ** 2
                          + (gas_sigma.to_value(u.km / u.s) * lw[sel] / C_KMS) ** 2)
            e = _edges(w)
            prof = _gaussian_pixel_integrals(e, lw[sel], sig) / np.diff(e)[None]
            neb = cont + np.einsum("zyl,lp->zyp", lib.nebular_lines[:, :ny][..., sel], prof)
            young += c_young.reshape(n, -1) @ neb.reshape(nz * ny, -1)
        old = c_old.reshape(n, -1) @ flux.reshape(nz * na, -1)
        return dust_transmission(w, tau_ism) * (old + dust_transmission(w, tau_bc) * young)

    def line_photometry(self, flux, wavelength):
        """
        HST fluxes (mean f_lambda per band) of emission lines.

        Parameters
        ----------
        flux : `~numpy.ndarray`
            Line fluxes ``(n, n_lines)``.
        wavelength : `~numpy.ndarray`
            Rest wavelengths of the lines (A).

        Returns
        -------
        photometry : `~numpy.ndarray`
            ``(n, n_bands)``, in the unit of ``flux`` per A.
        """
        e = _edges(self.sed_wavelength.to_value(u.AA))
        idx = np.clip(np.searchsorted(e, np.asarray(wavelength, float)) - 1, 0, e.size - 2)
        return np.asarray(flux, float) @ (self.band_weights[idx] / np.diff(e)[idx, None])

    def normalize(self, spectra, photometry):
        """Divide spectra and photometry by the mean spectrum in 5300-5500 A."""
        norm = spectra[:, self._norm_pixels].mean(axis=1)
        return spectra / norm[:, None], photometry / norm[:, None], norm

    def add_noise(self, rng, spectra, photometry, snr, *, phot_error=0.02):
        """
        Poisson-like noise at a given S/N per Angstrom (in 5300-5500 A).

        Parameters
        ----------
        rng : `numpy.random.Generator`
        spectra : `~numpy.ndarray`
            Normalised spectra ``(n, n_pix)`` (mean 1 in the window).
        photometry : `~numpy.ndarray`
            ``(n, n_bands)``.
        snr : float or `~numpy.ndarray`
            S/N per Angstrom, scalar or ``(n,)``.
        phot_error : float, optional
            Relative 1-sigma error of each HST flux.

        Returns
        -------
        spectra, photometry, variance : `~numpy.ndarray`
        """
        snr = np.broadcast_to(np.asarray(snr, float), (spectra.shape[0],))
        dl = self.wavelength.value[1] - self.wavelength.value[0]
        snr_pix = snr * np.sqrt(dl)  # per pixel of dl Angstrom
        level = spectra[:, self._norm_pixels].mean(axis=1)
        var = np.clip(spectra, 0, None) * level[:, None] / snr_pix[:, None] ** 2
        noisy = spectra + rng.standard_normal(spectra.shape) * np.sqrt(var)
        phot = photometry * (1 + phot_error * rng.standard_normal(photometry.shape))
        return noisy, phot, var

    # ------------------------------------------------------------------
    def labels(self, mass, z):
        """
        Training labels and mean ages/metallicities (eqs. 6-7).

        Parameters
        ----------
        mass, z : `~numpy.ndarray`
            Mass formed and metallicity per sub-interval, ``(n, n_age)``, or
            ``(n, n_components, n_age)`` for spectra that add up several
            populations (each with its own chemistry); the labels describe
            their sum.

        Returns
        -------
        labels : dict
            ``mass_fraction`` (n, 16): fraction of the present living stellar
            mass in each age bin (sums to 1); ``metallicity`` (n, 16): mean
            [Z/H] of the stars of each bin (weighted by living mass; the eq. 2
            value for empty bins); ``mass_formed`` (n, 16): fraction of the
            mass formed; ``light_fraction`` (n, 16): V-band (5450-5550 A,
            dust-free) light fractions; ``logage_lw``, ``logage_mw``, ``zh_lw``,
            ``zh_mw`` (n,).
        """
        mass = np.asarray(mass, float)
        z = np.asarray(z, float)
        if mass.ndim == 2:  # one component per spectrum
            mass, z = mass[:, None], z[:, None]
        lib = self.library
        wz = _log_z_weights(z, lib.metallicity)  # (n, n_comp, na, nz)
        living_c = mass * np.einsum("ncaz,za->nca", wz, lib.living_fraction)
        light = (mass * np.einsum("ncaz,za->nca", wz, self.v_light)).sum(axis=1)
        living = living_c.sum(axis=1)
        b = self._bin_matrix
        mf = living @ b.T
        mf /= mf.sum(axis=1, keepdims=True)
        formed = mass.sum(axis=1) @ b.T
        formed /= formed.sum(axis=1, keepdims=True)
        lf = light @ b.T
        lf /= lf.sum(axis=1, keepdims=True)
        zh = np.log10(z / Z_SUN)
        dur = np.diff(lib.age_edges.to_value(u.yr))
        # a tiny constant weight gives empty bins the eq. 2 value of each component
        wgt = living_c + 1e-12 * dur * living_c.sum(axis=2, keepdims=True) / dur.sum()
        zbin = (wgt * zh).sum(axis=1) @ b.T / (wgt.sum(axis=1) @ b.T)
        la = self.log_age_centers
        return {
            "mass_fraction": mf,
            "metallicity": zbin,
            "mass_formed": formed,
            "light_fraction": lf,
            "logage_mw": mf @ la,
            "logage_lw": lf @ la,
            "zh_mw": np.sum(mf * zbin, axis=1),
            "zh_lw": np.sum(lf * zbin, axis=1),
        }


def _edges(centers):
    from .._spectral import pixel_edges

    return pixel_edges(centers)


def _gaussian_pixel_integrals(edges, mu, sigma):
    """Integral of unit Gaussians (mu, sigma) over each pixel, shape (n_lines, n_pix)."""
    from scipy.special import ndtr

    z = (edges[None, :] - mu[:, None]) / sigma[:, None]
    return np.diff(ndtr(z), axis=1)
