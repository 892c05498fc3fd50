"""Metrics and traces per resource, for Prometheus and OpenTelemetry.

Pass observers to the registry: ``Resources(observers=[PrometheusMetrics()])``.
Without any, the core skips every hook (one ``is None`` check per acquire and
release); neither ``prometheus_client`` nor ``opentelemetry`` is imported unless
you build the observer that uses it.

=========================  ==========================  =================================
what                       Prometheus                  OpenTelemetry
=========================  ==========================  =================================
open owners (app)          ``..._owners_open``         ``scoped_resources.owners.open``
leases in use (request)    ``..._leases_in_use``       ``scoped_resources.leases.in_use``
waiters                    ``..._waiters``             ``scoped_resources.waiters``
acquire wait time          ``..._acquire_seconds``     ``scoped_resources.acquire.duration``
release time               ``..._release_seconds``     ``scoped_resources.release.duration``
acquire timeouts           ``..._acquire_timeouts``    ``scoped_resources.acquire.timeouts``
failed releases            ``..._release_failures``    ``scoped_resources.release.failures``
terminations               ``..._terminations``        ``scoped_resources.terminations``
=========================  ==========================  =================================

Every series has the label (attribute) ``resource``; the failure counters also
``outcome`` (``failed``, ``timeout``, ``interrupted``). OpenTelemetry also gets one
span per acquire and per release, named ``acquire <resource>`` / ``release <resource>``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ._observe import Observer
from ._resource import APP

if TYPE_CHECKING:
    from ._resource import Resource

__all__ = ["Observer", "OpenTelemetryMetrics", "PrometheusMetrics"]


def _in_use_gauge(resource: Resource[object]) -> str:
    return "owners" if resource.level is APP else "leases"


class PrometheusMetrics(Observer):
    """Per-resource Prometheus metrics (needs ``prometheus_client``).

    *registry* defaults to prometheus_client's global one; *namespace* prefixes
    every metric name.
    """

    def __init__(self, registry: Any = None, namespace: str = "scoped_resources") -> None:
        import prometheus_client as prom

        kwargs: dict[str, Any] = {"namespace": namespace}
        if registry is not None:
            kwargs["registry"] = registry
        self.owners_open = prom.Gauge(
            "owners_open", "App-scoped resources open now.", ["resource"], **kwargs
        )
        self.leases_in_use = prom.Gauge(
            "leases_in_use", "Request-scoped instances held now.", ["resource"], **kwargs
        )
        self.waiters = prom.Gauge("waiters", "Acquires waiting now.", ["resource"], **kwargs)
        self.acquire_seconds = prom.Histogram(
            "acquire_seconds", "Time to acquire an instance.", ["resource"], **kwargs
        )
        self.release_seconds = prom.Histogram(
            "release_seconds", "Time to release an instance.", ["resource"], **kwargs
        )
        self.acquire_timeouts = prom.Counter(
            "acquire_timeouts", "Acquires that ran past their deadline.", ["resource"], **kwargs
        )
        self.release_failures = prom.Counter(
            "release_failures",
            "Releases that failed, timed out or were interrupted.",
            ["resource", "outcome"],
            **kwargs,
        )
        self.terminations = prom.Counter(
            "terminations", "Terminate hooks run.", ["resource"], **kwargs
        )

    def _held(self, resource: Resource[object]) -> Any:
        gauge = self.owners_open if resource.level is APP else self.leases_in_use
        return gauge.labels(resource.name)

    def acquire_started(self, resource: Resource[object]) -> None:
        self.waiters.labels(resource.name).inc()

    def acquired(self, resource: Resource[object], seconds: float) -> None:
        self.waiters.labels(resource.name).dec()
        self.acquire_seconds.labels(resource.name).observe(seconds)
        self._held(resource).inc()

    def acquire_failed(self, resource: Resource[object], seconds: float, busy: bool) -> None:
        self.waiters.labels(resource.name).dec()
        self.acquire_seconds.labels(resource.name).observe(seconds)
        if busy:
            self.acquire_timeouts.labels(resource.name).inc()

    def released(self, resource: Resource[object], seconds: float, outcome: str) -> None:
        self._held(resource).dec()
        self.release_seconds.labels(resource.name).observe(seconds)
        if outcome != "ok":
            self.release_failures.labels(resource.name, outcome).inc()

    def terminated(self, resource: Resource[object]) -> None:
        self.terminations.labels(resource.name).inc()


class OpenTelemetryMetrics(Observer):
    """Per-resource OpenTelemetry metrics and spans (needs ``opentelemetry-api``).

    *meter_provider* and *tracer_provider* default to the global ones.
    """

    def __init__(self, meter_provider: Any = None, tracer_provider: Any = None) -> None:
        from opentelemetry import metrics, trace

        meter = metrics.get_meter("scoped_resources", meter_provider=meter_provider)
        self._tracer = trace.get_tracer("scoped_resources", tracer_provider=tracer_provider)
        self._held = {
            "owners": meter.create_up_down_counter(
                "scoped_resources.owners.open", description="App-scoped resources open now."
            ),
            "leases": meter.create_up_down_counter(
                "scoped_resources.leases.in_use", description="Request-scoped instances held."
            ),
        }
        self._waiters = meter.create_up_down_counter(
            "scoped_resources.waiters", description="Acquires waiting now."
        )
        self._acquire = meter.create_histogram(
            "scoped_resources.acquire.duration", unit="s", description="Time to acquire."
        )
        self._release = meter.create_histogram(
            "scoped_resources.release.duration", unit="s", description="Time to release."
        )
        self._timeouts = meter.create_counter(
            "scoped_resources.acquire.timeouts", description="Acquires past their deadline."
        )
        self._failures = meter.create_counter(
            "scoped_resources.release.failures", description="Releases that did not end well."
        )
        self._terminations = meter.create_counter(
            "scoped_resources.terminations", description="Terminate hooks run."
        )

    def _span(self, name: str, resource: Resource[object], seconds: float, ok: bool) -> None:
        from opentelemetry.trace import Status, StatusCode

        end = time.time_ns()
        span = self._tracer.start_span(
            f"{name} {resource.name}",
            start_time=end - int(seconds * 1e9),
            attributes={"scoped_resources.resource": resource.name},
        )
        if not ok:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)

    def acquire_started(self, resource: Resource[object]) -> None:
        self._waiters.add(1, {"resource": resource.name})

    def acquired(self, resource: Resource[object], seconds: float) -> None:
        attrs = {"resource": resource.name}
        self._waiters.add(-1, attrs)
        self._acquire.record(seconds, attrs)
        self._held[_in_use_gauge(resource)].add(1, attrs)
        self._span("acquire", resource, seconds, ok=True)

    def acquire_failed(self, resource: Resource[object], seconds: float, busy: bool) -> None:
        attrs = {"resource": resource.name}
        self._waiters.add(-1, attrs)
        self._acquire.record(seconds, attrs)
        if busy:
            self._timeouts.add(1, attrs)
        self._span("acquire", resource, seconds, ok=False)

    def released(self, resource: Resource[object], seconds: float, outcome: str) -> None:
        attrs = {"resource": resource.name}
        self._held[_in_use_gauge(resource)].add(-1, attrs)
        self._release.record(seconds, attrs)
        if outcome != "ok":
            self._failures.add(1, {"resource": resource.name, "outcome": outcome})
        self._span("release", resource, seconds, ok=outcome == "ok")

    def terminated(self, resource: Resource[object]) -> None:
        self._terminations.add(1, {"resource": resource.name})
