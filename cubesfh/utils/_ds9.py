# Licensed under a 3-clause BSD style license - see LICENSE
"""
Drive a real SAOImage DS9 on a private virtual X display (Xvfb) through XPA.

Used by ``tests/test_ds9.py`` (the product checked in a real viewer) and
``scripts/ds9_figure.py`` (the screenshot of ``docs/product.rst``); not part of
the public API. Needs the programs ``ds9``, ``Xvfb``, ``xpaget``, ``xpaset``
and ``xpaaccess`` (Debian: ``apt-get install saods9 xvfb xpa-tools``) and, for
screenshots, ``xwd`` (``x11-apps``).

XPA runs with ``XPA_METHOD=local`` (Unix sockets, no network) and every DS9 gets
a unique title, which is also its XPA name, so that several runs can share a
machine.
"""

import os
import select
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

__all__ = ["DS9", "DS9Error", "missing_programs", "read_xwd"]

#: Programs needed to start DS9 and talk to it.
PROGRAMS = ("ds9", "Xvfb", "xpaget", "xpaset", "xpaaccess")


class DS9Error(RuntimeError):
    """DS9, Xvfb or XPA failed; the message says which and shows their output."""


def missing_programs(programs=PROGRAMS):
    """
    Programs of ``programs`` not found on ``PATH``.

    Parameters
    ----------
    programs : sequence of str, optional
        Program names; by default those needed by `DS9`.

    Returns
    -------
    missing : list of str
        Empty when all are installed.
    """
    return [p for p in programs if shutil.which(p) is None]


def _stop(proc, timeout=5.0):
    """Terminate ``proc`` (a `subprocess.Popen`), kill it when it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class DS9:
    """
    A SAOImage DS9 running on its own Xvfb display, controlled through XPA.

    Use as a context manager (or call `start` and `close`): both processes are
    always terminated at the end.

    Parameters
    ----------
    title : str, optional
        Window title and XPA name; by default a unique ``cubesfh-<hex>``.
    width, height : int, optional
        Size of the virtual screen in pixels.
    ds9_args : sequence of str, optional
        More command-line options of ``ds9`` (e.g. ``["-view", "colorbar", "yes"]``).
    timeout : float, optional
        Seconds to wait for Xvfb and then for DS9 to answer XPA.
    xpa_timeout : float, optional
        Seconds allowed to each ``xpaget`` / ``xpaset`` call.

    Attributes
    ----------
    title : str
    display : str or None
        X display (``':N'``) once started.
    startup_seconds : float or None
        Time DS9 took to answer XPA after it was launched.
    """

    def __init__(self, *, title=None, width=1024, height=768, ds9_args=(), timeout=60.0,
                 xpa_timeout=20.0):
        self.title = title or f"cubesfh-{uuid.uuid4().hex[:12]}"
        self.width, self.height = int(width), int(height)
        self.ds9_args = list(ds9_args)
        self.timeout = float(timeout)
        self.xpa_timeout = float(xpa_timeout)
        self.display = None
        self.startup_seconds = None
        self._xvfb = self._ds9 = None
        self._tmp = None

    # ------------------------------------------------------------------ processes

    @property
    def env(self):
        """Environment of the DS9 and XPA processes (``DISPLAY``, ``XPA_METHOD=local``)."""
        env = dict(os.environ, XPA_METHOD="local")
        if self.display is not None:
            env["DISPLAY"] = self.display
        return env

    def _log(self, name):
        path = Path(self._tmp.name) / name
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _start_xvfb(self):
        """Start Xvfb on a free display; it prints the number it chose (``-displayfd``)."""
        read_fd, write_fd = os.pipe()
        try:
            with open(Path(self._tmp.name) / "xvfb.log", "wb") as log:
                self._xvfb = subprocess.Popen(
                    ["Xvfb", "-displayfd", str(write_fd), "-screen", "0",
                     f"{self.width}x{self.height}x24", "-nolisten", "tcp"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(write_fd,))
            os.close(write_fd)
            write_fd = None
            text = b""
            deadline = time.monotonic() + self.timeout
            while not text.endswith(b"\n"):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([read_fd], [], [], max(left, 0))
                chunk = os.read(read_fd, 64) if ready else b""
                if not chunk:
                    msg = ("Xvfb did not report a display number within "
                           f"{self.timeout:g} s; its output:\n{self._log('xvfb.log')}")
                    raise DS9Error(msg)
                text += chunk
        finally:
            os.close(read_fd)
            if write_fd is not None:
                os.close(write_fd)
        self.display = f":{int(text)}"

    def start(self):
        """
        Start Xvfb, then DS9, and wait until DS9 answers ``xpaget <title> version``.

        Returns
        -------
        self : `DS9`

        Raises
        ------
        DS9Error
            A program is missing, Xvfb or DS9 exited, or DS9 did not answer in time.
        """
        missing = missing_programs()
        if missing:
            msg = (f"programs {missing} not found on PATH; install them (Debian: apt-get "
                   "install saods9 xvfb xpa-tools x11-apps).")
            raise DS9Error(msg)
        self._tmp = tempfile.TemporaryDirectory(prefix="cubesfh-ds9-")
        try:
            self._start_xvfb()
            t0 = time.monotonic()
            with open(Path(self._tmp.name) / "ds9.log", "wb") as log:
                self._ds9 = subprocess.Popen(["ds9", "-title", self.title, *self.ds9_args],
                                             env=self.env, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log,
                                             cwd=self._tmp.name)
            while True:
                if self._ds9.poll() is not None:
                    msg = (f"ds9 exited with status {self._ds9.returncode} before answering "
                           f"XPA; its output:\n{self._log('ds9.log')}")
                    raise DS9Error(msg)
                if self._answers():
                    break
                if time.monotonic() - t0 > self.timeout:
                    msg = (f"ds9 (XPA name {self.title!r}) did not answer XPA within "
                           f"{self.timeout:g} s; its output:\n{self._log('ds9.log')}")
                    raise DS9Error(msg)
                time.sleep(0.25)
            self.startup_seconds = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _answers(self):
        """Whether DS9 is registered with XPA and answers ``version``."""
        try:
            out = subprocess.run(["xpaaccess", "-n", self.title], env=self.env,
                                 capture_output=True, text=True, timeout=5)
            if out.stdout.strip() in ("", "0"):
                return False
            return bool(self.get("version", timeout=5))
        except (subprocess.TimeoutExpired, DS9Error):
            return False

    def close(self):
        """Ask DS9 to exit, then terminate DS9 and Xvfb (killing them if needed)."""
        if self._ds9 is not None and self._ds9.poll() is None:
            try:
                subprocess.run(["xpaset", "-p", self.title, "exit"], env=self.env,
                               capture_output=True, timeout=5)
                self._ds9.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        _stop(self._ds9)
        _stop(self._xvfb)
        self._ds9 = self._xvfb = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ XPA

    def _call(self, cmd, timeout, *, binary=False):
        """Run ``cmd`` (XPA or X tool) in `env`; its output, or a `DS9Error`."""
        timeout = self.xpa_timeout if timeout is None else timeout
        try:
            out = subprocess.run(cmd, env=self.env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            msg = f"{' '.join(cmd)!r} did not return within {timeout:g} s."
            raise DS9Error(msg) from exc
        stderr = out.stderr.decode(errors="replace").strip()
        if out.returncode != 0 or stderr.startswith("XPA$ERROR"):
            answer = stderr or out.stdout.decode(errors="replace").strip()
            msg = f"{' '.join(cmd)!r} failed (status {out.returncode}): {answer}"
            raise DS9Error(msg)
        return out.stdout if binary else out.stdout.decode(errors="replace")

    def get(self, *args, timeout=None):
        """
        ``xpaget <title> args...``.

        Parameters
        ----------
        *args : str
            The XPA command and its parameters (e.g. ``"fits", "size"``).
        timeout : float, optional
            Seconds allowed; default ``xpa_timeout``.

        Returns
        -------
        answer : str
            DS9's answer without the trailing newline.
        """
        return self._call(["xpaget", self.title, *map(str, args)], timeout).strip()

    def get_fits(self, what="slice", *, timeout=None):
        """
        The image DS9 holds, as FITS (``xpaget <title> fits slice``).

        Parameters
        ----------
        what : {'slice', 'image'}, optional
            The plane shown (``'slice'``, the way to read a cube's current
            plane: ``xpaget data`` always reads the first) or the whole image.
        timeout : float, optional
            Seconds allowed; default ``xpa_timeout``.

        Returns
        -------
        hdulist : `~astropy.io.fits.HDUList`
        """
        from astropy.io import fits

        raw = self._call(["xpaget", self.title, "fits", what], timeout, binary=True)
        return fits.HDUList.fromstring(raw)

    def set(self, *args, timeout=None):
        """
        ``xpaset -p <title> args...``.

        Parameters
        ----------
        *args : str
            The XPA command and its parameters (e.g. ``"cmap", "viridis"``).
        timeout : float, optional
            Seconds allowed; default ``xpa_timeout``.
        """
        self._call(["xpaset", "-p", self.title, *map(str, args)], timeout)

    # ------------------------------------------------------------------ screen

    def screenshot(self, *, window=True):
        """
        Grab the screen with ``xwd`` (``-saveimage`` hangs under Xvfb).

        Parameters
        ----------
        window : bool, optional
            Only the DS9 window (default) rather than the whole virtual screen.

        Returns
        -------
        rgb : `~numpy.ndarray` of uint8, shape (ny, nx, 3)
        """
        if shutil.which("xwd") is None:
            msg = "xwd not found on PATH; install it (Debian: apt-get install x11-apps)."
            raise DS9Error(msg)
        path = Path(self._tmp.name) / "screen.xwd"
        # without a window manager the main window is named "SAOImage <title>"
        target = ["-name", f"SAOImage {self.title}"] if window else ["-root"]
        self._call(["xwd", "-silent", *target, "-display", self.display, "-out", str(path)],
                   self.xpa_timeout)
        return read_xwd(path)


# XWD header: 25 big-endian CARD32 fields (X11 XWDFile.h, file version 7).
_XWD_FIELDS = ("header_size", "file_version", "pixmap_format", "pixmap_depth", "pixmap_width",
               "pixmap_height", "xoffset", "byte_order", "bitmap_unit", "bitmap_bit_order",
               "bitmap_pad", "bits_per_pixel", "bytes_per_line", "visual_class", "red_mask",
               "green_mask", "blue_mask", "bits_per_rgb", "colormap_entries", "ncolors",
               "window_width", "window_height", "window_x", "window_y", "window_bdrwidth")


def read_xwd(path):
    """
    Read an X Window Dump (``xwd`` output) of a TrueColor screen.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The ``.xwd`` file.

    Returns
    -------
    rgb : `~numpy.ndarray` of uint8, shape (ny, nx, 3)

    Raises
    ------
    DS9Error
        Not a version-7 ZPixmap of 24 or 32 bits per pixel with colour masks.
    """
    raw = Path(path).read_bytes()
    if len(raw) < 100:
        raise DS9Error(f"{path} is too short to be an XWD file.")
    head = dict(zip(_XWD_FIELDS, np.frombuffer(raw[:100], ">u4").tolist(), strict=True))
    if (head["file_version"] != 7 or head["pixmap_format"] != 2
            or head["bits_per_pixel"] not in (24, 32)):
        msg = (f"{path}: unsupported XWD file (version {head['file_version']}, format "
               f"{head['pixmap_format']}, {head['bits_per_pixel']} bits per pixel); "
               "expected a version-7 ZPixmap of 24 or 32 bits per pixel.")
        raise DS9Error(msg)
    ny, nx, stride = head["pixmap_height"], head["pixmap_width"], head["bytes_per_line"]
    start = head["header_size"] + 12 * head["ncolors"]  # XWDColor: 12 bytes each
    data = np.frombuffer(raw, np.uint8, count=ny * stride, offset=start).reshape(ny, stride)
    nbytes = head["bits_per_pixel"] // 8
    pix = data[:, :nx * nbytes].reshape(ny, nx, nbytes).astype(np.uint32)
    if head["byte_order"] == 0:  # LSBFirst
        value = sum(pix[..., i] << (8 * i) for i in range(nbytes))
    else:
        value = sum(pix[..., i] << (8 * (nbytes - 1 - i)) for i in range(nbytes))
    rgb = np.empty((ny, nx, 3), np.uint8)
    for i, key in enumerate(("red_mask", "green_mask", "blue_mask")):
        mask = head[key]
        if mask == 0:
            raise DS9Error(f"{path}: no {key} (not a TrueColor dump).")
        shift = (mask & -mask).bit_length() - 1
        top = mask >> shift
        rgb[..., i] = ((value & mask) >> shift) * 255 // top
    return rgb
