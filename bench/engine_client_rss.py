"""What a Docker Engine client costs the agent's memory: docker-py against agent/docker_api.py.

Each run is a fresh Debian 12 /usr/bin/python3 (python3-docker 5.0.3 installed) on a tree
built by `/usr/bin/python3 scripts/build-debian-tree DIR`: it imports the agent's own
modules (what a running agent has loaded), reads its RSS, loads one client, and reads it
again. `bare` does the same on an interpreter that has imported nothing of picoord. (A
running agent has loaded docker_api already, for its hardware report's Docker version.)

    .venv/bin/python bench/engine_client_rss.py --debian-tree DIR [--runs 3] [--json out.json]

The "One small Docker Engine client" figures in docs/architecture.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

DEBIAN_PYTHON = "/usr/bin/python3"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PROBE = """
import sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
if sys.argv[2] == "agent":
    import picoord.agent.entry, picoord.agent.session, picoord.agent.cli, picoord.agent.metrics
    import picoord.agent.actions.registry
before = rss()
if sys.argv[1] == "docker-py":
    import docker
    docker.APIClient
else:
    import picoord.agent.docker_api
print(rss() - before)
"""
CLIENTS = ("docker-py", "docker_api")
BASES = ("agent", "bare")


def grown(tree: Path, client: str, base: str) -> float:
    """MiB of RSS that loading `client` adds, in one fresh Debian python."""
    env = {"PATH": SYSTEM_PATH, "PYTHONPATH": str(tree), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run(
        [DEBIAN_PYTHON, "-s", "-c", PROBE, client, base],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"engine_client_rss: {client} on {base} failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--debian-tree", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.debian_tree / "picoord" / "agent" / "docker_api.py").exists():
        print(f"engine_client_rss: {args.debian_tree} holds no picoord agent tree", file=sys.stderr)
        return 2
    result: dict[str, dict[str, list[float]]] = {}
    for base in BASES:
        result[base] = {
            client: [grown(args.debian_tree, client, base) for _ in range(args.runs)] for client in CLIENTS
        }
        figures = ", ".join(
            f"{client} +{statistics.median(runs):.1f} MiB (runs {', '.join(f'{run:.2f}' for run in runs)})"
            for client, runs in result[base].items()
        )
        print(f"{base}: {figures}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
