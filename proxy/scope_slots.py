"""Per-request objects a middleware keeps in the ASGI scope's `state`, for handlers further in to add to.

A handler reached without the middleware (a test app, a sub-application) gets a detached object of its own,
so it never needs to know whether the middleware is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from starlette.types import Scope

T = TypeVar("T")


def scope_slot(scope: Scope, key: str, factory: Callable[[], T]) -> T:
    """The object under `key` in the request's state, made by `factory` the first time it is asked for."""
    state = scope.setdefault("state", {})
    value = state.get(key)
    if value is None:
        value = state[key] = factory()
    return value
