# Licensed under a 3-clause BSD style license - see LICENSE
"""
The simulator the CNN learns from: star formation histories, chemical
evolution, two-component dust, nebular emission, HST fluxes, MUSE sampling and
noise (Galceran et al. 2026, section 2), the training-set writer and mock
observations.
"""

from .mock import (
    MOCK_COMPONENTS,
    MockComponent,
    MockObservation,
    mock_components,
    mock_observation,
    read_mock_truth,
)
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
    "MOCK_COMPONENTS",
    "ForwardModel",
    "MockComponent",
    "MockObservation",
    "mock_components",
    "mock_observation",
    "read_mock_truth",
    "draw_gp_parameters",
    "draw_skewnormal_parameters",
    "dust_transmission",
    "gp_cumulative",
    "gp_sfh",
    "metallicity_history",
    "skewnormal_sfh",
]
