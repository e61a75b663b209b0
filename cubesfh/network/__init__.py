# Licensed under a 3-clause BSD style license - see LICENSE
"""
The CNN of Galceran et al. (2026): architecture, training and the bundled model.

Importing this package does not import torch; :class:`SFHModel` and
:func:`train` import it when called.
"""

from ._data import downsample_spectra, photometry_features
from ._physical import attach_physical_head, fit_physical_head, physical_outputs
from ._predict import BUNDLED_MODELS, DEFAULT_MODEL, SFHModel, bundled_models, export_model
from ._train import split_indices, train
from ._uncertainty import fit_uncertainty, noise_level

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "SFHModel",
    "attach_physical_head",
    "bundled_models",
    "downsample_spectra",
    "export_model",
    "fit_physical_head",
    "fit_uncertainty",
    "noise_level",
    "photometry_features",
    "physical_outputs",
    "split_indices",
    "train",
]
