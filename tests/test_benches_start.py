"""Every benchmark starts: CI does not run them, so a rename elsewhere could break one unseen
(bench/failover.py imported a function a refactor had removed while the README still quoted
its figure). `--help` imports the whole script and parses its options, which is what breaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))


def test_there_are_benchmarks_to_start() -> None:
    assert len(SCRIPTS) >= 6, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_bench_starts(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{script.name} --help failed:\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout, done.stdout[:500]


def test_metrics_scrape_builds_its_cluster_with_every_session_open(tmp_path: Path) -> None:
    """More than an import: the cluster every metrics_scrape figure is measured on (its
    sessions once went unopened, unseen, when opening a session became a coroutine)."""
    import asyncio

    sys.path.insert(0, str(BENCH))
    try:
        from metrics_scrape import build_cluster
    finally:
        sys.path.remove(str(BENCH))

    from picoord.coordinator.store import Store

    async def built() -> tuple[int, int]:
        store = Store(tmp_path / "state.db")
        try:
            cluster = await build_cluster(store, 3)
            return len(cluster.sessions), sum(1 for name in cluster.sessions if cluster.history.latest(name))
        finally:
            store.close()

    assert asyncio.run(built()) == (3, 3)
