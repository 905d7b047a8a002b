"""Shared fixtures: real services on loopback and an isolated environment per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.services"]

SHARED_DATA = Path(
    os.environ.get("SHOPML_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data")
)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One intra-op thread: tiny test models gain nothing from more, and on a shared
    2-core machine two spinning threads per process slow every test down."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep every test away from the developer's SHOPML_* settings and real services."""
    for name in list(os.environ):
        if name.startswith("SHOPML_") and name != "SHOPML_SHARED_DATA":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHOPML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHOPML_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public datasets beside the checkout; skip with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared datasets not found at {SHARED_DATA} (set SHOPML_SHARED_DATA)"
        )
    return SHARED_DATA
