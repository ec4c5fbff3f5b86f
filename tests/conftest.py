"""Shared fixtures: small deterministic optimizers and tasks, the development datasets."""

import os
from pathlib import Path

import pytest
import torch

from l2l.optimizers import CoordinateWiseLSTM
from l2l.tasks import QuadraticFamily


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def lstm():
    return CoordinateWiseLSTM(seed=0)


@pytest.fixture
def quadratics():
    return QuadraticFamily(dim=10).sample(8, torch.Generator().manual_seed(0))


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def real_data(monkeypatch):
    """The development datasets in ../shared/data (skips when absent), as the data directory."""
    directory = Path(os.environ.get("L2L_DATA") or SHARED_DATA)
    if not (directory / "mnist").is_dir():
        pytest.skip(f"real datasets not found in {directory} (see ../shared/data/README.md)")
    monkeypatch.setenv("L2L_DATA", str(directory))
    return directory
