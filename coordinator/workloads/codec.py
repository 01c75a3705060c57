"""A ServiceSpec as canonical JSON text and back: how the store keeps each revision.

The text holds every field that takes part in equality, with sorted keys and no spaces, so
two equal specs give the same text (the rollout history compares revisions by it) and
`spec_from_json(spec_to_json(spec)) == spec`. Where a value was written (`origin`, `field`)
is not kept: it only serves error messages while a file is read.
"""

from __future__ import annotations

import json

from picoord.common.plaindata import DecodeError, from_plain, to_plain
from picoord.coordinator.workloads.spec import ServiceSpec

FORMAT_VERSION = 1
MAX_TEXT = 256 * 1024


class CodecError(DecodeError):
    """Stored text that is not a spec this version can read."""


def spec_to_json(spec: ServiceSpec) -> str:
    data = {"format": FORMAT_VERSION, "service": to_plain(spec, compared_only=True)}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_from_json(text: str) -> ServiceSpec:
    if len(text) > MAX_TEXT:
        raise CodecError(f"stored spec is larger than {MAX_TEXT} characters")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CodecError(f"stored spec is not JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise CodecError(f"stored spec is not format {FORMAT_VERSION}")
    try:
        return from_plain(ServiceSpec, data.get("service"), "service")
    except DecodeError as error:
        raise CodecError(str(error)) from None
