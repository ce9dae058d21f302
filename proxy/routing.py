"""From a request's model name, `ttc` body object and the configured aliases to a route:
which backend, which model on it, and which strategy (if any) with which parameters, over which others.

Model-name grammar: `<spec>[><spec>...]-<model>` with `<spec>` = `<slug>[:<key>=<value>[,<key>=<value>...]]`,
e.g. `bon:n=4>cot-smollm2` (best-of-4 over runs of cot). The `ttc` object says the same as
`{"strategy": "bon", "params": {"n": 4}, "over": {"strategy": "cot", "params": {}}}`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ttc_proxy.strategies.framework import Strategy, StrategySpec

from .config import ProxyConfig
from .errors import InvalidRequest

SLUG = re.compile(r"[a-z0-9_]+")
_TTC_KEYS = ("strategy", "params", "over", "budget")


@dataclass(frozen=True)
class Route:
    backend_name: str | None  # None: the first backend that serves `model`
    model: str  # the model name the backend is asked for
    spec: StrategySpec | None = None
    budget: dict[str, Any] = field(default_factory=dict)


def _valid_list(registry: Mapping[str, type[Strategy]]) -> str:
    return ", ".join(sorted(registry))


def close_strategy(model_name: str, registry: Mapping[str, type[Strategy]]) -> tuple[str, str] | None:
    """(head, slug) when the head of a model name is close to a strategy slug (`deep-think-smollm2`: `deep-think`
    and `deepthink`; `mcst-smollm2`: `mcst` and `mcts`), else None. Every '-' may end the head, as a misspelt slug
    may hold one."""
    slugs = sorted(registry)
    for end in [i for i, ch in enumerate(model_name) if ch in "-:>"]:
        head = model_name[:end]
        if head in registry:
            return None
        close = difflib.get_close_matches(head.replace("-", ""), slugs, n=1, cutoff=0.75)
        if close:
            return head, close[0]
    return None


def did_you_mean(model_name: str, registry: Mapping[str, type[Strategy]]) -> str:
    """" `deep-think` is not a strategy; did you mean `deepthink`?" for a model name close to a strategy, else ""."""
    close = close_strategy(model_name, registry)
    return f" `{close[0]}` is not a strategy; did you mean `{close[1]}`?" if close else ""


def _suggestion(model_name: str, registry: Mapping[str, type[Strategy]]) -> str:
    close = close_strategy(model_name, registry)
    return f" did you mean `{close[1]}`?" if close else ""


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


def split_model_name(model_name: str, registry: Mapping[str, type[Strategy]]) -> tuple[StrategySpec | None, str]:
    """`bon:n=4>cot-smollm2` -> (StrategySpec bon over cot, "smollm2"); a name with no strategy prefix ->
    (None, name)."""
    head, dash, rest = model_name.partition("-")
    parts = head.split(">")
    slug, colon, _ = parts[0].partition(":")
    if not (slug in registry and SLUG.fullmatch(slug)):
        if (colon or len(parts) > 1) and dash:
            raise InvalidRequest(
                f"model {model_name!r} carries a strategy prefix but {slug!r} is not a strategy;"
                f"{_suggestion(model_name, registry)} valid strategies: {_valid_list(registry)}",
                param="model",
                code="unknown_strategy",
            )
        return None, model_name
    if not dash or not rest:
        raise InvalidRequest(f"model {model_name!r} names strategy {slug!r} but no model after '-'",
                             param="model", code="invalid_model")
    spec: StrategySpec | None = None
    for part in reversed(parts):
        part_slug, part_colon, raw_params = part.partition(":")
        if part_slug not in registry or not SLUG.fullmatch(part_slug):
            raise InvalidRequest(
                f"model {model_name!r}: {part_slug!r} is not a strategy; valid strategies: {_valid_list(registry)}",
                param="model", code="unknown_strategy")
        params = parse_prefix_params(raw_params, model_name) if part_colon else {}
        spec = StrategySpec(part_slug, params, spec)
    return spec, rest


def _spec_from_object(value: Any, where: str, registry: Mapping[str, type[Strategy]]) -> StrategySpec:
    """`{"strategy": ..., "params": {...}, "over": {...}}` (the `over` objects of `ttc`)."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=where, code="invalid_type")
    unknown = set(value) - {"strategy", "params", "over"}
    if unknown:
        raise InvalidRequest(f"'{where}' has unknown keys {sorted(unknown)}; allowed: strategy, params, over",
                             param=where, code="invalid_ttc")
    slug = value.get("strategy")
    if not isinstance(slug, str) or slug not in registry:
        raise InvalidRequest(f"unknown strategy {slug!r} in '{where}'; valid strategies: {_valid_list(registry)}",
                             param=f"{where}.strategy", code="unknown_strategy")
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise InvalidRequest(f"'{where}.params' must be an object", param=f"{where}.params", code="invalid_type")
    over = value.get("over")
    return StrategySpec(slug, params, _spec_from_object(over, f"{where}.over", registry) if over is not None else None)


def merge_specs(base: StrategySpec | None, extra: StrategySpec | None, where: str) -> StrategySpec | None:
    """The `ttc` object's composition over the model name's: strategies must agree level by level; params
    are merged (the object's win)."""
    if base is None or extra is None:
        return base or extra
    if base.slug != extra.slug:
        raise InvalidRequest(f"the model name runs {base.slug!r} here but '{where}' names {extra.slug!r}",
                             param=where, code="conflicting_strategy")
    return StrategySpec(base.slug, {**base.params, **extra.params}, merge_specs(base.over, extra.over, f"{where}.over"))


def resolve_route(
    model_name: str,
    ttc_object: Any,
    config: ProxyConfig,
    registry: Mapping[str, type[Strategy]],
) -> Route:
    backend_name: str | None = None
    alias = config.aliases.get(model_name)
    spec: StrategySpec | None
    if alias is not None:
        backend_name, model = alias.backend, alias.model
        spec = None
        if alias.strategy is not None:
            spec = _spec_from_object({"strategy": alias.strategy, "params": alias.params,
                                      **({"over": alias.over} if alias.over is not None else {})},
                                     f"aliases.{model_name}", registry)
    else:
        spec, model = split_model_name(model_name, registry)
    budget: dict[str, Any] = {}

    if ttc_object is not None:
        if not isinstance(ttc_object, dict):
            raise InvalidRequest("'ttc' must be an object", param="ttc", code="invalid_type")
        unknown = set(ttc_object) - set(_TTC_KEYS)
        if unknown:
            raise InvalidRequest(f"'ttc' has unknown keys {sorted(unknown)}; allowed: {', '.join(_TTC_KEYS)}",
                                 param="ttc", code="invalid_ttc")
        body_budget = ttc_object.get("budget", {})
        if not isinstance(body_budget, dict):
            raise InvalidRequest("'ttc.budget' must be an object", param="ttc.budget", code="invalid_type")
        body_slug = ttc_object.get("strategy")
        body_params = ttc_object.get("params", {})
        if not isinstance(body_params, dict):
            raise InvalidRequest("'ttc.params' must be an object", param="ttc.params", code="invalid_type")
        if body_slug is not None:
            if not isinstance(body_slug, str) or body_slug not in registry:
                raise InvalidRequest(
                    f"unknown strategy {body_slug!r} in 'ttc'; valid strategies: {_valid_list(registry)}",
                    param="ttc.strategy", code="unknown_strategy")
            if spec is not None and spec.slug != body_slug:
                raise InvalidRequest(
                    f"model {model_name!r} selects strategy {spec.slug!r} but 'ttc.strategy' is {body_slug!r}",
                    param="ttc.strategy", code="conflicting_strategy")
            if spec is None:
                spec = StrategySpec(body_slug)
        if spec is None and (body_params or body_budget or ttc_object.get("over") is not None):
            raise InvalidRequest(f"'ttc' has params but names no strategy; valid strategies: {_valid_list(registry)}",
                                 param="ttc.strategy", code="unknown_strategy")
        if spec is not None:
            over = ttc_object.get("over")
            spec = replace(spec, params={**spec.params, **body_params},
                           over=merge_specs(spec.over, _spec_from_object(over, "ttc.over", registry)
                                            if over is not None else None, "ttc.over"))
        budget = body_budget

    return Route(backend_name, model, spec, budget)
