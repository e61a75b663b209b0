# Licensed under a 3-clause BSD style license - see LICENSE
"""Per-bin quality bitmask shared by the preprocessing products and the maps."""

import enum

__all__ = ["BinFlag"]


class BinFlag(enum.IntFlag):
    """
    Quality flags of a Voronoi bin (bit values; 0 = usable by the network).

    The ``FLAG`` extension of the products stores the bitwise OR of these.
    """

    #: Usable.
    OK = 0
    #: Stellar dispersion >= the largest dispersion of the models (150 km/s
    #: for a single model of the paper, 300 km/s for the bundled family): the
    #: spectrum was not broadened and is broader than the training spectra.
    SIGMA_TOO_HIGH = 1
    #: At least one HST band is non-positive or NaN in the bin (or not covered).
    PHOTOMETRY_NONPOSITIVE = 2
    #: The kinematic fit failed or no kinematics were available.
    KINEMATICS_FAILED = 4
    #: The kinematic fit ended at a bound of the allowed range (values kept).
    KINEMATICS_AT_BOUND = 8
    #: The rest-frame spectrum could not be prepared (bad normalisation, no data).
    SPECTRUM_FAILED = 16
    #: More than `~cubesfh.gaps.INCOMPLETE_LIMIT` (25 %) of the 4800-7000 A
    #: rest-frame range has no valid data: too little left to trust the bin.
    #: (Any smaller loss gives `SPECTRAL_GAP`.)
    SPECTRUM_INCOMPLETE = 32
    #: No HST image was given for this band set (spectrum-only input).
    NO_PHOTOMETRY = 64
    #: The network's out-of-distribution score exceeds 1 (``ood_score > 1``):
    #: the bin's inputs lie outside the training distribution and its
    #: predictions and intervals are extrapolations. Set only for models with
    #: uncertainty heads.
    OUT_OF_DISTRIBUTION = 128
    #: The CNN and the pPXF baseline disagree: ``|CNN - pPXF| > 2 sigma``
    #: (the two half-widths of the 68 per cent intervals added in quadrature)
    #: for at least one of the four mean ages and metallicities. Set only when
    #: both were run and at least one of them has uncertainties (a missing
    #: sigma counts as 0).
    DISAGREE = 256
    #: The kinematic fit is inconsistent with the rest of the cube: a reduced
    #: chi^2 far above the median of the bins, or a velocity the velocity field
    #: cannot explain (`~cubesfh.kinematics.KinematicsFlag` ``CHI2_HIGH`` or
    #: ``VELOCITY_OUTLIER``; see `~cubesfh.kinematics.check_kinematics`).
    #: The bin is still analysed; its maps deserve suspicion.
    KINEMATICS_SUSPECT = 512
    #: The bin's spectrum looks over-sky-subtracted: its continuum (running
    #: median over 51 A) is negative somewhere in 4800-7000 A rest, or its
    #: MUSE flux through the F555W band (synthetic photometry of the binned
    #: spectrum) is below the binned HST F555W flux by more than
    #: `~cubesfh.preprocess.SKY_RATIO_LIMIT` relative to the cube's bright
    #: bins (a sky spectrum subtracted in excess weighs most in faint bins).
    #: The bin is still analysed; its maps (above all [Z/H]) deserve suspicion.
    SKY_SUSPECT = 1024
    #: Pixels of the 4800-7000 A rest-frame range are missing (the MUSE AO
    #: laser notch, masked sky lines, detector defects): the fraction is the
    #: ``gap_fraction`` column of ``BINS``. The bundled networks (0.4) take
    #: them as missing pixels through their validity channel; networks
    #: without one see them completed by a template fit to the bin's valid
    #: pixels (`~cubesfh.gaps.fill_gaps`).
    SPECTRAL_GAP = 2048
    #: The spectrum and HST fluxes that the CNN's SFH and Z(t) imply
    #: (re-synthesised on the templates, attenuation and a multiplicative
    #: polynomial fitted; :func:`~cubesfh.pipeline.fit_check_bins`) fit the
    #: spectrum worse than correct answers do at the bin's S/N: ``CNN_CHI2``
    #: above ``cnn_fit_chi2_limit`` (the 95th percentile of simulated bins,
    #: :ref:`fitcheck`).
    POOR_FIT = 4096
    #: The HST fluxes disagree with those implied by the spectrum-only
    #: answer, beyond the calibrated model systematic of each band: a band
    #: off in part of the field, misregistered or in the wrong unit
    #: (``TENSION`` above ``tension_limit``; the worst band is
    #: ``tension_band`` in ``BINS``, :ref:`fitcheck`).
    PHOT_TENSION = 8192
