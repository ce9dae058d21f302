"""Measuring what an OpenAI-compatible engine supports, with real, tiny requests (a few tokens each).

`ttc-proxy probe URL` prints the report; `backends[].probe: true` runs it when the proxy starts and uses what it
measured instead of the kind's preset (config `capabilities` overrides still win). Each check is independent: a
check that fails says why and counts as "not supported".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .capabilities import Capabilities, kind_from_models_listing

PREFIX = "1, 2, 3, 4, 5,"  # a prefix whose continuation is predictable: " 6" follows
ASK = [{"role": "user", "content": "Count on: 1, 2, 3"}]
N_STEPS = (2, 4, 8, 16, 32, 64)
TOP_LOGPROBS_STEPS = (20, 10, 5, 1)


@dataclass
class Check:
    name: str
    value: Any
    note: str = ""


@dataclass
class ProbeReport:
    """What was measured, check by check, and the capabilities it implies."""

    base_url: str
    model: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, value: Any, note: str = "") -> Any:
        self.checks.append(Check(name, value, note))
        return value

    def value(self, name: str, default: Any = None) -> Any:
        return next((c.value for c in self.checks if c.name == name), default)

    def capabilities(self, base: Capabilities) -> Capabilities:
        """`base` (the kind's preset) with every measured capability replaced by what was measured."""
        measured = {
            "max_n": self.value("max_n"), "logprobs": self.value("logprobs"),
            "max_top_logprobs": self.value("max_top_logprobs"), "prefill": self.value("prefill"),
            "completions": self.value("completions"), "usage_counts_one_choice": self.value("usage_counts_one_choice"),
            "tokenize": self.value("tokenize"), "render": self.value("render"), "token_ids": self.value("token_ids"),
            "logit_bias": self.value("logit_bias"),
        }
        return dataclasses.replace(base, **{k: v for k, v in measured.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model,
                "checks": [{"name": c.name, "value": c.value, "note": c.note} for c in self.checks]}


class _Engine:
    def __init__(self, client: aiohttp.ClientSession, base_url: str, api_key: str | None, timeout: float) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any, str]:
        """(status, parsed JSON or None, raw text); a connection failure is status 0. A pooled connection the
        engine closed (llama-server closes after an error) is retried once on a fresh one. Redirects are not
        followed (as for every backend call: a configured host must not send the proxy, and its key, elsewhere)."""
        for attempt in range(2):
            try:
                async with self.client.post(url, json=body, headers=self.headers, timeout=self.timeout,
                                             allow_redirects=False) as response:
                    raw = await response.text()
                    status = response.status
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt == 1:
                    return 0, None, f"{type(exc).__name__}: {exc}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                return 0, None, f"{type(exc).__name__}: {exc}"
        try:
            return status, json.loads(raw), raw
        except ValueError:
            return status, None, raw

    async def get(self, url: str) -> Any:
        try:
            async with self.client.get(url, headers=self.headers, timeout=self.timeout,
                                       allow_redirects=False) as response:
                return await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def stream_tail(self, body: dict[str, Any]) -> tuple[bool, bool, str]:
        """(ended with `data: [DONE]`, a chunk carried usage, note) for a streamed chat request."""
        try:
            async with self.client.post(f"{self.base_url}/chat/completions", json=body, headers=self.headers,
                                        timeout=self.timeout, allow_redirects=False) as response:
                if response.status != 200:
                    return False, False, f"HTTP {response.status}"
                lines = [line.decode("utf-8", "replace").strip() async for line in response.content]
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, False, f"{type(exc).__name__}"
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        usage = any('"usage"' in d and '"prompt_tokens"' in d for d in data)
        return bool(data) and data[-1] == "[DONE]", usage, f"{len(data)} events"


def _choices(payload: Any) -> list[dict[str, Any]]:
    return [c for c in (payload or {}).get("choices") or [] if isinstance(c, dict)] if isinstance(payload, dict) \
        else []


def _content(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    return str((message or {}).get("content") or "") if isinstance(message, dict) else str(choice.get("text") or "")


def _entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
    block = choice.get("logprobs")
    if isinstance(block, dict) and isinstance(block.get("content"), list):
        return [e for e in block["content"] if isinstance(e, dict)]
    return []


def _entry_id(entry: dict[str, Any]) -> int | None:
    if isinstance(entry.get("id"), int):
        return entry["id"]
    token = entry.get("token")
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    return None


def _error_shape_of(status: int, payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return f"HTTP {status}, OpenAI shape ({{error: {{message, type, ...}}}})"
    if isinstance(payload, dict) and "detail" in payload:
        return f"HTTP {status}, {{detail: ...}} (FastAPI shape)"
    return f"HTTP {status}, unrecognised body"


async def probe(client: aiohttp.ClientSession, base_url: str, model: str | None = None, *, api_key: str | None = None,
                timeout: float = 120.0) -> ProbeReport:
    """Measure an engine. `model`: the name to ask for (default: the first its GET /models lists)."""
    engine = _Engine(client, base_url, api_key, timeout)
    listing = await engine.get(f"{engine.base_url}/models")
    listed = [str(m.get("id")) for m in (listing or {}).get("data") or [] if isinstance(m, dict)] \
        if isinstance(listing, dict) else []
    report = ProbeReport(engine.base_url, model or (listed[0] if listed else "default"))
    report.add("models", listed, "GET /models")
    report.add("kind", kind_from_models_listing(listing) or "generic", "from GET /models owned_by")
    probing = _Probing(engine, report)
    status, payload, raw = await engine.post(probing.chat, probing.body())
    if status != 200 or not _choices(payload):
        report.add("chat", False, f"HTTP {status}: {raw[:200]}")
        return report
    report.add("chat", True, "POST /chat/completions")
    for check in CHECKS:
        await check(probing)
    return report


@dataclass
class _Probing:
    """One probe under way: the engine, the report so far, and what a later check needs from an earlier one."""

    engine: _Engine
    report: ProbeReport
    sample_id: int | None = None  # the greedy first token's id (token_ids), for logit_bias
    ids_on_request: bool = False  # ids come only with return_tokens_as_token_ids (vLLM)
    prompt_ids: list[int] | None = None  # PREFIX tokenized (tokenize), for completions_token_ids

    @property
    def chat(self) -> str:
        return f"{self.engine.base_url}/chat/completions"

    @property
    def completions(self) -> str:
        return f"{self.engine.base_url}/completions"

    def body(self, **extra: Any) -> dict[str, Any]:
        """A tiny greedy chat request, with `extra` fields."""
        return {"model": self.report.model, "messages": ASK, "max_tokens": 2, "temperature": 0, **extra}

    async def first_choice(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The first choice of the chat reply to `body`; None if the engine refused it or answered none."""
        status, payload, _ = await self.engine.post(self.chat, body)
        return _first_choice(status, payload)


def _first_choice(status: int, payload: Any) -> dict[str, Any] | None:
    choices = _choices(payload) if status == 200 else []
    return choices[0] if choices else None


async def _max_n(p: _Probing) -> None:
    """max_n: the most choices one call returns (doubling n, then halving the gap between the largest n that
    worked and the first that did not)."""
    async def gives(n: int) -> tuple[bool, str]:
        status, payload, _ = await p.engine.post(p.chat, p.body(n=n, max_tokens=1, temperature=0.8))
        if status != 200:
            return False, f"n={n}: HTTP {status}"
        got = len(_choices(payload))
        return got == n, f"n={n}: {got} choices"

    max_n, note = 1, f"n up to {N_STEPS[-1]} tried"
    for n in N_STEPS:
        ok, why = await gives(n)
        if not ok:
            note, low, high = why, max_n, n
            while high - low > 1:
                middle = (low + high) // 2
                ok, why = await gives(middle)
                low, high = (middle, high) if ok else (low, middle)
            max_n = low
            break
        max_n = n
    p.report.add("max_n", max_n, note)


async def _usage_counts_one_choice(p: _Probing) -> None:
    """usage_counts_one_choice: whether usage counts one choice's tokens where n > 1 (llama-server's does)."""
    if p.report.value("max_n") < 2:
        return
    status, payload, _ = await p.engine.post(p.chat, p.body(n=2, max_tokens=4, temperature=1.0, logprobs=True))
    usage = (payload or {}).get("usage") if isinstance(payload, dict) else None
    counted = [len(_entries(c)) for c in _choices(payload)]
    if status == 200 and isinstance(usage, dict) and all(counted):
        one = usage.get("completion_tokens") == counted[0] and sum(counted) != counted[0]
        p.report.add("usage_counts_one_choice", one, f"usage {usage.get('completion_tokens')} for choices of "
                                                     f"{counted} tokens")
    else:
        p.report.add("usage_counts_one_choice", None, "not measurable (no logprobs to count tokens)")


async def _logprobs(p: _Probing) -> None:
    """logprobs and max_top_logprobs: the most alternatives per token, asking for fewer until some come."""
    top = 0
    for k in TOP_LOGPROBS_STEPS:
        choice = await p.first_choice(p.body(logprobs=True, top_logprobs=k))
        entries = _entries(choice) if choice else []
        if entries:
            top = max(len(e.get("top_logprobs") or []) for e in entries)
            break
    p.report.add("logprobs", top > 0, "chat logprobs with top_logprobs")
    p.report.add("max_top_logprobs", top, f"asked for up to {TOP_LOGPROBS_STEPS[0]}")


async def _token_ids(p: _Probing) -> None:
    """token_ids: whether logprob entries name their token's id."""
    note = "an `id` in every logprob entry"
    for extra in ({}, {"return_tokens_as_token_ids": True}):  # vLLM names ids only when asked, as "token_id:N"
        if not p.report.value("max_top_logprobs"):
            break
        choice = await p.first_choice(p.body(logprobs=True, top_logprobs=1, **extra))
        entries = _entries(choice) if choice else []
        ids = [_entry_id(e) for e in entries]
        if entries and all(i is not None for i in ids):
            p.sample_id, p.ids_on_request = ids[0], bool(extra)
            note = "`token_id:N` tokens with return_tokens_as_token_ids" if extra else note
            break
    p.report.add("token_ids", p.sample_id is not None, note)


async def _prefill(p: _Probing) -> None:
    """prefill and prefill_echo: whether a trailing assistant message is continued, and repeated in the reply."""
    prefilled = p.body(messages=[*ASK, {"role": "assistant", "content": PREFIX}], max_tokens=3)
    how = "a trailing assistant message"
    status, payload, _ = await p.engine.post(p.chat, prefilled)
    reply, echoes, continued = _continuation(status, payload)
    if not continued and status == 200:  # vLLM continues only when asked to
        status, payload, _ = await p.engine.post(p.chat, {**prefilled, "continue_final_message": True,
                                                          "add_generation_prompt": False})
        reply, echoes, continued = _continuation(status, payload)
        how = "with continue_final_message, a trailing assistant message"
    p.report.add("prefill", continued, f"{how} {PREFIX!r} went on with {reply[:24]!r}")
    p.report.add("prefill_echo", echoes if continued else None, "the reply repeats the prefix")


def _continuation(status: int, payload: Any) -> tuple[str, bool, bool]:
    """(the reply, whether it repeats PREFIX, whether it goes on counting) for a reply to the prefilled request."""
    choice = _first_choice(status, payload)
    reply = _content(choice) if choice else ""
    echoes = reply.startswith(PREFIX)
    return reply, echoes, (reply[len(PREFIX):] if echoes else reply).lstrip().startswith("6")


async def _completions(p: _Probing) -> None:
    """completions: whether POST /completions takes a text prompt."""
    status, payload, _ = await p.engine.post(p.completions, {"model": p.report.model, "prompt": PREFIX,
                                                             "max_tokens": 2, "temperature": 0, "logprobs": 3})
    text_ok = status == 200 and bool(_choices(payload))
    p.report.add("completions", text_ok, "POST /completions with a text prompt" if text_ok else f"HTTP {status}")


async def _tokenize(p: _Probing) -> None:
    """tokenize: whether POST /tokenize answers token ids; completions_token_ids: whether /completions takes them."""
    status, payload, _ = await p.engine.post(f"{p.engine.root}/tokenize", {"content": PREFIX, "model": p.report.model,
                                                                           "prompt": PREFIX})
    tokens = payload.get("tokens") if status == 200 and isinstance(payload, dict) else None
    if isinstance(tokens, list):  # ids, or {id, piece} objects; llamafiler answers token texts (no ids)
        found = [t if isinstance(t, int) else t.get("id") if isinstance(t, dict) else None for t in tokens]
        p.prompt_ids = found if all(isinstance(i, int) for i in found) else None
    ids = p.prompt_ids
    p.report.add("tokenize", ids is not None, f"POST /tokenize: {len(ids)} ids" if ids else
                 f"HTTP {status}{'' if tokens is None else ', tokens without ids'}")
    if ids and p.report.value("completions"):
        status, payload, _ = await p.engine.post(p.completions, {"model": p.report.model, "prompt": ids,
                                                                 "max_tokens": 2, "temperature": 0})
        p.report.add("completions_token_ids", status == 200 and bool(_choices(payload)),
                     "POST /completions with a token-id prompt")


async def _render(p: _Probing) -> None:
    """render: whether the engine renders messages through its chat template."""
    status, payload, _ = await p.engine.post(f"{p.engine.root}/apply-template", {"messages": ASK})
    if status == 200 and isinstance(payload, dict) and isinstance(payload.get("prompt"), str):
        rendered, note = True, "POST /apply-template"
    else:
        status, payload, _ = await p.engine.post(f"{p.engine.root}/tokenize", {"model": p.report.model,
                                                                               "messages": ASK})
        # Non-empty: a /tokenize that ignores `messages` (llama-server-like ones) answers no tokens.
        rendered = status == 200 and isinstance(payload, dict) and isinstance(payload.get("tokens"), list) \
            and bool(payload["tokens"])
        note = "POST /tokenize with messages" if rendered else "no template endpoint"
    p.report.add("render", rendered, note)


async def _logit_bias(p: _Probing) -> None:
    """logit_bias: whether -100 on the greedy first token moves it."""
    if p.sample_id is None:
        p.report.add("logit_bias", None, "not measurable without token ids")
        return
    status, payload, _ = await p.engine.post(p.chat, p.body(max_tokens=1, logprobs=True,
                                                            logit_bias={str(p.sample_id): -100},
                                                            **({"return_tokens_as_token_ids": True}
                                                               if p.ids_on_request else {})))
    choice = _first_choice(status, payload)
    entries = _entries(choice) if choice else []
    moved = bool(entries) and _entry_id(entries[0]) not in (p.sample_id, None)
    p.report.add("logit_bias", moved, f"-100 on the greedy first token {'moved' if moved else 'did not move'} it"
                 if status == 200 else f"HTTP {status}")


async def _seed_determinism(p: _Probing) -> None:
    """seed_determinism: whether two seeded samples at temperature 1 are the same."""
    seeded = p.body(max_tokens=8, temperature=1.0, seed=7)
    first = await p.first_choice(seeded)
    second = await p.first_choice(seeded)
    same = first is not None and second is not None and _content(first) == _content(second)
    p.report.add("seed_determinism", same, "two seeded samples at temperature 1")


async def _stop_kept(p: _Probing) -> None:
    """stop_kept: whether a reply cut at a stop sequence keeps the stop text."""
    choice = await p.first_choice(p.body(max_tokens=6))
    free = _content(choice) if choice else ""
    stop = free.strip()[1:3] if len(free.strip()) >= 3 else ""  # text the greedy reply goes through
    if not stop:
        p.report.add("stop_kept", None, f"not measurable: the greedy reply {free!r} is too short")
        return
    choice = await p.first_choice(p.body(max_tokens=6, stop=[stop]))
    cut = _content(choice) if choice else ""
    p.report.add("stop_kept", stop in cut, f"stop {stop!r} in the greedy {free!r}: the reply was {cut!r}")


async def _stream(p: _Probing) -> None:
    """stream_done and stream_usage: how a stream ends, and whether it reports usage when asked."""
    done, usage, note = await p.engine.stream_tail(p.body(stream=True, stream_options={"include_usage": True}))
    p.report.add("stream_done", done, f"the stream ends with data: [DONE] ({note})")
    p.report.add("stream_usage", usage, "stream_options.include_usage gives a usage chunk")


async def _error_shape(p: _Probing) -> None:
    """error_shape: what a request the engine must refuse is answered with."""
    status, payload, _ = await p.engine.post(p.chat, p.body(messages="not a list"))
    p.report.add("error_shape", _error_shape_of(status, payload), "messages that are not a list")


# The checks, in the order they run; a later one may read what an earlier one found.
CHECKS: tuple[Callable[[_Probing], Awaitable[None]], ...] = (
    _max_n, _usage_counts_one_choice, _logprobs, _token_ids, _prefill, _completions, _tokenize, _render,
    _logit_bias, _seed_determinism, _stop_kept, _stream, _error_shape)


CONFIG_FIELDS = ("max_n", "logprobs", "max_top_logprobs", "prefill", "completions", "usage_counts_one_choice",
                 "tokenize", "render", "token_ids", "logit_bias", "stop_kept")


def config_block(report: ProbeReport, name: str = "probed") -> str:
    """The `backends:` entry to paste into config.yaml for what was measured."""
    capabilities = {f: report.value(f) for f in CONFIG_FIELDS if report.value(f) is not None}
    lines = [f"  - name: {name}", f"    kind: {report.value('kind')}", f"    base_url: {report.base_url}",
             f"    models: {json.dumps(report.value('models') or [report.model])}",
             "    capabilities: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in capabilities.items()) + "}"]
    return "\n".join(lines)
