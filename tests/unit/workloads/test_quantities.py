"""Memory, CPU and durations as Docker, Kubernetes and picoord write them."""

import pytest

from picoord.common.validation import FieldError
from picoord.coordinator.workloads.quantities import (
    DOCKER,
    KUBERNETES,
    cpu_millicores,
    duration_seconds,
    format_bytes,
    memory_bytes,
)

MI = 1024**2
GI = 1024**3


@pytest.mark.parametrize(
    ("written", "meaning", "expected"),
    [
        ("256Mi", KUBERNETES, 256 * MI),
        ("512Mi", KUBERNETES, 512 * MI),
        ("1Gi", KUBERNETES, GI),
        ("1G", KUBERNETES, 10**9),  # Kubernetes: SI
        ("512M", KUBERNETES, 512 * 10**6),
        ("128974848", KUBERNETES, 128974848),
        ("129e6", KUBERNETES, 129 * 10**6),
        ("1.5Gi", KUBERNETES, 3 * GI // 2),
        ("100k", KUBERNETES, 100_000),
        (268435456, KUBERNETES, 256 * MI),
        ("512M", DOCKER, 512 * MI),  # Docker: M means MiB
        ("256M", DOCKER, 256 * MI),
        ("1G", DOCKER, GI),
        ("1g", DOCKER, GI),
        ("1gb", DOCKER, GI),
        ("256Mi", DOCKER, 256 * MI),  # Docker takes the i too
        ("64k", DOCKER, 64 * 1024),
        ("1.5g", DOCKER, 3 * GI // 2),
        ("1024", DOCKER, 1024),
        ("0", DOCKER, 0),
    ],
)
def test_memory_sizes(written: object, meaning: str, expected: int) -> None:
    assert memory_bytes("m", written, meaning) == expected


@pytest.mark.parametrize("meaning", [KUBERNETES, DOCKER])
@pytest.mark.parametrize(
    "written", ["12XB", "", "Mi", "256 Mi x", "-1Mi", "1.2.3G", "lots", True, None, [1], 2.5]
)
def test_memory_refused(written: object, meaning: str) -> None:
    with pytest.raises(FieldError) as error:
        memory_bytes("Service/mcp.resources.requests.memory", written, meaning)
    assert error.value.field == "Service/mcp.resources.requests.memory"


def test_memory_error_reads_as_the_issue_says() -> None:
    with pytest.raises(FieldError) as error:
        memory_bytes("Service/mcp.resources.requests.memory", "12XB")
    assert str(error.value) == (
        'Service/mcp.resources.requests.memory: "12XB" is not a memory size (use e.g. 256Mi or 1G)'
    )


@pytest.mark.parametrize("written", ["2Pi", 2 * 1024**5, "2000T"])
def test_memory_absurd_sizes_refused(written: object) -> None:
    with pytest.raises(FieldError, match="more than 1 PiB"):
        memory_bytes("m", written)


@pytest.mark.parametrize(
    ("written", "millicores"),
    [
        ("250m", 250),
        ("500m", 500),
        ("0.5", 500),
        ("2", 2000),
        (2, 2000),
        (0.25, 250),
        ("1.5", 1500),
        ("0", 0),
    ],
)
def test_cpu(written: object, millicores: int) -> None:
    assert cpu_millicores("c", written) == millicores


@pytest.mark.parametrize("written", ["0.0005", "1.5m", "-1", "one", "250 m", "2000c", True, None, "2000"])
def test_cpu_refused(written: object) -> None:
    with pytest.raises(FieldError) as error:
        cpu_millicores("deploy.resources.limits.cpus", written)
    assert error.value.field == "deploy.resources.limits.cpus"


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("100ms", 0.1),
        ("1h", 3600.0),
        ("2.5s", 2.5),
        (10, 10.0),
        (0.5, 0.5),
        ("0s", 0.0),
    ],
)
def test_durations(written: object, seconds: float) -> None:
    assert duration_seconds("d", written) == pytest.approx(seconds)


@pytest.mark.parametrize("written", ["5", "5 s", "s", "", "-5s", "5d", "1w", True, None, -1, "200h"])
def test_durations_refused(written: object) -> None:
    with pytest.raises(FieldError):
        duration_seconds("d", written)


@pytest.mark.parametrize(("size", "text"), [(256 * MI, "256Mi"), (GI, "1Gi"), (1000, "1000"), (0, "0")])
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text
