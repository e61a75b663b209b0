#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Screenshot of a cubesfh maps product in a real SAOImage DS9: the figure of the
"Checked in SAOImage DS9" section of ``docs/product.rst``.

Usage::

    python scripts/ds9_figure.py [PRODUCT] [--extension LOGAGE_MW] [--cmap viridis]
                                 [--out docs/_static/ds9_maps.png]

Without ``PRODUCT`` the example observation of
:func:`cubesfh.datasets.make_example_observation` (30 x 30 spaxels, five HST
bands) is made and run through :func:`cubesfh.pipeline.run_pipeline`, as
``cubesfh run`` does (a few minutes on two cores). DS9 runs on a private Xvfb
display (`cubesfh.utils._ds9`) and shows one map with a colour map, a linear
scale between the 2nd and 98th percentiles, the ICRS grid and the crosshair on
the central spaxel; the DS9 window is grabbed with ``xwd`` (DS9's own
``saveimage`` hangs under Xvfb) and written as PNG. Needs ``ds9``, ``Xvfb``,
the XPA programs and ``xwd`` (Debian: ``apt-get install saods9 xvfb xpa-tools
x11-apps``) and Pillow or matplotlib.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from cubesfh.utils._ds9 import DS9

ROOT = Path(__file__).resolve().parent.parent


def example_product(directory):
    """Run the pipeline on the example observation; return the path of the maps."""
    from cubesfh import Cube, HSTImage
    from cubesfh.datasets import make_example_observation
    from cubesfh.pipeline import run_pipeline

    obs = make_example_observation(directory, shape=(30, 30), seed=0)
    cube = Cube.read(obs.cube_path)
    hst = {band: HSTImage.read(path) for band, path in obs.hst_paths.items()}
    maps = run_pipeline(cube, hst, progress_bar=False)
    return maps.write(Path(directory) / "example_maps.fits")


def save_png(rgb, path):
    """Write an RGB uint8 array as PNG (Pillow if installed, else matplotlib)."""
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.pyplot as plt

        plt.imsave(path, rgb)
    else:
        Image.fromarray(rgb).save(path, optimize=True)


def screenshot(product, extension, *, cmap="viridis"):
    """
    Show one extension of ``product`` in DS9 and grab its window.

    Parameters
    ----------
    product : `~pathlib.Path`
        The maps FITS file.
    extension : str
        Extension name (an image, e.g. ``'LOGAGE_MW'``).
    cmap : str, optional
        DS9 colour map.

    Returns
    -------
    rgb : `~numpy.ndarray` of uint8, shape (ny, nx, 3)
    info : dict
        What DS9 reported: size, BUNIT, the crosshair pixel and its ICRS position.
    """
    with fits.open(product) as hdul:
        data = np.asarray(hdul[extension].data, dtype=float)
    lo, hi = np.nanpercentile(data, [2, 98])
    ny, nx = data.shape
    x, y = (nx + 1) // 2, (ny + 1) // 2
    width, height = 680, 540  # of DS9's image area
    zoom = max(1, int(0.72 * min(width, height) / max(nx, ny)))  # room for the grid labels
    with DS9(width=1000, height=900,
             ds9_args=["-width", str(width), "-height", str(height)]) as ds9:
        ds9.set("fits", f"{product}[{extension}]")
        ds9.set("cmap", cmap)
        ds9.set("scale", "linear")
        ds9.set("scale", "limits", f"{lo:.4f}", f"{hi:.4f}")
        ds9.set("zoom", "to", zoom)
        ds9.set("wcs", "sky", "icrs")  # the product's RADESYS; DS9's default is fk5
        ds9.set("grid", "yes")
        ds9.set("grid", "type", "publication")
        ds9.set("grid", "system", "wcs")
        ds9.set("grid", "sky", "icrs")
        ds9.set("grid", "axes", "type", "exterior")
        ds9.set("grid", "numerics", "type", "exterior")
        ds9.set("grid", "numerics", "color", "black")
        ds9.set("precision", 8, 10, 4, 3, 8, 7, 5, 3, 8)
        ds9.set("crosshair", x, y, "image")
        info = {"size": ds9.get("fits", "size"),
                "bunit": ds9.get("fits", "header", "keyword", "BUNIT"),
                "crosshair": ds9.get("crosshair", "image"),
                "icrs": ds9.get("crosshair", "wcs", "icrs", "degrees"),
                "ds9": ds9.get("version")}
        rgb = ds9.screenshot()
    return rgb, info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("product", nargs="?", type=Path,
                        help="maps FITS file (default: run the example observation)")
    parser.add_argument("--extension", default="LOGAGE_MW", help="map to show")
    parser.add_argument("--cmap", default="viridis", help="DS9 colour map")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "ds9_maps.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cubesfh-ds9-figure-") as tmp:
        product = args.product or example_product(tmp)
        rgb, info = screenshot(Path(product).resolve(), args.extension, cmap=args.cmap)
    save_png(rgb, args.out)
    print(f"wrote {args.out} ({rgb.shape[1]} x {rgb.shape[0]} pixels, "
          f"{args.out.stat().st_size / 1024:.0f} kB)")
    for key, value in info.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
