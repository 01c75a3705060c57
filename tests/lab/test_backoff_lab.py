"""Issue 15 end to end: a service whose image name has a typo, on three Pis with their own
dockerd and the lab registry, driven through `coordctl` as a new user would.

Before the fix the coordinator created about 85 replicas a second for as long as the
service existed. Now each replica slot is tried again after 10 s, 20 s, 40 s ... (at most
5 min): over 60 s at most a handful of attempts per slot, the coordinator at rest and the
store flat; `coordctl ps` says why and when the next try is; then an apply of the fixed
image and a rollout are healthy at once, without waiting for the backoff.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from picoord.lab.cluster import COORDINATOR, Lab
from tests.conftest import require_root_or_fail
from tests.lab.test_workloads_lab import (
    ctl,
    ok,
    replicas,
    service_doc,
    services,
    settle,
    spec_file,
    words,
)

pytestmark = pytest.mark.lab

WATCH_SECONDS = 60.0
SLOTS = 2
# 10 s, 20 s, 40 s: a first try and at most 3 more in a minute (a pull takes a moment too).
MOST_ATTEMPTS_PER_SLOT = 5
MOST_CPU_SECONDS = 6.0  # 10 % of a core over the minute; it was 50 % before the fix
MOST_STORE_GROWTH = 1 << 20  # bytes: state.db and its WAL, which also hold heartbeats


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three Pis with dockerd and the lab registry."""
    require_root_or_fail()
    lab = Lab(tmp_path_factory.mktemp("backoff"), sandboxes=True, services=["dockerd"], registry=True)
    try:
        lab.up(3)
        yield lab
    finally:
        lab.down()


def coordinator_cpu(lab: Lab) -> float:
    times = psutil.Process(lab.processes[COORDINATOR].pid).cpu_times()
    return times.user + times.system


def store_bytes(lab: Lab) -> int:
    return sum(path.stat().st_size for path in lab.coordinator_state_dir.glob("state.db*") if path.is_file())


def store_rows(lab: Lab, service: str) -> tuple[int, int]:
    """The service's replica records and backoff rows, read as a second reader of the store."""
    with sqlite3.connect(f"file:{lab.coordinator_state_dir / 'state.db'}?mode=ro", uri=True) as db:
        replica_rows = db.execute("SELECT count(*) FROM replicas WHERE service = ?", (service,)).fetchone()[0]
        backoff_rows = db.execute("SELECT count(*) FROM backoffs WHERE service = ?", (service,)).fetchone()[0]
    return replica_rows, backoff_rows


def replica_number(replica_id: str) -> int:
    return int(replica_id.rsplit(".", 1)[1])


def test_image_name_typo_backs_off_per_slot_then_a_fixed_image_is_healthy_at_once(
    lab: Lab, tmp_path: Path
) -> None:
    # Qualified with the lab registry, so no Pi ever looks past it for the name.
    typo = f"{lab.registry_address}/mcp-sever:1"
    path = spec_file(tmp_path, "typo", service_doc("typo", image=typo, replicas=SLOTS))
    ok(lab, "apply", "-f", str(path))
    done = ctl(lab, "rollout", "typo")
    said = words(done)
    assert done.returncode == 1, said
    assert re.search(rf"cannot pull {re.escape(typo)}", said), said

    cpu_before, bytes_before, started = coordinator_cpu(lab), store_bytes(lab), time.monotonic()
    seen: set[str] = set()
    backoff_lines: list[str] = []
    statuses: set[str] = set()
    most_rows = (0, 0)
    while time.monotonic() - started < WATCH_SECONDS:
        for row in replicas(lab, "typo"):
            seen.add(row["replica"])
            if row["state"] == "backoff":
                backoff_lines.append(row["message"])
        statuses.add(services(lab)["typo"]["rollout"])
        rows = store_rows(lab, "typo")
        most_rows = (max(most_rows[0], rows[0]), max(most_rows[1], rows[1]))
        time.sleep(2.0)
    cpu = coordinator_cpu(lab) - cpu_before
    growth = store_bytes(lab) - bytes_before
    attempts = max(map(replica_number, seen))
    print(
        f"image name typo over {WATCH_SECONDS:.0f} s: {attempts} replicas created for {SLOTS} slots "
        f"({attempts / SLOTS:.1f} per slot), coordinator CPU {cpu:.2f} s, store +{growth} bytes, "
        f"most rows: {most_rows[0]} replicas, {most_rows[1]} backoffs"
    )
    assert attempts <= SLOTS * MOST_ATTEMPTS_PER_SLOT, sorted(seen, key=replica_number)
    assert cpu <= MOST_CPU_SECONDS, f"coordinator used {cpu:.2f} s of CPU in {WATCH_SECONDS:.0f} s"
    assert growth <= MOST_STORE_GROWTH, f"the store grew by {growth} bytes"
    assert most_rows[0] <= SLOTS * 2 and most_rows[1] <= SLOTS, most_rows  # one record per slot, and its stop
    assert statuses == {"failed"}, statuses  # failing, never shown as rolling
    assert backoff_lines, "coordctl ps never showed a slot waiting for its next try"
    assert any(re.search(r"cannot pull .*; next try in \d+ s$", line) for line in backoff_lines), (
        backoff_lines
    )

    # The user fixes the name: healthy at once, however long the backoff had still to run.
    ok(
        lab,
        "apply",
        "-f",
        str(spec_file(tmp_path, "typo", service_doc("typo", image="mcp:1", replicas=SLOTS))),
    )
    fixed = time.monotonic()
    said = ok(lab, "rollout", "typo", timeout=60)
    assert re.search(r"2/2 healthy", said), said
    settle(lab, "typo on the fixed image", "typo", SLOTS, revision=2)
    took = time.monotonic() - fixed
    print(f"fixed image healthy after {took:.1f} s")
    assert took < 30.0, f"the fixed image took {took:.1f} s: it waited for the backoff"
    assert store_rows(lab, "typo")[1] == 0  # the rollout cleared the slots' backoffs
    ok(lab, "services")
