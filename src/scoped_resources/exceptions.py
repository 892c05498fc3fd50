"""Every exception scoped-resources raises.

Each one says what failed, which resource, and what to do about it::

    ScopedResourcesError
    ├── PlanError                 the declarations cannot work (found at start-up)
    │   ├── DependencyCycle
    │   ├── MissingDependency
    │   ├── ScopeViolation
    │   └── ResourceMisuse
    ├── StartupFailed             an app resource could not be opened
    ├── ResourceBusy              an acquire ran past its deadline (HTTP 503)
    ├── ScopeClosed               a closed scope or a released resource was used
    ├── ReleaseTimeout            a release ran past its deadline and was terminated
    └── ReleaseFailed             one or more releases failed (an ExceptionGroup)

Errors raised by a resource's own code while it is acquired are passed through
unchanged, with a note naming the resource.
"""

from __future__ import annotations

__all__ = [
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


class ScopedResourcesError(Exception):
    """Raised when scoped-resources fails; the base of every error it defines."""


class PlanError(ScopedResourcesError):
    """Raised when the declared resources cannot work together.

    Found when the plan is compiled (at application start-up), never at the first
    request.
    """


class DependencyCycle(PlanError):
    """Raised when resources depend on each other in a cycle."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        path = " -> ".join(repr(n) for n in names)
        super().__init__(
            f"resources depend on each other in a cycle: {path}; "
            "break the cycle by removing one of these parameters"
        )


class MissingDependency(PlanError):
    """Raised when a resource (or route) asks for something nothing provides."""

    def __init__(self, resource: str, parameter: str, wanted: str, hint: str) -> None:
        self.resource = resource
        self.parameter = parameter
        self.wanted = wanted
        super().__init__(
            f"resource {resource!r} needs {wanted} for its parameter {parameter!r}, "
            f"but nothing provides it; {hint}"
        )


class ScopeViolation(PlanError):
    """Raised when a longer-lived resource depends on a shorter-lived one.

    An app-scoped resource cannot use a request-scoped one: the request's instance
    would be released while the app's one still holds it.
    """

    def __init__(self, resource: str, scope: str, dependency: str, dep_scope: str) -> None:
        self.resource = resource
        self.dependency = dependency
        super().__init__(
            f"{scope}-scoped resource {resource!r} depends on {dep_scope}-scoped "
            f"resource {dependency!r}, which is released before it; declare "
            f"{dependency!r} with a scope at least as long, or {resource!r} with a "
            "shorter one"
        )


class ResourceMisuse(PlanError):
    """Raised when a resource is declared or used in a way that cannot be safe.

    For example: a non-shareable resource (a connection, a transaction, a file)
    declared app-scoped, a sync route asking for an async-only resource, or a
    factory that hands back an un-awaited coroutine.
    """

    def __init__(self, resource: str, problem: str, fix: str) -> None:
        self.resource = resource
        super().__init__(f"resource {resource!r}: {problem}; {fix}")


class StartupFailed(ScopedResourcesError):
    """Raised when an app-scoped resource could not be opened.

    The resources opened before it have been closed again, in reverse order.
    ``__cause__`` holds the original error.
    """

    def __init__(self, resource: str, reason: str) -> None:
        self.resource = resource
        super().__init__(f"could not open app resource {resource!r}: {reason}")


class ResourceBusy(ScopedResourcesError):
    """Raised when acquiring a resource takes longer than its deadline.

    Also raised at once, before the deadline, when a pooled adapter predicts that
    the wait cannot end in time (``expected_wait`` then holds that prediction, in
    seconds). The FastAPI integration answers 503 with a ``Retry-After`` header
    of ``retry_after`` seconds.
    """

    def __init__(
        self,
        resource: str,
        waited: float,
        retry_after: float = 1.0,
        *,
        expected_wait: float | None = None,
    ) -> None:
        self.resource = resource
        self.waited = waited
        self.retry_after = retry_after
        self.expected_wait = expected_wait
        if expected_wait is None:
            message = (
                f"resource {resource!r} could not be acquired within {waited:g} s; "
                "it is exhausted or slow: retry later, or raise its acquire_timeout "
                "or its pool size"
            )
        else:
            message = (
                f"resource {resource!r} refused after {waited:g} s: its pool is "
                f"exhausted and the expected wait ({expected_wait:.3g} s) exceeds the "
                f"time left; retry after {retry_after:g} s, or raise its pool size"
            )
        super().__init__(message)


class ScopeClosed(ScopedResourcesError, RuntimeError):
    """Raised when a closed (or not yet open) scope is asked for a resource."""

    def __init__(self, scope: str, state: str, resource: str | None = None) -> None:
        self.scope = scope
        self.resource = resource
        what = f"resource {resource!r} from " if resource else ""
        super().__init__(
            f"cannot get {what}scope {scope!r}: it is {state}; resources live only "
            "while their scope is open (declare the resource with "
            "release='after_response' to use it in background tasks or streaming)"
        )


class ReleaseTimeout(ScopedResourcesError):
    """Raised when a release overran its deadline (found inside :class:`ReleaseFailed`).

    The release was cancelled and the resource's terminate hook ran.
    """

    def __init__(self, resource: str, timeout: float, terminated: bool) -> None:
        self.resource = resource
        self.timeout = timeout
        self.terminated = terminated
        then = (
            "its terminate hook ran"
            if terminated
            else "it has no terminate hook; give it one to hard-close it"
        )
        super().__init__(
            f"releasing resource {resource!r} took longer than {timeout:g} s and was "
            f"cancelled; {then}"
        )


class ReleaseFailed(ExceptionGroup[Exception], ScopedResourcesError):
    """Raised when one or more releases of a scope failed.

    Every release was attempted; the group holds each failure, and each carries a
    note naming its resource. For an HTTP request the client gets a 5xx answer.
    """

    def __new__(cls, scope: str, errors: list[Exception]) -> ReleaseFailed:
        names = ", ".join(repr(n) for n in _resource_names(errors))
        msg = f"releasing scope {scope!r} failed for {names}"
        return super().__new__(cls, msg, errors)

    def __init__(self, scope: str, errors: list[Exception]) -> None:
        names = ", ".join(repr(n) for n in _resource_names(errors))
        super().__init__(f"releasing scope {scope!r} failed for {names}", errors)
        self.scope = scope

    def derive(self, excs: list[Exception]) -> ReleaseFailed:  # type: ignore[override]
        return ReleaseFailed(self.scope, list(excs))


def _resource_names(errors: list[Exception]) -> list[str]:
    names: list[str] = []
    for err in errors:
        name = getattr(err, "__scoped_resource__", None) or "?"
        if name not in names:
            names.append(name)
    return names
