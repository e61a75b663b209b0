# Licensed under a 3-clause BSD style license - see LICENSE
"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def model_with_heads(tmp_path_factory):
    """A tiny network with uncertainty and OOD heads (1 epoch on 600 spectra, ~20 s)."""
    pytest.importorskip("torch")
    from pathlib import Path

    from cubesfh.network import SFHModel, export_model, fit_uncertainty, train
    from cubesfh.network import __file__ as network_init
    from cubesfh.synthesis.trainingset import make_training_set

    d = tmp_path_factory.mktemp("heads")
    init = Path(network_init).parent / "data" / "sfhnet.pt"
    make_training_set(d / "tiny.h5", n=600, seed=3, chunk_size=300, progress_bar=False,
                      libraries=("bc03",))
    train(d / "tiny.h5", d / "run", seed=3, max_epochs=1, progress_bar=False,
          init_weights=init)
    fit_uncertainty(d / "run", d / "tiny.h5", seed=3, epochs=2, progress_bar=False)
    export_model(d / "run", d / "model")
    model = SFHModel.load(d / "model.pt")
    assert model.has_uncertainty
    model.test_path = d / "model.pt"  # for command-line tests
    return model
