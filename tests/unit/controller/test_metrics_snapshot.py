"""What /metrics says of services: the controller's figures after each tick, matching what
`coordctl services` shows, and the exposition of those figures."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.controller.controller import ServiceFigures
from picoord.coordinator.prometheus import service_metrics
from tests.unit.controller.test_controller import Rig, rig  # noqa: F401 - the fixture


async def test_applied_services_have_figures_before_and_after_their_rollout(rig: Rig) -> None:  # noqa: F811
    assert rig.controller.metrics_snapshot() == ()  # no tick yet
    await rig.controller.tick()
    before = {figure.service: figure for figure in rig.controller.metrics_snapshot()}
    assert before["mcp"] == ServiceFigures("mcp", 3, 0, 0, 0, "not rolled out")
    rig.records.put_secret("mcp-secrets", "database-url", b"postgresql://x@postgres/db", rig.clock.now)
    await rig.controller.start_rollout("mcp")
    await rig.settle(8)
    after = {figure.service: figure for figure in rig.controller.metrics_snapshot()}
    views = {view.name: view for view in await rig.controller.services_view()}
    for name, figure in after.items():
        view = views[name]
        assert (figure.desired, figure.running, figure.healthy, figure.revision, figure.rollout_status) == (
            view.desired,
            view.running,
            view.healthy,
            view.revision,
            RolloutStatus.from_wire(view.rollout_status),
        )
    assert after["mcp"].rollout_status == "complete" and after["mcp"].healthy == 3


class _Figures:
    def __init__(self, figures: Sequence[ServiceFigures]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        return service_metrics(self.figures)


def test_service_metrics_exposition() -> None:
    figures = [
        ServiceFigures("web", 3, 2, 1, 4, "progressing"),
        ServiceFigures("db", 1, 0, 0, 0, "not rolled out"),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(figures))
    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("picoord_service_replicas", (("service", "web"), ("state", "desired")))] == 3
    assert samples[("picoord_service_replicas", (("service", "web"), ("state", "running")))] == 2
    assert samples[("picoord_service_replicas", (("service", "web"), ("state", "healthy")))] == 1
    assert samples[("picoord_rollout_revision", (("service", "web"),))] == 4
    statuses = {
        labels[1][1]: value
        for (name, labels), value in samples.items()
        if name == "picoord_rollout_status" and labels[0][1] == "db"
    }
    assert statuses == {status: 1.0 if status == "not rolled out" else 0.0 for status in RolloutStatus}
