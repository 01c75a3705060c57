"""Shared plumbing for the benchmarks: free loopback ports, child processes that always die
with the bench, a coordinator on a temp state dir, psutil sampling, small statistics.

Nothing here is a test helper: the benchmarks are scripts, run with the venv's python.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

BIN = Path(sys.executable).parent  # the venv's console scripts live next to its python
LOOPBACK = "127.0.0.1"
# Below the kernel's ephemeral range (32768-60999), so the thousands of client connections a
# benchmark opens never sit on a port picked here.
PORT_RANGE = (20000, 30000)
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved now: a forked child must not dlopen


class BenchError(RuntimeError):
    """The benchmark could not run or its result is invalid."""


# --- process hygiene -------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` cleanup runs.

    SIGINT is set explicitly: a shell without job control starts background jobs with it
    ignored, and Python keeps it that way.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_keyboard_interrupt)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def raise_nofile_limit(wanted: int = 65536) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (inherited by every child) to `wanted` or the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class Processes:
    """Child processes started by a benchmark; `stop_all` ends each one by its own pid."""

    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> psutil.Process:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops children in order
                preexec_fn=die_with_parent,
            )
        self.children.append((name, proc))
        return psutil.Process(proc.pid)

    def forget(self, pid: int) -> None:
        """Stop tracking a child the bench ended on purpose (a SIGKILL), after reaping it."""
        for name, proc in list(self.children):
            if proc.pid == pid:
                proc.wait(10)
                self.children.remove((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None:
                raise BenchError(f"{name} (pid {proc.pid}) exited early with status {proc.returncode}")

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM each child (newest first), SIGKILL whatever is left after `timeout`."""
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        self.children.clear()


@contextlib.contextmanager
def bench_workspace(prefix: str) -> Iterator[tuple[Path, Processes]]:
    """A temp dir and a process list, both removed on the way out whatever happened."""
    install_signal_handlers()
    root = Path(tempfile.mkdtemp(prefix=f"picoord-bench-{prefix}-"))
    processes = Processes()
    try:
        yield root, processes
    finally:
        # Cleanup must finish even if a second Ctrl-C arrives while it runs.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            processes.stop_all()
            shutil.rmtree(root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


# --- ports -----------------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """True when nothing listens on the port, SO_REUSEPORT listeners included.

    gRPC servers set SO_REUSEPORT, so a second coordinator can bind a port another one
    already serves and silently split its connections. A plain bind (no SO_REUSEPORT)
    fails on such a port, which is what we want.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_ports(count: int, consecutive: bool = False) -> list[int]:
    """`count` free loopback ports (consecutive ones when asked) from PORT_RANGE."""
    for _ in range(500):
        if consecutive:
            first = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
            ports = list(range(first, first + count))
        else:
            ports = random.sample(range(*PORT_RANGE), count)
        if all(port_is_free(port) for port in ports):
            return ports
    raise BenchError(f"no {count} free ports in {PORT_RANGE}")


def listeners(port: int) -> set[int | None]:
    """Pids listening on a TCP port (None when the kernel does not say)."""
    return {
        conn.pid
        for conn in psutil.net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }


def wait_for(what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read()


def prometheus_values(text: str, names: Sequence[str]) -> dict[str, float]:
    """Values of label-less series from Prometheus text exposition."""
    wanted, found = set(names), {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value.split()[0])
    return found


# --- the coordinator -------------------------------------------------------------------------


def program(name: str) -> list[str]:
    """The venv's console script `name`, or the command in $PICOORD_BENCH_<NAME> (e.g.
    PICOORD_BENCH_COORDINATOR), to compare another build or a patched one with the same bench."""
    override = os.environ.get("PICOORD_BENCH_" + name.removeprefix("picoord-").upper())
    return override.split() if override else [str(BIN / name)]


@dataclass
class Coordinator:
    """A picoord-coordinator on loopback with a temp state dir (enrollment on port + 1)."""

    state_dir: Path
    port: int
    metrics_port: int
    process: psutil.Process | None = None

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def enroll_address(self) -> str:
        return f"{LOOPBACK}:{self.port + 1}"

    @property
    def log(self) -> Path:
        return self.state_dir.parent / "coordinator.log"

    extra: tuple[str, ...] = ()
    prlimit_nofile: int | None = None  # start it under this open-files limit (soft and hard)

    @classmethod
    def start(
        cls,
        root: Path,
        processes: Processes,
        extra: Sequence[str] = (),
        prlimit_nofile: int | None = None,
    ) -> Coordinator:
        port, _ = pick_ports(2, consecutive=True)
        (metrics_port,) = pick_ports(1)
        coordinator = cls(root / "coordinator", port, metrics_port, None, tuple(extra), prlimit_nofile)
        coordinator._launch(processes)
        return coordinator

    @classmethod
    def restart(cls, previous: Coordinator, processes: Processes) -> Coordinator:
        """The same coordinator again (state dir, ports, flags), e.g. after a SIGKILL."""
        coordinator = cls(
            previous.state_dir,
            previous.port,
            previous.metrics_port,
            None,
            previous.extra,
            previous.prlimit_nofile,
        )
        coordinator._launch(processes)
        return coordinator

    def _launch(self, processes: Processes) -> None:
        argv = [
            *program("picoord-coordinator"),
            "--state-dir",
            str(self.state_dir),
            "--admin-socket",
            str(self.admin_socket),
            "--listen",
            self.address,
            "--metrics-listen",
            f"{LOOPBACK}:{self.metrics_port}",
            "--advertise-address",
            LOOPBACK,
            *self.extra,
        ]
        if self.prlimit_nofile is not None:
            argv = ["prlimit", f"--nofile={self.prlimit_nofile}:{self.prlimit_nofile}", "--", *argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = processes.start("picoord-coordinator", argv, self.log, env)
        try:
            wait_for("the coordinator's admin socket", self._answers, 30, processes.check_alive)
            self._check_sole_listener()
        except BenchError as error:
            raise BenchError(f"{error}\n--- coordinator log ---\n{self.log_tail()}") from None

    def _answers(self) -> bool:
        if not self.admin_socket.exists():
            return False
        http_get(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=2)
        return True

    def _check_sole_listener(self) -> None:
        """Refuse to measure if another process shares our ports (SO_REUSEPORT)."""
        assert self.process is not None
        for port in (self.port, self.port + 1, self.metrics_port):
            owners = listeners(port)
            if owners != {self.process.pid}:
                raise BenchError(
                    f"port {port} is served by pids {owners}, not only ours ({self.process.pid})"
                )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def coordctl(self, *args: str) -> Any:
        """Run coordctl with `-o json` as an operator would; return the parsed output."""
        env = {**os.environ, "COORDCTL_ADMIN_SOCKET": str(self.admin_socket)}
        done = subprocess.run(
            [str(BIN / "coordctl"), *args, "-o", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"coordctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)

    def metrics(self, names: Sequence[str]) -> tuple[dict[str, float], float]:
        """The named coordinator series and how long the scrape took (seconds)."""
        started = time.perf_counter()
        text = http_get(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=60).decode()
        return prometheus_values(text, names), time.perf_counter() - started


# --- sampling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    cpu_seconds: float  # user + system, reaped children included
    rss: int
    uss: int | None


def thread_cpu_seconds(process: psutil.Process) -> dict[str, float]:
    """CPU seconds of the process's live threads so far, summed by thread name (/proc's
    comm): gRPC's core names its threads (event_engine, ...), Python's threads keep the
    process's name. A thread that ended between two readings drops out of the difference."""
    totals: dict[str, float] = {}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        totals[name] = totals.get(name, 0.0) + thread.user_time + thread.system_time
    return totals


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def take_sample(process: psutil.Process, with_children: bool = False) -> Sample:
    """CPU and memory of `process`, and of its live children when `with_children` (the
    coordinator's admin read replica is part of the coordinator's cost)."""
    with process.oneshot():
        cpu = cpu_seconds(process)
        rss = process.memory_info().rss
    for child in process.children(recursive=True) if with_children else ():
        with contextlib.suppress(psutil.Error):  # it exited meanwhile: its CPU is reaped into ours
            times = child.cpu_times()
            cpu += times.user + times.system
            rss += child.memory_info().rss
    uss: int | None = None
    with contextlib.suppress(psutil.AccessDenied, AttributeError, OSError):
        uss = process.memory_full_info().uss
    return Sample(time.monotonic(), cpu, rss, uss)


class Sampler(threading.Thread):
    """Samples named processes every `interval` seconds until stopped; those named in
    `with_children` with their live children."""

    def __init__(
        self,
        processes: dict[str, psutil.Process],
        interval: float = 1.0,
        with_children: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(name="sampler", daemon=True)
        self.processes = processes
        self.interval = interval
        self.with_children = with_children
        self.samples: dict[str, list[Sample]] = {name: [] for name in processes}
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def sample_all(self) -> None:
        for name, process in self.processes.items():
            try:
                self.samples[name].append(take_sample(process, name in self.with_children))
            except psutil.Error as error:
                self.errors.append(f"{name}: {error!r}")

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            self.sample_all()
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
        self.sample_all()  # a final sample closes the window exactly


@dataclass(frozen=True)
class Footprint:
    steady_rss: float  # median of the last half of the samples, bytes
    peak_rss: int
    steady_uss: float | None
    peak_uss: int | None
    cpu_percent: float  # of one core, over the window
    window: float
    samples: int


def footprint(samples: list[Sample]) -> Footprint:
    if len(samples) < 2:
        raise BenchError("fewer than two samples: nothing to measure")
    last_half = samples[len(samples) // 2 :]
    window = samples[-1].at - samples[0].at
    cpu = 100.0 * (samples[-1].cpu_seconds - samples[0].cpu_seconds) / window
    uss = [s.uss for s in samples if s.uss is not None]
    uss_half = [s.uss for s in last_half if s.uss is not None]
    return Footprint(
        steady_rss=statistics.median(s.rss for s in last_half),
        peak_rss=max(s.rss for s in samples),
        steady_uss=statistics.median(uss_half) if uss_half else None,
        peak_uss=max(uss) if uss else None,
        cpu_percent=cpu,
        window=window,
        samples=len(samples),
    )


class MachineCpu:
    """Whole-machine CPU busy time between `start` and `stop` (in cores, e.g. 1.3 of 2)."""

    def __init__(self) -> None:
        self._start = psutil.cpu_times()
        self._at = time.monotonic()
        self.busy_cores = 0.0
        self.steal_cores = 0.0

    def stop(self) -> None:
        end, elapsed = psutil.cpu_times(), time.monotonic() - self._at
        idle = (end.idle - self._start.idle) + (getattr(end, "iowait", 0) - getattr(self._start, "iowait", 0))
        total = sum(end) - sum(self._start)
        # guest time is already inside user time; sum() counts it twice, which is negligible here
        self.busy_cores = (total - idle) / elapsed
        self.steal_cores = (getattr(end, "steal", 0.0) - getattr(self._start, "steal", 0.0)) / elapsed


# --- statistics and output -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def finish_lab_bench(name: str, args: Any, run: Callable[[Any], Any], report: Callable[[Any], bool]) -> int:
    """Run a lab bench and report it: its figures printed, written as JSON with --json (with
    whether its targets were met), exit 1 under --strict when one is missed, 2 on a bench
    error, 130 when interrupted (the lab cleaned up either way)."""
    try:
        result = run(args)
    except BenchError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted, cleaned up", file=sys.stderr)
        return 130
    met = report(result)
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "targets_met": met}, indent=2) + "\n")
    return 1 if args.strict and not met else 0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
