# Licensed under a 3-clause BSD style license - see LICENSE
"""Sphinx configuration for cubesfh (based on sphinx-astropy v3)."""

import datetime
from importlib import metadata

from sphinx_astropy.conf.v3 import *  # noqa: F403

project = "cubesfh"
author = "The cubesfh developers"
copyright = f"{datetime.datetime.now().year}, {author}"  # noqa: A001

release = metadata.version(project)
version = ".".join(release.split(".")[:2])

exclude_patterns.extend(["_templates", "_build"])  # noqa: F405

# Offline builds: run with -D disable_intersphinx=1 (tox build_docs does) so that
# no inventory is fetched; links to astropy, numpy... are then plain text.
intersphinx_mapping.update({  # noqa: F405
    "astropy": ("https://docs.astropy.org/en/stable/", None),
    "photutils": ("https://photutils.readthedocs.io/en/stable/", None),
    "reproject": ("https://reproject.readthedocs.io/en/stable/", None),
    "regions": ("https://astropy-regions.readthedocs.io/en/stable/", None),
    "specutils": ("https://specutils.readthedocs.io/en/stable/", None),
})

html_title = f"{project} v{release}"
html_static_path = ["_static"]
html_theme_options = {
    "github_url": "https://github.com/cubesfh/cubesfh",
}
htmlhelp_basename = project + "doc"

automodapi_toctreedirnm = "api"
automodsumm_inherited_members = False
numpydoc_show_class_members = False
nitpicky = False
plot_formats = [("png", 100)]
plot_html_show_formats = False
plot_html_show_source_link = False
