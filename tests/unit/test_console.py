"""Which model `shopml serve` picks when no folder is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from shopml.assets import asset_store_from_settings, mark_live
from shopml.config import Settings
from shopml.console import latest_model_dir


def _model(settings: Settings, tmp_path: Path, tag: str, passed: bool) -> str:
    folder = tmp_path / tag
    folder.mkdir()
    (folder / "manifest.json").write_text(f'{{"tag": "{tag}"}}')
    version = asset_store_from_settings(settings).put_dir(
        "recommender", "models", folder, owner="o", producer="t", inputs=[],
        quality={"gate": {"passed": passed}},
    )  # fmt: skip
    return version.version


def _served_tag(folder: Path) -> str:
    return (folder / "manifest.json").read_text()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", progress=False)


def test_newest_model_that_passed_the_gate_is_served(
    settings: Settings, tmp_path: Path
) -> None:
    _model(settings, tmp_path, "old-good", passed=True)
    _model(settings, tmp_path, "new-blocked", passed=False)

    assert "old-good" in _served_tag(latest_model_dir(settings))


def test_the_live_version_wins_over_newer_ones(
    settings: Settings, tmp_path: Path
) -> None:
    live = _model(settings, tmp_path, "live", passed=True)
    _model(settings, tmp_path, "newer", passed=True)
    mark_live(asset_store_from_settings(settings), "recommender", live)

    assert "live" in _served_tag(latest_model_dir(settings))


def test_no_model_passed_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    _model(settings, tmp_path, "blocked", passed=False)

    with pytest.raises(FileNotFoundError, match="passed the evaluation gate"):
        latest_model_dir(settings)


def test_no_model_at_all_points_at_shopml_run(settings: Settings) -> None:
    with pytest.raises(FileNotFoundError, match="shopml run"):
        latest_model_dir(settings)
