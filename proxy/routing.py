"""From a request's model name, `ttc` body object and the configured aliases to a route:
which backend, which model on it, and which strategy (if any) with which parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from strategies.framework import Strategy

from .config import ProxyConfig
from .errors import InvalidRequest

SLUG = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class StrategyChoice:
    strategy: type[Strategy]
    params: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    backend_name: str | None  # None: the first backend that serves `model`
    model: str  # the model name the backend is asked for
    strategy: StrategyChoice | None


def _valid_list(registry: Mapping[str, type[Strategy]]) -> str:
    return ", ".join(sorted(registry))


def parse_prefix_params(text: str, model_name: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidRequest(
                f"model {model_name!r}: strategy parameters are key=value pairs joined by ',' (got {pair!r})",
                param="model",
                code="invalid_strategy_params",
            )
        params[key.strip()] = value.strip()
    return params


def split_model_name(
    model_name: str, registry: Mapping[str, type[Strategy]]
) -> tuple[str | None, dict[str, str], str]:
    """`sc:n=16-smollm2` -> ("sc", {"n": "16"}, "smollm2"); a name with no strategy prefix -> (None, {}, name)."""
    head, dash, rest = model_name.partition("-")
    slug, colon, raw_params = head.partition(":")
    if slug in registry and SLUG.fullmatch(slug):
        if not dash or not rest:
            raise InvalidRequest(
                f"model {model_name!r} names strategy {slug!r} but no model after '-'",
                param="model",
                code="invalid_model",
            )
        return slug, (parse_prefix_params(raw_params, model_name) if colon else {}), rest
    if colon and dash:
        raise InvalidRequest(
            f"model {model_name!r} carries strategy parameters but {slug!r} is not a strategy; "
            f"valid strategies: {_valid_list(registry)}",
            param="model",
            code="unknown_strategy",
        )
    return None, {}, model_name


def resolve_route(
    model_name: str,
    ttc_object: Any,
    config: ProxyConfig,
    registry: Mapping[str, type[Strategy]],
) -> Route:
    backend_name: str | None = None
    alias = config.aliases.get(model_name)
    if alias is not None:
        slug, params, model = alias.strategy, dict(alias.params), alias.model
        backend_name = alias.backend
    else:
        slug, params, model = split_model_name(model_name, registry)
    budget: dict[str, Any] = {}

    if ttc_object is not None:
        if not isinstance(ttc_object, dict):
            raise InvalidRequest("'ttc' must be an object", param="ttc", code="invalid_type")
        unknown = set(ttc_object) - {"strategy", "params", "budget"}
        if unknown:
            raise InvalidRequest(
                f"'ttc' has unknown keys {sorted(unknown)}; allowed: strategy, params, budget",
                param="ttc",
                code="invalid_ttc",
            )
        body_slug = ttc_object.get("strategy")
        if body_slug is not None:
            if not isinstance(body_slug, str) or body_slug not in registry:
                raise InvalidRequest(
                    f"unknown strategy {body_slug!r} in 'ttc'; valid strategies: {_valid_list(registry)}",
                    param="ttc.strategy",
                    code="unknown_strategy",
                )
            if slug is not None and slug != body_slug:
                raise InvalidRequest(
                    f"model {model_name!r} selects strategy {slug!r} but 'ttc.strategy' is {body_slug!r}",
                    param="ttc.strategy",
                    code="conflicting_strategy",
                )
            slug = body_slug
        body_params = ttc_object.get("params", {})
        if not isinstance(body_params, dict):
            raise InvalidRequest("'ttc.params' must be an object", param="ttc.params", code="invalid_type")
        body_budget = ttc_object.get("budget", {})
        if not isinstance(body_budget, dict):
            raise InvalidRequest("'ttc.budget' must be an object", param="ttc.budget", code="invalid_type")
        if slug is None and (body_params or body_budget):
            raise InvalidRequest(
                f"'ttc' has params but names no strategy; valid strategies: {_valid_list(registry)}",
                param="ttc.strategy",
                code="unknown_strategy",
            )
        params.update(body_params)
        budget = body_budget

    if slug is None:
        return Route(backend_name, model, None)
    return Route(backend_name, model, StrategyChoice(registry[slug], params, budget))
