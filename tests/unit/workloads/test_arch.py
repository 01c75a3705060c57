"""One spelling per architecture, whatever tool wrote it."""

import pytest

from picoord.common.names import normalise_arch


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("aarch64", "arm64"),  # uname -m on a 64-bit Pi, Swarm's node.platform.arch
        ("arm64", "arm64"),  # Kubernetes' kubernetes.io/arch, Docker's platform
        ("ARM64", "arm64"),
        ("x86_64", "amd64"),
        ("amd64", "amd64"),
        ("armv7l", "arm"),  # 32-bit Raspberry Pi OS
        ("armhf", "arm"),
        ("arm", "arm"),
        ("riscv64", "riscv64"),  # unknown: kept, lowercased
    ],
)
def test_normalise_arch(written: str, meant: str) -> None:
    assert normalise_arch(written) == meant
