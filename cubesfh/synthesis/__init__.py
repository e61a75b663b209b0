# Licensed under a 3-clause BSD style license - see LICENSE
"""
The simulator the CNN learns from: star formation histories, chemical
evolution, two-component dust, nebular emission, HST fluxes, MUSE sampling and
noise (Galceran et al. 2026, section 2), the training-set writer and mock
observations.
"""

from .model import ForwardModel, dust_transmission, metallicity_history
from .sfh import (
    AGE_OF_UNIVERSE_GYR,
    draw_gp_parameters,
    draw_skewnormal_parameters,
    gp_cumulative,
    gp_sfh,
    skewnormal_sfh,
)

__all__ = [
    "AGE_OF_UNIVERSE_GYR",
    "ForwardModel",
    "draw_gp_parameters",
    "draw_skewnormal_parameters",
    "dust_transmission",
    "gp_cumulative",
    "gp_sfh",
    "metallicity_history",
    "skewnormal_sfh",
]
