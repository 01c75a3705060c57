"""Specs stored as canonical JSON come back equal; equal specs give equal text."""

import dataclasses
import json

import pytest

from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.codec import CodecError, spec_from_json, spec_to_json
from picoord.coordinator.workloads.reader import read_workloads
from tests.unit.workloads.documents import EXAMPLES, RICH_COMPOSE, RICH_KUBERNETES

TEXTS = [
    (EXAMPLES / "mcp.yaml").read_text(),
    (EXAMPLES / "seed-docker-stack.yml").read_text(),
    (EXAMPLES / "seed-mcp-deployment.yaml").read_text(),
    RICH_COMPOSE,
    RICH_KUBERNETES,
]
SPECS = [spec for text in TEXTS for spec in read_workloads(text).services]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: f"{spec.origin}")
def test_round_trip(spec: s.ServiceSpec) -> None:
    text = spec_to_json(spec)
    assert spec_from_json(text) == spec
    assert spec_to_json(spec_from_json(text)) == text


def test_where_it_was_written_is_not_stored() -> None:
    spec = SPECS[0]
    moved = dataclasses.replace(spec, origin="elsewhere")
    assert spec_to_json(moved) == spec_to_json(spec)
    assert "origin" not in spec_to_json(spec)


def test_text_is_canonical() -> None:
    text = spec_to_json(SPECS[0])
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _mutated(**change: object) -> str:
    data = json.loads(spec_to_json(SPECS[0]))
    data["service"].update(change)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ('{"format": 2, "service": {}}', "not format 1"),
        ("[]", "not format 1"),
        (_mutated(colour="red"), "unknown field 'colour'"),
        (_mutated(replicas="3"), "service.replicas: expected int"),
        (_mutated(replicas=True), "service.replicas: expected int"),
        (_mutated(ports=[{"target": "x"}]), "service.ports[0].target"),
        (_mutated(health=[1]), "service.health"),
        (_mutated(labels=[["a"]]), "service.labels[0]: expected 2 items"),
        ("x" * (257 * 1024), "larger than"),
    ],
)
def test_bad_stored_text(text: str, message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec_from_json(text)
