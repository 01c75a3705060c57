"""Properties over many inputs: units round-trip, the revision key ignores order of reading."""

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.quantities import (
    DOCKER,
    KUBERNETES,
    cpu_millicores,
    format_bytes,
    memory_bytes,
)

names = st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True)


@given(st.integers(min_value=0, max_value=1024**4))
def test_memory_round_trips_through_its_binary_spelling(size: int) -> None:
    text = format_bytes(size)
    assert memory_bytes("m", text, KUBERNETES) == size
    if text[-2:] in ("Ki", "Mi", "Gi", "Ti"):
        assert memory_bytes("m", text, DOCKER) == size  # Docker reads the i the same way


@given(st.integers(min_value=0, max_value=1024 * 1000))
def test_cpu_millicores_round_trip(millicores: int) -> None:
    assert cpu_millicores("c", f"{millicores}m") == millicores
    assert cpu_millicores("c", f"{millicores / 1000:.3f}") == millicores


@given(st.dictionaries(names, st.text(max_size=20), max_size=6), st.integers(min_value=0, max_value=100))
def test_revision_key_depends_on_content_not_identity(env: dict, replicas: int) -> None:
    spec = s.ServiceSpec(name="a", image="a:1", env=tuple(s.EnvVar(k, v) for k, v in env.items()))
    copy = dataclasses.replace(spec, env=tuple(dataclasses.replace(e) for e in spec.env), replicas=replicas)
    assert s.revision_key(copy) == s.revision_key(spec)
