"""The serving load benchmark's phases, run for real in ``--quick`` mode.

``benchmarks/bench_serve.py`` starts ``python -m serving`` on 127.0.0.1 with a tiny
artifact and drives it with wrk: a short overload must be shed with 503s while the
health route keeps answering 200, and the recovery at the normal rate, on the same
server process, must get no 503. Latency targets are not asserted (shared machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_recommender import write_tiny_artifact

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_serve.py"


@pytest.mark.timeout(120)
def test_quick_run_sheds_overload_keeps_health_and_recovers(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("the load generator is not installed: apt-get install -y wrk")
    model_dir = write_tiny_artifact(tmp_path / "model")
    out = tmp_path / "bench.json"

    # A low normal rate and a limit of 8 in flight: the recovery never needs 8 at
    # once, while the overload's hundreds of users always do.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--model-dir", str(model_dir),
         "--skip-movielens", "--skip-redis", "--rate", "20", "--max-in-flight", "8",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    phases = json.loads(out.read_text())["phases"]
    overload, recovery = phases["overload"], phases["recovery"]
    assert overload["codes"].get("503", 0) > 0, overload
    assert set(overload["codes"]) <= {"200", "503"}, overload
    assert overload["extra"]["health_polls"] > 0
    assert overload["extra"]["health_failures"] == {}, overload["extra"]
    assert recovery["codes"].get("503", 0) == 0, recovery
    assert recovery["codes"].get("200", 0) > 0, recovery
    assert recovery["extra"]["server_alive"] is True
    assert phases["top10"]["codes"] == {"200": phases["top10"]["codes"]["200"]}
    assert "overload" in result.stdout and "recovery" in result.stdout
