"""Shared test settings: small thread counts (2-core machines), project root on the path."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
