"""The repository's example files as tests read them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LAN = "192.168.1.0/24"


def cluster_example() -> str:
    """examples/cluster.yaml filled in as its reader would: its firewall's YOUR_LAN/24
    placeholder is refused as it stands."""
    return (ROOT / "examples" / "cluster.yaml").read_text().replace("YOUR_LAN/24", EXAMPLE_LAN)
