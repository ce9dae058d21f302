"""`ttc-proxy eval`: accuracy, tokens, backend calls and latency of model strings on a task file.

Each model string (`smollm2`, `sc:n=8-smollm2`, ...) answers every task through the proxy, with the official
OpenAI SDK. The proxy is either one already running (`--proxy URL`) or one this command starts in-process
(uvicorn in a background thread, with `--config FILE`, `--backend URL` or the default config: the embedded
local engine).

Pieces, each small: task loading and answer checking; the async runner; statistics; rendering and output files.

Task file: JSON Lines, one object a line:
    {"id": "t1", "question": "What is 6 times 7?", "answer": "42", "check": "number"}
`messages` (an OpenAI chat message list) may replace `question`. Checks:
    number  the last number in the reply equals `answer` numerically ("1,000" == "1000", "56.0" == "56")
    exact   normalised equality (surrounding whitespace, case, runs of spaces, trailing punctuation ignored)
    regex   `answer` is a Python regular expression searched for in the reply (use (?i) to ignore case)
    boxed   the content of the last \\boxed{...} (balanced braces): compared like `number` when `answer` is a
            number (the last number in the box), else like `exact`
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

from .argtypes import positive_float, positive_int

log = logging.getLogger("ttc_proxy.eval")

DEFAULT_OUT = Path("eval-results")
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
ACCURACY_METHOD = "accuracy = correct / tasks (a failed request counts as wrong), 95% Wilson score interval"
DIFF_METHOD = ("paired per-task difference d_i = correct(model) - correct(baseline) on the same tasks, "
               "mean ± 1.96·sd/√n (normal approximation)")


class EvalError(Exception):
    """The evaluation cannot run: a bad task file or option, or a proxy that did not start."""


# ---------------------------------------------------------------------------------------------------------------
# Tasks and checks


@dataclass(frozen=True)
class Task:
    id: str
    messages: list[dict[str, Any]]
    answer: str
    check: str


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # what was compared with the answer; None when nothing could be extracted


_NUMBER = re.compile(r"(?<!\d)[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)[-−]?\.\d+")
_BOXED = re.compile(r"\\boxed\s*\{")
_TRAILING_PUNCTUATION = ".,;:!?。"


def parse_number(text: str) -> Decimal | None:
    """'1,000' -> 1000, '56.0' -> 56.0, '−3' -> -3; None unless the whole (stripped) text is a finite number."""
    cleaned = text.strip().replace(",", "").replace("−", "-")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands separators allowed, a minus sign not glued to a digit)."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def numbers_equal(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def normalise_exact(text: str) -> str:
    """Strip, lowercase, collapse runs of whitespace, drop trailing punctuation."""
    return " ".join(text.split()).lower().rstrip(_TRAILING_PUNCTUATION).rstrip()


def boxed_content(text: str) -> str | None:
    """The content of the last complete \\boxed{...}, nested braces balanced (a truncated last box is skipped)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end():i]
    return None


def check_number(reply: str, answer: str) -> Verdict:
    number = last_number(reply)
    return Verdict(number is not None and numbers_equal(number, answer), number)


def check_exact(reply: str, answer: str) -> Verdict:
    extracted = normalise_exact(reply)
    return Verdict(extracted == normalise_exact(answer), extracted)


def check_regex(reply: str, answer: str) -> Verdict:
    match = re.search(answer, reply)
    return Verdict(match is not None, match.group(0) if match else None)


def check_boxed(reply: str, answer: str) -> Verdict:
    content = boxed_content(reply)
    if content is None:
        return Verdict(False, None)
    if parse_number(answer) is not None:
        return Verdict(check_number(content, answer).correct, content)
    return Verdict(normalise_exact(content) == normalise_exact(answer), content)


CHECKS: dict[str, Callable[[str, str], Verdict]] = {
    "number": check_number,
    "exact": check_exact,
    "regex": check_regex,
    "boxed": check_boxed,
}


def check_reply(task: Task, reply: str) -> Verdict:
    return CHECKS[task.check](reply, task.answer)


def parse_task(raw: Any, where: str) -> Task:
    if not isinstance(raw, dict):
        raise EvalError(f"{where}: a task must be a JSON object")
    task_id = raw.get("id")
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool) or str(task_id) == "":
        raise EvalError(f"{where}: `id` must be a non-empty string or integer")
    if "question" in raw and "messages" in raw:
        raise EvalError(f"{where}: give `question` or `messages`, not both")
    if isinstance(raw.get("question"), str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": raw["question"]}]
    elif isinstance(raw.get("messages"), list) and raw["messages"] and all(isinstance(m, dict) for m in raw["messages"]):
        messages = raw["messages"]
    else:
        raise EvalError(f"{where}: needs `question` (a string) or `messages` (a non-empty list of objects)")
    answer = raw.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise EvalError(f"{where}: `answer` must be a string or a number")
    check = raw.get("check")
    if check not in CHECKS:
        raise EvalError(f"{where}: `check` must be one of {', '.join(CHECKS)}, got {check!r}")
    answer_text = str(answer)
    if check == "number" and parse_number(answer_text) is None:
        raise EvalError(f"{where}: check `number` needs a numeric answer, got {answer_text!r}")
    if check == "regex":
        try:
            re.compile(answer_text)
        except re.error as exc:
            raise EvalError(f"{where}: `answer` is not a valid regular expression: {exc}") from exc
    return Task(str(task_id), messages, answer_text, check)


def load_tasks(path: str | Path, limit: int | None = None) -> list[Task]:
    """The tasks of a JSON Lines file (blank lines skipped), the first `limit` of them when given."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"cannot read the task file: {exc}") from exc
    tasks: list[Task] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if limit is not None and len(tasks) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise EvalError(f"{where}: not valid JSON: {exc}") from exc
        task = parse_task(raw, where)
        if task.id in seen:
            raise EvalError(f"{where}: duplicate task id {task.id!r}")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise EvalError(f"{path}: no tasks")
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# The runner


@dataclass(frozen=True)
class RunSettings:
    max_tokens: int = 48
    temperature: float | None = None
    seed: int | None = None  # task i (0-based, in file order) is sent with seed + i, for every model string
    timeout: float = 300.0
    concurrency: int = 4
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """One task answered (or not) by one model string."""

    id: str
    model: str
    correct: bool
    reply: str | None
    extracted: str | None
    usage: dict[str, Any] | None
    backend_calls: int | None
    latency_ms: float
    error: str | None = None
    seed: int | None = None
    ttc: dict[str, Any] | None = None

    @property
    def answered(self) -> bool:
        return self.error is None

    def tokens(self, kind: str) -> int | None:
        value = (self.usage or {}).get(kind)
        return value if isinstance(value, int) else None


def describe_error(exc: BaseException, timeout: float) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        text = f"HTTP {exc.status_code}: {message or exc.message}"
    elif isinstance(exc, openai.APIConnectionError):
        text = f"connection error: {exc.__cause__ or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def request_kwargs(model: str, task: Task, index: int, settings: RunSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": model, "messages": task.messages, "max_tokens": settings.max_tokens}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    if settings.seed is not None:
        kwargs["seed"] = settings.seed + index
    if settings.extra_body:
        kwargs["extra_body"] = dict(settings.extra_body)
    return kwargs


def record_from_response(model: str, task: Task, body: Mapping[str, Any], latency_ms: float,
                         seed: int | None) -> Record:
    choices = body.get("choices") or []
    if not choices:
        return Record(task.id, model, False, None, None, body.get("usage"), None, latency_ms,
                      error="the response has no choices", seed=seed)
    reply = (choices[0].get("message") or {}).get("content") or ""
    verdict = check_reply(task, reply)
    ttc = body.get("ttc") if isinstance(body.get("ttc"), dict) else None
    calls = ttc.get("backend_calls") if ttc is not None else 1  # a pass-through request is one backend call
    return Record(task.id, model, verdict.correct, reply, verdict.extracted, body.get("usage"),
                  calls if isinstance(calls, int) else None, latency_ms, seed=seed, ttc=ttc)


async def ask(client: Any, model: str, task: Task, index: int, settings: RunSettings) -> Record:
    """One request; any failure becomes the record's `error`, never an exception."""
    kwargs = request_kwargs(model, task, index, settings)
    seed = kwargs.get("seed")
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(**kwargs)
        body = response.model_dump()
        latency_ms = (time.perf_counter() - started) * 1000.0
        return record_from_response(model, task, body, latency_ms, seed)
    except Exception as exc:  # noqa: BLE001 - one failed request is that task's error, not the run's
        latency_ms = (time.perf_counter() - started) * 1000.0
        return Record(task.id, model, False, None, None, None, None, latency_ms,
                      error=describe_error(exc, settings.timeout), seed=seed)


class Progress:
    """One line on stderr, redrawn with \\r: a bar, done/total, errors, elapsed seconds, the current model."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True,
                 min_interval: float | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        if min_interval is None:  # a terminal redraws cheaply; a log file keeps every redraw
            min_interval = 0.1 if getattr(self.stream, "isatty", lambda: False)() else 5.0
        self.min_interval = min_interval
        self.done = 0
        self.errors = 0
        self.label = ""
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def line(self) -> str:
        filled = int(24 * self.done / self.total) if self.total else 24
        return (f"eval [{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total}  errors {self.errors}  "
                f"{time.monotonic() - self.started:.1f} s  {self.label}")

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < self.min_interval):
            return
        self._last_draw = now
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def start(self, label: str) -> None:
        self.label = label
        self.draw(force=True)

    def advance(self, record: Record) -> None:
        self.done += 1
        self.errors += 0 if record.answered else 1
        self.draw(force=self.done == self.total)

    def close(self) -> None:
        if self.enabled:
            self.draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


async def run_model(client: Any, model: str, tasks: Sequence[Task], settings: RunSettings,
                    progress: Progress) -> list[Record]:
    """Every task for one model string, at most `concurrency` requests in flight; records in task order."""
    gate = asyncio.Semaphore(settings.concurrency)
    progress.start(model)

    async def one(index: int, task: Task) -> Record:
        async with gate:
            record = await ask(client, model, task, index, settings)
        progress.advance(record)
        return record

    return list(await asyncio.gather(*(one(i, task) for i, task in enumerate(tasks))))


async def run_eval(base_url: str, api_key: str, models: Sequence[str], tasks: Sequence[Task],
                   settings: RunSettings, progress: Progress) -> dict[str, list[Record]]:
    """The model strings one after another (so each one's latency is measured under its own load only)."""
    import openai

    results: dict[str, list[Record]] = {}
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                  timeout=settings.timeout) as client:
        for model in models:
            results[model] = await run_model(client, model, tasks, settings, progress)
    return results


async def run_pooled(base_url: str, api_key: str, models: Sequence[str], tasks: Sequence[Task],
                     settings: RunSettings, pool_size: int, progress: Progress) -> dict[str, list[Record]]:
    """Strategy model strings scored on one pool of samples per task (see proxy/pooled.py).

    Also reports the pool's oracle at each strategy sample count: how often some sample of the first k is right.
    """
    import aiohttp

    from strategies.framework import Sampling

    from .backends import new_client_session
    from .config import StrategySettings
    from .pooled import Pool, PooledScorer, parse_strategy_string

    parsed = {m: parse_strategy_string(m) for m in models}
    plain = [m for m, p in parsed.items() if p is None]
    if plain:
        raise EvalError(f"--pool scores strategy model strings only; {plain} name no strategy")
    strategy_settings = StrategySettings(default_max_tokens=settings.max_tokens, max_samples=max(64, pool_size))
    sampling = Sampling(settings.temperature, None, settings.max_tokens, None, None, dict(settings.extra_body))
    sizes = sorted({int(p[1].get("n", 8)) for p in parsed.values() if p is not None and p[1].get("n", "8").isdigit()})
    oracles = {f"oracle@{k} (some sample of {k} right)": k for k in sizes if k <= pool_size}
    results: dict[str, list[Record | None]] = {m: [None] * len(tasks) for m in [*models, *oracles]}

    async def one_task(index: int, task: Task, scorer: PooledScorer) -> None:
        seed = (settings.seed or 0) + index
        pools: dict[str, Pool | Exception] = {}  # a failed draw is every model string's error on this task
        for model, (strategy, params, base) in ((m, p) for m, p in parsed.items() if p is not None):
            started = time.perf_counter()
            try:
                if base not in pools:
                    try:
                        pools[base] = await scorer.draw(base, task.messages, pool_size, seed)
                    except Exception as exc:  # noqa: BLE001 - kept, so no later model string draws another pool
                        pools[base] = exc
                pool = pools[base]
                if isinstance(pool, Exception):
                    raise pool
                outcome = await scorer.score(strategy, params, base, task.messages, pool, seed)
            except Exception as exc:  # noqa: BLE001 - a failed pool is that task's error, not the run's
                record = Record(task.id, model, False, None, None, None, None,
                                (time.perf_counter() - started) * 1000, error=f"{type(exc).__name__}: {exc}",
                                seed=seed)
            else:
                verdict = check_reply(task, outcome.reply) if outcome.reply is not None else None
                record = Record(task.id, model, bool(verdict and verdict.correct), outcome.reply,
                                verdict.extracted if verdict else None, outcome.usage, outcome.calls,
                                outcome.latency_ms, error=outcome.error, seed=seed,
                                ttc={"details": outcome.details, "pooled": True})
            results[model][index] = record
            progress.advance(record)
        for label, k in oracles.items():
            pool = next((p for p in pools.values() if isinstance(p, Pool)), None)
            if pool is None:
                continue
            sample = pool.candidates[:k]
            right = [c for c in sample if check_reply(task, c.text).correct]
            usage = {"prompt_tokens": round(pool.prompt_tokens_per_sample * k),
                     "completion_tokens": sum(c.completion_tokens for c in sample)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            results[label][index] = Record(task.id, label, bool(right), (right or sample)[0].text, None, usage, k,
                                           0.0, seed=seed)

    async with new_client_session(timeout=aiohttp.ClientTimeout(total=settings.timeout)) as client:
        scorer = PooledScorer(base_url, api_key, client, strategy_settings, sampling)
        gate = asyncio.Semaphore(settings.concurrency)

        async def bounded(index: int, task: Task) -> None:
            async with gate:
                await one_task(index, task, scorer)

        progress.start(f"pool of {pool_size}")
        await asyncio.gather(*(bounded(i, t) for i, t in enumerate(tasks)))
    return {m: [r for r in records if r is not None] for m, records in results.items()}


# ---------------------------------------------------------------------------------------------------------------
# The proxy to evaluate through


class InProcessProxy:
    """create_app(config) under uvicorn in a background thread, on a free 127.0.0.1 port."""

    def __init__(self, config: Any, log_level: str = "warning") -> None:
        import uvicorn

        from .app import create_app

        self.config = config
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        level = log_level.lower() if log_level.lower() in uvicorn.config.LOG_LEVELS else "warning"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level=level, access_log=False))
        self.thread = threading.Thread(target=self._serve, daemon=True, name="eval-proxy")

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except SystemExit:  # uvicorn's way out when the app's startup (e.g. its engine) fails; logged already
            pass

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def startup_seconds(self) -> float:
        engines = [b.embedded.startup_timeout for b in self.config.backends if b.embedded is not None]
        return max(engines, default=0.0) + 60.0

    def __enter__(self) -> "InProcessProxy":
        self.thread.start()
        deadline = time.monotonic() + self.startup_seconds()
        while not self.server.started:
            if not self.thread.is_alive():
                self.socket.close()
                raise EvalError("the in-process proxy did not start (see the log above)")
            if time.monotonic() > deadline:
                self.__exit__()
                raise EvalError("the in-process proxy did not start in time")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.close()


def proxy_base_url(url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> the SDK's base URL (ending in /v1)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@contextmanager
def proxy_endpoint(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of the proxy to evaluate through: --proxy, else one started in-process."""
    if args.proxy:
        yield proxy_base_url(args.proxy), args.api_key or "unused"
        return
    from .cli import resolve_config
    from .config import ConfigError

    try:
        config = resolve_config(args.config, args.backend)
    except ConfigError as exc:
        raise EvalError(str(exc)) from exc
    key = args.api_key or next(iter(sorted(config.server.accepted_keys())), "unused")
    print("eval: starting the proxy in-process" + (" (and its embedded engine)" if any(
        b.embedded is not None for b in config.backends) else ""), file=sys.stderr, flush=True)
    with InProcessProxy(config, args.log_level) as server:
        yield server.base_url, key


# ---------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval for a binomial proportion; (nan, nan, nan) when n is 0."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(model: Sequence[bool], baseline: Sequence[bool], z: float = Z95) -> Interval:
    """Mean of d_i = model_i - baseline_i with mean ± z·sd/√n (sd with n - 1); nan bounds when n < 2."""
    if len(model) != len(baseline):
        raise ValueError("paired samples must have the same length")
    n = len(model)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    diffs = [int(a) - int(b) for a, b in zip(model, baseline)]
    mean = sum(diffs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _mean(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class Summary:
    model: str
    tasks: int
    answered: int
    errors: int
    correct: int
    accuracy: Interval
    diff_vs_baseline: Interval | None  # None for the baseline itself
    mean_prompt_tokens: float | None  # per answered task
    mean_completion_tokens: float | None
    mean_total_tokens: float | None
    mean_backend_calls: float | None
    latency_p50_ms: float | None  # over answered requests
    latency_p95_ms: float | None


def summarise(model: str, records: Sequence[Record], baseline: Sequence[Record] | None) -> Summary:
    """One model string's row; `baseline` is the baseline's records (None when this is the baseline)."""
    answered = [r for r in records if r.answered]
    correct = sum(r.correct for r in records)
    diff = None
    if baseline is not None:
        base_by_id = {r.id: r.correct for r in baseline}
        pairs = [(r.correct, base_by_id[r.id]) for r in records if r.id in base_by_id]
        diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    latencies = [r.latency_ms for r in answered]
    return Summary(
        model=model,
        tasks=len(records),
        answered=len(answered),
        errors=len(records) - len(answered),
        correct=correct,
        accuracy=wilson_interval(correct, len(records)),
        diff_vs_baseline=diff,
        mean_prompt_tokens=_mean([r.tokens("prompt_tokens") for r in answered]),
        mean_completion_tokens=_mean([r.tokens("completion_tokens") for r in answered]),
        mean_total_tokens=_mean([r.tokens("total_tokens") for r in answered]),
        mean_backend_calls=_mean([r.backend_calls for r in answered]),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
    )


def summarise_all(results: Mapping[str, Sequence[Record]], baseline: str) -> list[Summary]:
    return [summarise(model, records, None if model == baseline else results[baseline])
            for model, records in results.items()]


# ---------------------------------------------------------------------------------------------------------------
# Rendering and output files


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pct(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"


def render_table(summaries: Sequence[Summary], baseline: str) -> str:
    headers = ["model", "tasks", "accuracy %", "95% CI", "Δ vs baseline (pp)", "95% CI", "prompt tok",
               "compl tok", "calls", "p50 ms", "p95 ms", "errors"]
    rows = []
    for s in summaries:
        diff = s.diff_vs_baseline
        rows.append([
            s.model, str(s.tasks), _pct(s.accuracy.estimate), f"[{_pct(s.accuracy.low)}, {_pct(s.accuracy.high)}]",
            "(baseline)" if diff is None else _pct(diff.estimate, signed=True),
            "" if diff is None else f"[{_pct(diff.low, True)}, {_pct(diff.high, True)}]",
            _num(s.mean_prompt_tokens), _num(s.mean_completion_tokens), _num(s.mean_backend_calls, 2),
            _num(s.latency_p50_ms, 0), _num(s.latency_p95_ms, 0), str(s.errors),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [
        ACCURACY_METHOD,
        f"Δ vs baseline {baseline}: {DIFF_METHOD}, in percentage points",
        "tokens (from `usage`) and calls (`ttc.backend_calls`, 1 for pass-through) are means per answered task; "
        "latency percentiles over answered requests",
        "",
        fmt(headers),
        fmt(["-" * w for w in widths]),
        *(fmt(r) for r in rows),
    ]
    return "\n".join(lines)


def _clean(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 6)


def summary_row(s: Summary, baseline: str) -> dict[str, Any]:
    diff = s.diff_vs_baseline
    return {
        "model": s.model, "tasks": s.tasks, "answered": s.answered, "errors": s.errors, "correct": s.correct,
        "accuracy": _clean(s.accuracy.estimate), "accuracy_low": _clean(s.accuracy.low),
        "accuracy_high": _clean(s.accuracy.high), "baseline": baseline,
        "diff_vs_baseline": None if diff is None else _clean(diff.estimate),
        "diff_low": None if diff is None else _clean(diff.low),
        "diff_high": None if diff is None else _clean(diff.high),
        "mean_prompt_tokens": _clean(s.mean_prompt_tokens), "mean_completion_tokens": _clean(s.mean_completion_tokens),
        "mean_total_tokens": _clean(s.mean_total_tokens), "mean_backend_calls": _clean(s.mean_backend_calls),
        "latency_p50_ms": _clean(s.latency_p50_ms), "latency_p95_ms": _clean(s.latency_p95_ms),
    }


def write_json(path: Path, meta: Mapping[str, Any], summaries: Sequence[Summary], baseline: str,
               results: Mapping[str, Sequence[Record]]) -> None:
    document = {
        "meta": dict(meta),
        "summary": [summary_row(s, baseline) for s in summaries],
        "records": [asdict(r) for records in results.values() for r in records],
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: Path, summaries: Sequence[Summary], baseline: str) -> None:
    rows = [summary_row(s, baseline) for s in summaries]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def write_plot(path: Path, summaries: Sequence[Summary], title: str) -> bool:
    """Accuracy (Wilson bars) against mean total tokens per task; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [s for s in summaries if s.mean_total_tokens is not None and not math.isnan(s.accuracy.estimate)]
    figure, axes = plt.subplots(figsize=(11, 5.5))
    colours = plt.get_cmap("tab20").colors
    # Model strings are long and points crowd: each point carries a number, the legend beside the plot its name.
    for number, s in enumerate(points, start=1):
        y = s.accuracy.estimate * 100
        error = [[y - s.accuracy.low * 100], [s.accuracy.high * 100 - y]]
        axes.errorbar([s.mean_total_tokens], [y], yerr=error, fmt="o", capsize=3, alpha=0.8,
                      color=colours[(number - 1) % len(colours)], label=f"{number}. {s.model}")
        axes.annotate(str(number), (s.mean_total_tokens, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if points:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    tokens = [s.mean_total_tokens for s in points if s.mean_total_tokens]
    if tokens and max(tokens) / min(tokens) >= 10:
        axes.set_xscale("log")
    axes.set_xlabel("mean total tokens per task (prompt + completion)")
    axes.set_ylabel("accuracy % (95% Wilson interval)")
    axes.set_ylim(0, 100)
    axes.margins(x=0.2)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "eval", help="accuracy, tokens, calls and latency of model strings on a task file",
        description="Runs every task of a JSONL task file against each model string through the proxy (one "
                    "already running with --proxy, else one started in-process) and prints, per model string, "
                    "accuracy with a 95% Wilson interval, mean tokens and backend calls per task, latency and "
                    "errors, plus the paired accuracy difference against a baseline model string. Writes "
                    "results.json (every request), summary.csv and accuracy_vs_tokens.png to --out.",
    )
    parser.add_argument("tasks", help="JSONL task file: id, question or messages, answer, check "
                                      "(number | exact | regex | boxed)")
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                        help="model strings to compare, e.g. smollm2 sc:n=8-smollm2 'bon:n=8-smollm2'")
    parser.add_argument("--baseline", help="the model string the others are compared with (default: the first)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--proxy", metavar="URL", help="a running proxy, e.g. http://127.0.0.1:8000 "
                                                      "(default: start one in-process)")
    where.add_argument("--config", help="in-process proxy: config file (default: ./config.yaml if present, "
                                        "else the embedded local engine)")
    parser.add_argument("--backend", metavar="URL", help="in-process proxy: an OpenAI-compatible engine's base URL")
    parser.add_argument("--api-key", help="the proxy's API key (default: the in-process config's first key, "
                                          "else 'unused')")
    parser.add_argument("--max-tokens", type=positive_int, default=48, help="max_tokens per request (default 48)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: not sent)")
    parser.add_argument("--seed", type=int, help="task i (0-based, file order) is sent with seed SEED+i, the same "
                                                 "for every model string (default: no seed)")
    parser.add_argument("--limit", type=positive_int, help="only the first N tasks")
    parser.add_argument("--concurrency", type=positive_int, default=4,
                        help="requests in flight at once (default 4); model strings run one after another")
    parser.add_argument("--timeout", type=positive_float, default=300.0,
                        help="seconds per request before it counts as an error (default 300)")
    parser.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                        help="a JSON object merged into every request body, e.g. '{\"top_k\": 20}'")
    parser.add_argument("--pool", type=positive_int, metavar="N",
                        help="score strategy model strings on one pool of N samples per task (seeded, with "
                             "logprobs), so every strategy sees the same samples; plain model strings run live")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=eval_command)
    return parser


async def run_all(base_url: str, api_key: str, models: Sequence[str], tasks: Sequence[Task], settings: RunSettings,
                  progress: Progress, pool_size: int | None) -> dict[str, list[Record]]:
    """Live model strings, then (with a pool) the strategy model strings scored on the pool."""
    from .pooled import parse_strategy_string

    pooled = [m for m in models if pool_size is not None and parse_strategy_string(m) is not None]
    live = [m for m in models if m not in pooled]
    try:
        results = await run_eval(base_url, api_key, live, tasks, settings, progress) if live else {}
        if pooled and pool_size is not None:
            results.update(await run_pooled(base_url, api_key, pooled, tasks, settings, pool_size, progress))
    finally:
        progress.close()
    return results


def eval_command(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 every request failed, 2 bad input or no proxy, 130 interrupted."""
    models: list[str] = list(dict.fromkeys(args.models))
    baseline = args.baseline or models[0]
    try:
        if baseline not in models:
            raise EvalError(f"--baseline {baseline!r} is not one of --models")
        if args.proxy and args.backend:
            raise EvalError("--backend configures the in-process proxy; it cannot be used with --proxy")
        tasks = load_tasks(args.tasks, args.limit)
    except EvalError as exc:
        print(f"ttc-proxy eval: {exc}", file=sys.stderr)
        return 2
    settings = RunSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                           timeout=args.timeout, concurrency=args.concurrency, extra_body=args.extra_body)
    progress = Progress(len(tasks) * len(models), enabled=not args.no_progress)
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    try:
        with proxy_endpoint(args) as (base_url, api_key):
            progress.started = time.monotonic()
            results = asyncio.run(run_all(base_url, api_key, models, tasks, settings, progress, args.pool))
    except EvalError as exc:
        print(f"ttc-proxy eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nttc-proxy eval: interrupted", file=sys.stderr)
        return 130

    summaries = summarise_all(results, baseline)
    source = args.proxy or "in-process proxy"
    print(f"ttc-proxy eval: {len(tasks)} tasks from {args.tasks} via {source}; max_tokens {settings.max_tokens}, "
          f"temperature {'default' if settings.temperature is None else settings.temperature}, "
          f"seed {'-' if settings.seed is None else f'{settings.seed}+i'}, concurrency {settings.concurrency}")
    print(render_table(summaries, baseline))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "tasks_file": str(args.tasks), "tasks": len(tasks), "models": models, "baseline": baseline,
        "proxy": source, "settings": asdict(settings), "started_at": started_at.isoformat(),
        "duration_s": round(time.monotonic() - started, 3), "accuracy_method": ACCURACY_METHOD,
        "diff_method": DIFF_METHOD,
    }
    write_json(out / "results.json", meta, summaries, baseline, results)
    write_csv(out / "summary.csv", summaries, baseline)
    written = [out / "results.json", out / "summary.csv"]
    if write_plot(out / "accuracy_vs_tokens.png", summaries, f"{Path(args.tasks).name}, {len(tasks)} tasks"):
        written.append(out / "accuracy_vs_tokens.png")
    else:
        print("plot skipped: matplotlib is not installed (pip install 'ttc-proxy[plot]' or pip install matplotlib)")
    print("written: " + ", ".join(str(p) for p in written))
    if all(s.answered == 0 for s in summaries):
        print("ttc-proxy eval: every request failed", file=sys.stderr)
        return 1
    return 0
