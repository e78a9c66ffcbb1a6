"""One Prometheus exposition from every replica's: each sample gains a ``replica`` label.

Each replica renders its own registry (``toolkit.server.metrics``); under Ray the replica that
answers ``/metrics`` gathers all of them (``DeploymentHandle.broadcast``) and merges them here, so
one scrape of the one endpoint shows every replica, told apart by ``replica="<Ray replica id>"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_expositions(expositions: Iterable[tuple[str, str]]) -> tuple[bytes, str]:
    """``[(replica id, exposition text)]`` → one exposition (bytes) and its content type."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(expositions):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp, s.exemplar)
                for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry), CONTENT_TYPE_LATEST
