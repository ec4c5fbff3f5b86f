"""Shared fixtures: small deterministic optimizers and tasks."""

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
