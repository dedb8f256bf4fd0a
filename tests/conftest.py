"""Shared test settings: small thread counts (2-core machines), one user cache for the session."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """One ~/.cache for the session, as a user has one (sweeps under test each get a HOME of their own):
    the MLflow store template (helix_sweep.sweep.tracking), matplotlib's font cache. Subprocesses inherit it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
