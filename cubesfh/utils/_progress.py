# Licensed under a 3-clause BSD style license - see LICENSE
"""Switchable tqdm progress bars (``progress_bar=True/False`` keywords)."""

__all__ = ["progress"]


def progress(iterable=None, *, enabled=True, desc=None, total=None, unit="it"):
    """
    Wrap ``iterable`` in a tqdm progress bar when ``enabled`` is `True`.

    Parameters
    ----------
    iterable : iterable, optional
        The iterable to wrap.
    enabled : bool, optional
        Show the bar. When `False` the iterable is returned unchanged
        (or a no-op bar when ``iterable`` is `None`).
    desc : str, optional
        Label shown in front of the bar.
    total : int, optional
        Number of items, when ``iterable`` has no length.
    unit : str, optional
        Unit name shown by tqdm.

    Returns
    -------
    iterable or `tqdm.tqdm`
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, desc=desc, total=total, unit=unit,
                leave=False)
