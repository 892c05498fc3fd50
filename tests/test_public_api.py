"""The public surface is small and pinned: a change to it is a decision."""

from __future__ import annotations

import scoped_resources
import scoped_resources.exceptions
import scoped_resources.fastapi


def test_top_level_names_are_pinned() -> None:
    """The package exports exactly these names."""
    assert sorted(scoped_resources.__all__) == [
        "AppScope",
        "Lease",
        "Resource",
        "Resources",
        "Scope",
        "Use",
    ]


def test_exception_names_are_pinned() -> None:
    """The exceptions module exports exactly these names, all ScopedResourcesError."""
    names = sorted(scoped_resources.exceptions.__all__)
    assert names == [
        "DependencyCycle",
        "MissingDependency",
        "PlanError",
        "ReleaseFailed",
        "ReleaseTimeout",
        "ResourceBusy",
        "ResourceMisuse",
        "ScopeClosed",
        "ScopeViolation",
        "ScopedResourcesError",
        "StartupFailed",
    ]
    for name in names:
        cls = getattr(scoped_resources.exceptions, name)
        assert issubclass(cls, scoped_resources.exceptions.ScopedResourcesError)
        assert cls.__doc__ is not None
        assert cls.__doc__.startswith("Raised when"), name


def test_fastapi_module_names_are_pinned() -> None:
    """The FastAPI integration exports exactly these names."""
    assert sorted(scoped_resources.fastapi.__all__) == [
        "Use",
        "health_routes",
        "lifespan",
        "outage_of",
        "problem_response",
        "run_to_completion",
    ]


def test_metrics_module_names_are_pinned() -> None:
    """The metrics module exports exactly these names."""
    import scoped_resources.metrics

    assert sorted(scoped_resources.metrics.__all__) == [
        "Observer",
        "OpenTelemetryMetrics",
        "PrometheusMetrics",
    ]


def test_page_module_names_are_pinned() -> None:
    """The resource page module exports exactly these names."""
    import scoped_resources.page

    assert sorted(scoped_resources.page.__all__) == ["resource_page"]


def test_every_exported_name_exists() -> None:
    """Every name in __all__ can be imported."""
    for module in (scoped_resources, scoped_resources.exceptions, scoped_resources.fastapi):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
