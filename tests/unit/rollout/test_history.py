"""Revision history and undo as list operations (Kubernetes' semantics)."""

import pytest

from picoord.coordinator.rollout.history import (
    Revision,
    RevisionError,
    current,
    previous,
    record,
    undo,
)


def history_of(*specs):
    history = []
    for number, spec in enumerate(specs, start=1):
        history, _, _ = record(history, spec, float(number), f"apply {spec}")
    return history


def test_record_numbers_each_distinct_spec():
    history = history_of("mcp:1", "mcp:2", "mcp:3")
    assert [(r.number, r.spec) for r in history] == [(1, "mcp:1"), (2, "mcp:2"), (3, "mcp:3")]
    assert current(history) == Revision(3, "mcp:3", 3.0, "apply mcp:3")
    assert previous(history).number == 2


def test_record_the_current_spec_again_adds_nothing():
    history = history_of("mcp:1", "mcp:2")
    again, revision, new = record(history, "mcp:2", 9.0)
    assert (again, revision.number, new) == (history, 2, False)


def test_record_an_older_spec_moves_it_to_a_new_number():
    history = history_of("mcp:1", "mcp:2")
    updated, revision, new = record(history, "mcp:1", 9.0, "apply")
    assert new and revision.number == 3
    assert [(r.number, r.spec) for r in updated] == [(2, "mcp:2"), (3, "mcp:1")]


def test_record_keeps_the_last_revisions_only():
    history = history_of(*(f"mcp:{i}" for i in range(1, 13)))
    assert [r.number for r in history] == list(range(3, 13))
    history, _, _ = record(history, "mcp:99", 99.0, limit=3)
    assert [r.number for r in history] == [11, 12, 13]


@pytest.mark.parametrize(
    ("to_revision", "spec", "number"),
    [
        (None, "mcp:2", 4),  # to the previous one
        (1, "mcp:1", 4),
        (2, "mcp:2", 4),
    ],
)
def test_undo(to_revision, spec, number):
    history = history_of("mcp:1", "mcp:2", "mcp:3")
    updated, revision = undo(history, 50.0, to_revision)
    assert (revision.number, revision.spec, revision.created_at) == (number, spec, 50.0)
    target = to_revision if to_revision is not None else 2
    assert revision.cause == f"undo to revision {target}"
    assert current(updated) == revision
    assert all(r.spec != spec for r in updated if r is not revision)


def test_undo_twice_goes_back_and_forth():
    history = history_of("mcp:1", "mcp:2")
    history, first = undo(history, 10.0)
    history, second = undo(history, 11.0)
    assert (first.spec, second.spec) == ("mcp:1", "mcp:2")


@pytest.mark.parametrize(
    ("history", "to_revision", "message"),
    [
        ([], None, "no revisions to undo"),
        (history_of("mcp:1"), None, "revision 1 is the only revision; nothing to undo"),
        (history_of("mcp:1", "mcp:2"), 7, "revision 7 not found (known: 1, 2)"),
        (history_of("mcp:1", "mcp:2"), 2, "revision 2 is already the current revision"),
    ],
)
def test_undo_refuses_with_a_reason(history, to_revision, message):
    with pytest.raises(RevisionError) as caught:
        undo(history, 1.0, to_revision)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("running", "to_revision", "spec", "number"),
    [
        (2, None, "mcp:1", 4),  # mcp:3 failed and was rolled back to 2: back to 1, not to 2 again
        (2, 3, "mcp:3", 3),  # the failed one again, on purpose: it is the newest already
        (3, None, "mcp:2", 4),  # running the newest: as without `running`
    ],
)
def test_undo_goes_back_from_the_running_revision(running, to_revision, spec, number):
    history = history_of("mcp:1", "mcp:2", "mcp:3")
    _, revision = undo(history, 50.0, to_revision, running=running)
    assert (revision.spec, revision.number) == (spec, number)


@pytest.mark.parametrize(
    ("running", "to_revision", "message"),
    [
        (1, None, "revision 1 is the oldest revision; nothing to undo"),
        (2, 2, "revision 2 is already the current revision"),
    ],
)
def test_undo_from_the_running_revision_refuses_with_a_reason(running, to_revision, message):
    with pytest.raises(RevisionError) as caught:
        undo(history_of("mcp:1", "mcp:2", "mcp:3"), 1.0, to_revision, running=running)
    assert str(caught.value) == message
