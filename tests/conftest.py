"""Shared fixtures: small synthetic datasets made by the tests themselves (no downloads). Plain helpers
(the nn~ host, fake runs, latent datasets, signals) are in helpers.py.

Tests marked `slow` (training runs, torchrun, crepe) are left out by `pytest -m "not slow"`, the
quick check while editing; CI runs everything."""
import pytest
import torch

import helpers
from make_demo_data import write_demo_dataset

ROOT = helpers.ROOT  # the project folder, put on sys.path by helpers


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that trains, runs torchrun or crepe (pytest -m 'not slow' skips it)")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """9 two-note files of 1 s at 16 kHz with pitch/octave tracks and a per-file timbre label."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, n_files=9, seconds=1.0, sr=16000)
    return root


@pytest.fixture
def one_thread():
    """Run a test with one torch thread, as nn~ runs an exported model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
