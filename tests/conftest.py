"""Shared test fixtures.

Real data comes from ``$DFKD_DATA`` or ``../shared/data`` beside the checkout (CI has it there).
Outside CI a missing folder skips the real-data tests; under CI (``CI=true``) it fails them, so a
green CI always means the loaders ran on real images.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dfkd import paths

# One intra-op thread for the whole suite: the models are tiny (one thread is faster than two that
# spin against the notebook kernels and torchrun workers), and training results then do not depend
# on which test ran first (float summation order changes with the thread count, and the short CPU
# trainings of test_train.py are chaotic enough for that to matter).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts and ends with one intra-op thread, whatever a test sets (session fixtures
    such as the trained toy teacher are set up before this fixture, after the previous test)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def _shared_data() -> Path:
    env = os.environ.get("DFKD_DATA")
    if env:
        return Path(env)
    return paths.project_root().parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real FGVC data (CUB_200_2011/, stanford_cars/, oxford-iiit-pet/)."""
    root = _shared_data()
    if not (root / "CUB_200_2011").is_dir():
        msg = f"real FGVC data not found at {root} (set DFKD_DATA to the folder holding CUB_200_2011/)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture()
def runs_root(tmp_path, monkeypatch) -> Path:
    """An empty runs/ folder; DFKD_RUNS points at it so library defaults write there."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("DFKD_RUNS", str(root))
    return root
