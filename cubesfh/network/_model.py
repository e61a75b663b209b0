# Licensed under a 3-clause BSD style license - see LICENSE
"""
The network of Galceran et al. (2026, section 3.1), in PyTorch.

This module imports torch; nothing else in cubesfh imports it at package import.

Architecture (choices where the paper is silent are written down here):

* **Spectrum encoder.** The 1761-pixel spectrum (1.25 A) is averaged in pairs
  to 2.5 A (880 pixels; still Nyquist-sampled for a 150 km/s dispersion,
  sigma = 2.5-3.5 A, so no information is lost) and standardised pixel by
  pixel with the training-set mean and scatter. Three stages of 1-D
  convolution + Instance Normalisation + PReLU + max-pooling (x2), with
  16, 32 and 64 channels and kernels 7, 5, 5 pixels (17, 25 and 50 A
  receptive fields after pooling: absorption lines, line complexes, bands),
  then a self-attention layer over the 110 remaining positions (4 heads,
  with a residual connection and a learned positional embedding, so that
  features far apart in wavelength can be combined) and two dense layers
  (7040 -> 128 -> 64).
* **Photometry encoder.** log10 of the 5 normalised fluxes, standardised, set
  to 0 where a band is missing, concatenated with the 5-element band mask
  (1 = present): three dense layers 10 -> 64 -> 64 -> 32. The mask lets one
  network serve any subset of bands (trained with random band masking).
* **Latent space.** The 64 + 32 features are concatenated and compressed to
  40 (a dense layer).
* **Decoder.** One shared branch, 40 -> 128 -> 128 -> 32: the first 16
  outputs go through a softmax (non-negative mass fractions that sum to 1),
  the other 16 are the mean [Z/H] of each age bin (in dex, around the
  training-set mean).

All hidden dense layers use PReLU; weights are Glorot-uniform initialised.

* **Validity channel** (``mask_channel=True``, the bundled models since
  0.4): the first convolution reads a second channel, 1 where the spectral
  pixel has data and 0 where it is missing (the standardised flux of a
  missing pixel is 0), so that gaps (the MUSE AO notch, masks) are inputs of
  their own; see :ref:`network-gaps`.
* **Uncertainty and out-of-distribution heads** (``uncertainty=True``, the
  bundled models since 0.3; see :ref:`network-uncertainty`). Two small heads
  read the 40-dimensional latent vector *detached* from the rest of the
  network, so that training them cannot change the point estimates:
  ``sigma_head`` (40 -> 64 -> 64 -> 23; 20 in 0.3) gives the log of the
  expected absolute error of the four mean quantities, of the 16 mass
  fractions and of the mass fractions younger than 0.1, 1 and 5 Gyr,
  and ``recon_head`` (40 -> 256 -> 880) reconstructs the standardised
  noise-free spectrum. The latent mean and precision matrix of the training
  set are stored as buffers for a Mahalanobis distance.
"""

import torch
from torch import nn

from ..conventions import HST_BANDS, N_AGE_BINS

N_BANDS = len(HST_BANDS)
#: Ages (Gyr) of the cumulative mass fractions "younger than" with uncertainties.
CUMULATIVE_AGES = (0.1, 1.0, 5.0)
#: Outputs of the uncertainty head: four mean quantities, 16 mass fractions
#: and the cumulative fractions younger than `CUMULATIVE_AGES` (cubesfh 0.4;
#: 20 before).
N_SIGMA_OUTPUTS = 4 + N_AGE_BINS + len(CUMULATIVE_AGES)

__all__ = ["CUMULATIVE_AGES", "SFHNet", "light_coefficients", "light_fractions", "log_cosh_loss"]


def _init_glorot(module):
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _ConvStage(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2)
        self.norm = nn.InstanceNorm1d(c_out, affine=True)
        self.act = nn.PReLU(c_out)
        self.pool = nn.MaxPool1d(2)

    def forward(self, x):
        return self.pool(self.act(self.norm(self.conv(x))))


class SFHNet(nn.Module):
    """
    Two-branch CNN: spectrum + photometry (with band mask) -> SFH and Z(t).

    Parameters
    ----------
    n_pix : int
        Number of spectral pixels after the 2.5 A averaging (880).
    n_bands : int
        Number of photometric bands (5).
    channels : tuple of int
        Channels of the three convolution stages.
    kernels : tuple of int
        Kernel sizes of the three convolution stages.
    heads : int
        Attention heads.
    zh_offset : float
        Mean [Z/H] of the training labels (added to the metallicity outputs).
    uncertainty : bool
        Add the uncertainty and reconstruction heads and the latent
        statistics (see the module notes).
    mask_channel : bool
        Give the first convolution a second input channel, the pixel
        validity (1 valid, 0 missing; missing pixels enter the first channel
        as 0, the training mean), so that spectra with gaps are inputs of
        their own (the bundled models since 0.4).
    n_sigma : int
        Outputs of the uncertainty head (`N_SIGMA_OUTPUTS`; 20 in 0.3).
    """

    def __init__(self, n_pix=880, n_bands=N_BANDS, channels=(16, 32, 64),
                 kernels=(8, 5, 5), strides=(2, 1, 1), heads=4, zh_offset=0.0,
                 uncertainty=False, mask_channel=False, n_sigma=N_SIGMA_OUTPUTS):
        super().__init__()
        self.n_pix = n_pix
        self.n_bands = n_bands
        self.mask_channel = bool(mask_channel)
        self.n_sigma = int(n_sigma)
        stages, c_in = [], 2 if self.mask_channel else 1
        n_pos = n_pix
        for c, k, s in zip(channels, kernels, strides):
            stages.append(_ConvStage(c_in, c, k, s))
            c_in = c
            n_pos = ((n_pos + 2 * ((k - 1) // 2) - k) // s + 1) // 2
        self.conv = nn.Sequential(*stages)
        self.pos = nn.Parameter(torch.zeros(1, n_pos, c_in))
        self.attention = nn.MultiheadAttention(c_in, heads, batch_first=True)
        self.attn_norm = nn.LayerNorm(c_in)
        self.spec_dense = nn.Sequential(
            nn.Flatten(), nn.Linear(n_pos * c_in, 128), nn.PReLU(), nn.Linear(128, 64),
            nn.PReLU())
        self.phot_dense = nn.Sequential(
            nn.Linear(2 * n_bands, 64), nn.PReLU(), nn.Linear(64, 64), nn.PReLU(),
            nn.Linear(64, 32), nn.PReLU())
        self.latent = nn.Sequential(nn.Linear(64 + 32, 40), nn.PReLU())
        self.decoder = nn.Sequential(
            nn.Linear(40, 128), nn.PReLU(), nn.Linear(128, 128), nn.PReLU(),
            nn.Linear(128, 2 * N_AGE_BINS))
        self.uncertainty = bool(uncertainty)
        if self.uncertainty:
            self.sigma_head = nn.Sequential(
                nn.Linear(40, 64), nn.PReLU(), nn.Linear(64, 64), nn.PReLU(),
                nn.Linear(64, self.n_sigma))
            self.recon_head = nn.Sequential(nn.Linear(40, 256), nn.PReLU(),
                                            nn.Linear(256, n_pix))
            self.register_buffer("latent_mean", torch.zeros(40))
            self.register_buffer("latent_precision", torch.eye(40))
        self.apply(_init_glorot)
        self.register_buffer("zh_offset", torch.tensor(float(zh_offset)))

    def forward(self, spectrum, photometry, mask, valid=None):
        """
        Parameters
        ----------
        spectrum : `torch.Tensor`
            ``(batch, n_pix)`` standardised spectrum.
        photometry : `torch.Tensor`
            ``(batch, n_bands)`` standardised log fluxes (any value where masked).
        mask : `torch.Tensor`
            ``(batch, n_bands)``, 1 where the band is present.
        valid : `torch.Tensor`, optional
            ``(batch, n_pix)``, 1 where the spectral pixel is valid (models
            with ``mask_channel`` only; default all valid).

        Returns
        -------
        fractions : `torch.Tensor`
            ``(batch, 16)`` mass fractions (softmax).
        zh : `torch.Tensor`
            ``(batch, 16)`` [Z/H] per age bin.
        """
        return self.decode(self.encode(spectrum, photometry, mask, valid))

    def encode(self, spectrum, photometry, mask, valid=None):
        """The 40-dimensional latent vector (same inputs as `forward`)."""
        if self.mask_channel:
            if valid is None:
                valid = torch.ones_like(spectrum)
            x = torch.stack([spectrum * valid, valid], dim=1)
        elif valid is not None:
            x = (spectrum * valid).unsqueeze(1)
        else:
            x = spectrum.unsqueeze(1)
        h = self.conv(x).transpose(1, 2)  # (b, pos, c)
        h = h + self.pos
        a, _ = self.attention(h, h, h, need_weights=False)
        h = self.attn_norm(h + a)
        s = self.spec_dense(h)
        p = self.phot_dense(torch.cat([photometry * mask, mask], dim=1))
        return self.latent(torch.cat([s, p], dim=1))

    def decode(self, z):
        """Mass fractions and [Z/H] per age bin from latent vectors."""
        out = self.decoder(z)
        fractions = torch.softmax(out[:, :N_AGE_BINS], dim=1)
        zh = out[:, N_AGE_BINS:] + self.zh_offset
        return fractions, zh

    def heads(self, z):
        """
        Uncertainty and out-of-distribution outputs of latent vectors.

        Returns
        -------
        log_sigma : `torch.Tensor`
            ``(batch, n_sigma)``: log of the error scale of LW log age, MW log
            age, LW [Z/H], MW [Z/H], of the 16 mass fractions and (0.4) of
            the cumulative fractions younger than `CUMULATIVE_AGES`.
        recon : `torch.Tensor`
            ``(batch, n_pix)`` reconstructed standardised spectrum.
        mahalanobis2 : `torch.Tensor`
            ``(batch,)`` squared Mahalanobis distance to the training latents.
        """
        z = z.detach()
        d = z - self.latent_mean
        m2 = ((d @ self.latent_precision) * d).sum(dim=1)
        return self.sigma_head(z), self.recon_head(z), m2


def light_fractions(fractions, zh, light_coef):
    """
    V-band light fractions of predicted living-mass fractions (differentiable).

    ``log10(L_V / M) = a_i + b_i [Z/H]_i`` per age bin ``i`` (a linear fit to
    the template library over -0.7 < [Z/H] < 0.4, good to 0.03 dex; see
    :func:`light_coefficients`).

    Parameters
    ----------
    fractions, zh : `torch.Tensor`
        ``(batch, 16)``.
    light_coef : `torch.Tensor`
        ``(16, 2)``: slope and intercept per bin.
    """
    light = fractions * torch.pow(10.0, light_coef[:, 0] * zh + light_coef[:, 1])
    return light / light.sum(dim=1, keepdim=True)


def light_coefficients():
    """Per-bin linear fits of log10(L_V / M_living) versus [Z/H], shape ``(16, 2)``."""
    import numpy as np

    from ..populations import _bin_tables

    zg, log_ratio = _bin_tables()
    sel = (zg > -1.0) & (zg < 0.5)
    return np.array([np.polyfit(zg[sel], log_ratio[sel, i], 1)
                     for i in range(log_ratio.shape[1])])


def log_cosh_loss(fractions, zh, true_fractions, true_zh, *, weights=(0.8, 0.2),
                  light_coef=None, true_light=None, light_weight=0.8):
    """
    Weighted log-cosh loss of eq. 5 (summed over age bins, averaged over the batch).

    With ``light_coef`` and ``true_light`` an extra term compares the V-band
    light fractions implied by the predicted mass fractions and metallicities
    with the true ones: small mass fractions of young stars carry most of
    the light, and a loss on mass fractions alone barely constrains them, which
    biases light-weighted ages (see the network docs).

    Parameters
    ----------
    fractions, zh : `torch.Tensor`
        Predictions, ``(batch, 16)``.
    true_fractions, true_zh : `torch.Tensor`
        Labels.
    weights : tuple of float
        Weights of the SFH and metallicity terms.
    light_coef : `torch.Tensor`, optional
        See `light_fractions`.
    true_light : `torch.Tensor`, optional
        True V-band light fractions, ``(batch, 16)``.
    light_weight : float
        Weight of the light-fraction term.
    """
    def lc(x):
        # log(cosh(x)) computed stably
        return x + nn.functional.softplus(-2.0 * x) - torch.log(torch.tensor(2.0, dtype=x.dtype))

    l_sfh = lc(fractions - true_fractions).sum(dim=1).mean()
    l_z = lc(zh - true_zh).sum(dim=1).mean()
    loss = weights[0] * l_sfh + weights[1] * l_z
    if light_coef is not None and true_light is not None:
        lf = light_fractions(fractions, zh, light_coef)
        loss = loss + light_weight * lc(lf - true_light).sum(dim=1).mean()
    return loss
