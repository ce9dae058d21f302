"""Checks made before a strategy runs (each a 400 naming what is wrong): parameters and their configured maxima,
a composition's depth and fan-out, the budget a request asks for, and what the backend must offer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from ttc_proxy.strategies.framework import (
    MAX_COMPOSITION_DEPTH,
    Sampling,
    Strategy,
    StrategyInputError,
    StrategyParams,
    StrategySpec,
)

from ..backends import Backend
from ..config import Budget, StrategySettings
from ..errors import InvalidRequest, NotFound


def strategy_of(slug: str, registry: Mapping[str, type[Strategy]]) -> type[Strategy]:
    strategy = registry.get(slug)
    if strategy is None:
        raise InvalidRequest(f"unknown strategy {slug!r}; valid strategies: {', '.join(sorted(registry))}",
                             param="ttc.strategy", code="unknown_strategy")
    return strategy


def check_params(strategy: type[Strategy], raw: Mapping[str, Any], settings: StrategySettings,
                 model: str | None = None) -> StrategyParams:
    """Validate a strategy's parameters (merged with the configured defaults, the model's calibrated ones over
    them) and their configured maxima."""
    merged = {**settings.defaults_for(strategy.slug, model), **raw}
    try:
        params = strategy.Params.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        valid = ", ".join(
            f"{name} ({info.description or info.annotation})" for name, info in strategy.Params.model_fields.items()
        )
        raise InvalidRequest(
            f"bad parameters for strategy {strategy.slug!r}: {problems}. Valid parameters: {valid}",
            param="ttc.params",
            code="invalid_strategy_params",
        ) from exc
    maxima = {"samples": settings.max_samples, "iterations": settings.max_iterations}
    for name, kind in strategy.Params.limits.items():
        value = getattr(params, name)
        if isinstance(value, int) and value > maxima[kind]:
            raise InvalidRequest(
                f"strategy {strategy.slug!r}: {name}={value} is above the configured maximum of {maxima[kind]} {kind}",
                param=f"ttc.params.{name}",
                code="strategy_param_above_maximum",
            )
    return params


def check_spec(spec: StrategySpec, registry: Mapping[str, type[Strategy]], settings: StrategySettings, *,
               depth: int = 0, fan_out: int = 1, model: str | None = None) -> list[tuple[type[Strategy], StrategyParams]]:
    """Every strategy of a composition, checked: known, valid parameters, able to run over the next one, at most
    MAX_COMPOSITION_DEPTH deep (counting the `depth` runs around it), and the product of fan-outs (with the
    `fan_out` of the runs around it) within strategies.max_samples. Outermost first."""
    checked = []
    chain = spec.chain()
    if depth + len(chain) > MAX_COMPOSITION_DEPTH:
        described = spec.describe()
        if len(described) > 200:  # not echoed whole: a request may nest thousands
            described = described[:200] + "..."
        raise InvalidRequest(
            f"'{described}' nests {depth + len(chain)} strategy runs; the limit is {MAX_COMPOSITION_DEPTH}",
            param="model", code="composition_too_deep")
    for i, level in enumerate(chain):
        strategy = strategy_of(level.slug, registry)
        params = check_params(strategy, level.params, settings, model)
        if level.over is not None and not strategy.composable:
            composable = ", ".join(sorted(s for s, c in registry.items() if c.composable))
            raise InvalidRequest(
                f"strategy {strategy.slug!r} cannot run over another strategy; these can: {composable}",
                param="model", code="not_composable")
        fan_out *= max(1, strategy.fan_out(params))
        if fan_out > settings.max_samples:
            raise InvalidRequest(
                f"'{spec.describe()}' would draw up to {fan_out} samples (the product of n, k and iterations x batch "
                f"along the composition); the limit is strategies.max_samples = {settings.max_samples}",
                param="model", code="composition_fan_out_too_large")
        checked.append((strategy, params))
    return checked


def check_budget(raw: Mapping[str, Any], ceiling: Budget) -> Budget:
    """A request may lower the configured budget, never raise it."""
    try:
        asked = Budget.model_validate({**ceiling.model_dump(), **raw})
    except ValidationError as exc:
        raise InvalidRequest(f"bad 'ttc.budget': {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}; "
                             f"keys: max_total_tokens, max_calls, max_seconds", param="ttc.budget") from exc
    return Budget(
        max_total_tokens=min(asked.max_total_tokens, ceiling.max_total_tokens),
        max_calls=min(asked.max_calls, ceiling.max_calls),
        max_seconds=min(asked.max_seconds, ceiling.max_seconds),
    )


def check_capabilities(strategy: type[Strategy], backend: Backend, params: StrategyParams) -> None:
    """The backend offers what the strategy needs with these parameters (checked before anything is sent)."""
    needed = strategy.requirements(params)
    missing = [c for c in sorted(needed) if not backend.capabilities.supports(c)]
    if missing:
        why = "; ".join(f"{c}: {needed[c]}" for c in missing if needed[c])
        raise InvalidRequest(
            f"strategy {strategy.slug!r} needs {', '.join(missing)}{f' ({why})' if why else ''}, which backend "
            f"{backend.name!r} ({backend.capabilities.kind}) does not offer; set its capabilities in config.yaml "
            f"if it does",
            param="ttc.params" if set(missing) - strategy.requires else "model",
            code="backend_capability_missing",
        )


def check_engine_fields(backend: Backend, fields: set[str], where: str = "the request") -> None:
    """Engine fields the backend is known not to take are a 400 naming them (before anything is sent)."""
    refused = backend.capabilities.refused_fields(fields)
    if refused:
        raise InvalidRequest(
            f"backend {backend.name!r} ({backend.capabilities.kind}) does not take {', '.join(refused)} "
            f"(sent with {where})", param=refused[0], code="backend_capability_missing")


def check_references(strategy: type[Strategy], params: StrategyParams, verifiers: Mapping[str, Any],
                     backend_for: Callable[[str], Backend], pivot_sets: Mapping[str, Any] | None = None) -> None:
    """The verifiers, models and pivot sets the parameters name exist (a 400 before anything is sent)."""
    named = strategy.references(params)
    for name in named.get("pivots", ()):
        if name not in (pivot_sets or {}):
            known = ", ".join(sorted(pivot_sets or {})) or "none configured"
            raise InvalidRequest(f"strategy {strategy.slug!r}: unknown pivot set {name!r}; configured pivot sets "
                                 f"(`pivots:` in config): {known}", param="ttc.params", code="unknown_pivots")
    for name in named.get("verifiers", ()):
        if name not in verifiers:
            known = ", ".join(sorted(verifiers)) or "none configured"
            raise InvalidRequest(f"strategy {strategy.slug!r}: unknown verifier {name!r}; configured verifiers: "
                                 f"{known}", param="ttc.params", code="unknown_verifier")
    for model in named.get("models", ()):
        try:
            backend_for(model)
        except NotFound as exc:  # a named model no backend serves; one that is down is a 503 as it is
            raise InvalidRequest(f"strategy {strategy.slug!r}: {exc.message}", param="ttc.params",
                                 code="model_not_found") from exc


def check_request_fits(checked: list[tuple[type[Strategy], StrategyParams]], sampling: Sampling) -> None:
    """Each strategy's own check of its parameters against the request (Strategy.check_request), before anything
    is sent."""
    for strategy, params in checked:
        try:
            strategy.check_request(params, sampling)
        except StrategyInputError as exc:
            raise InvalidRequest(f"strategy {strategy.slug!r}: {exc}", param="ttc.params",
                                 code="invalid_strategy_params") from exc
