# Licensed under a 3-clause BSD style license - see LICENSE
"""
File formats. One module per format; each registers its reader, writer and
identifier with the astropy unified I/O registry for the class it reads:

* :mod:`cubesfh.io.muse` -- MUSE data cubes (``Cube.read`` / ``Cube.write``,
  format ``'muse'``).
"""

from .muse import identify_muse, parse_flux_unit, psf_fwhm_from_header, read_muse, write_muse

__all__ = ["identify_muse", "parse_flux_unit", "psf_fwhm_from_header", "read_muse",
           "write_muse"]
