"""Shared fixtures: small synthetic datasets made by the tests themselves (no downloads)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from make_demo_data import write_demo_dataset  # noqa: E402

# A fast transform for tests: 16 kHz, 256-point windows
FAST = ["data.transform.sr=16000", "data.transform.n_fft=256", "data.transform.hop=64"]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """9 two-note files of 1 s at 16 kHz with pitch/octave tracks and a per-file timbre label."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, n_files=9, seconds=1.0, sr=16000)
    return root


def run_script(*args, cwd=ROOT):
    """Run one of the project's scripts in a subprocess: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def one_thread():
    """Run a test with one torch thread, as nn~ runs an exported model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
