"""docs/workloads.md tables every key the importers warn about or refuse, with its verdict."""

from pathlib import Path

import pytest

from picoord.coordinator.workloads.importers import compose, kubernetes

DOC = (Path(__file__).resolve().parents[3] / "docs" / "workloads.md").read_text()

TABLES = [
    (compose.TOP_LEVEL_KEYS, ""),
    (compose.SERVICE_KEYS, "services.NAME."),
    (compose.DEPLOY_KEYS, "deploy."),
    (kubernetes.METADATA_KEYS, "metadata."),
    (kubernetes.WORKLOAD_SPEC_KEYS, "spec."),
    (kubernetes.POD_KEYS, ""),
    (kubernetes.CONTAINER_KEYS, "containers[0]."),
    (kubernetes.SERVICE_SPEC_KEYS, "spec."),
]


@pytest.mark.parametrize(
    ("key", "verdict"),
    [(prefix + key, rule[0]) for table, prefix in TABLES for key, rule in sorted(table.items())],
)
def test_every_declared_key_is_documented_with_its_verdict(key: str, verdict: str) -> None:
    word = "**error**" if verdict == "error" else "warning"
    assert f"| `{key}` | {word} |" in DOC


@pytest.mark.parametrize(
    "phrase",
    [
        "node.platform.arch == aarch64",
        "kubernetes.io/arch: arm64",
        "secretKeyRef",
        "CMD-SHELL",
        "strategy.rollingUpdate",
        "deploy.update_config",
        "deploy.rollback_config",
        "type: LoadBalancer",
        "replicated-job",
        "depends_on",
    ],
)
def test_the_issues_mappings_are_documented(phrase: str) -> None:
    assert phrase in DOC
