"""The strategies a proxy serves: the built-in ones, and third-party plugins installed with pip.

A plugin is a Strategy subclass named in the entry-point group `ttc_proxy.strategies` of any installed
distribution, e.g. in its pyproject.toml:

    [project.entry-points."ttc_proxy.strategies"]
    my_strategy = "my_package.module:MyStrategy"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType

from ttc_proxy.strategies import BUILTIN_STRATEGIES
from ttc_proxy.strategies.framework import Strategy

from .routing import SLUG

log = logging.getLogger("ttc_proxy.registry")

ENTRY_POINT_GROUP = "ttc_proxy.strategies"


class PluginError(Exception):
    """An installed strategy plugin cannot be used (it does not load, is not a Strategy, or clashes)."""


def load_registry(group: str = ENTRY_POINT_GROUP) -> tuple[Mapping[str, type[Strategy]], list[str]]:
    """Built-in strategies plus every plugin that loads; returns the registry and a line per plugin that did not
    (logged, so one broken plugin does not take the proxy down)."""
    registry: dict[str, type[Strategy]] = dict(BUILTIN_STRATEGIES)
    problems: list[str] = []
    for entry in entry_points(group=group):
        try:
            strategy = _load(entry, registry)
        except PluginError as exc:
            problems.append(str(exc))
            log.error("strategy plugin skipped: %s", exc)
            continue
        registry[strategy.slug] = strategy
        log.info("strategy plugin %r loaded from %s", strategy.slug, entry.value)
    return MappingProxyType(registry), problems


def _load(entry: object, registry: Mapping[str, type[Strategy]]) -> type[Strategy]:
    name = getattr(entry, "name", "?")
    value = getattr(entry, "value", "?")
    try:
        strategy = entry.load()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - any import failure of third-party code
        raise PluginError(f"{name} ({value}) does not load: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
        raise PluginError(f"{name} ({value}) is not a Strategy subclass")
    slug = getattr(strategy, "slug", None)
    if not isinstance(slug, str) or not SLUG.fullmatch(slug):
        raise PluginError(f"{name} ({value}): slug {slug!r} must match [a-z0-9_]+")
    if slug in registry:
        raise PluginError(f"{name} ({value}): slug {slug!r} is already taken by {registry[slug].__module__}")
    return strategy
