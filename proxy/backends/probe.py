"""Measuring what an OpenAI-compatible engine supports, with real, tiny requests (a few tokens each).

`ttc-proxy probe URL` prints the report; `backends[].probe: true` runs it when the proxy starts and uses what it
measured instead of the kind's preset (config `capabilities` overrides still win). Each check is independent: a
check that fails says why and counts as "not supported".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .capabilities import Capabilities, kind_from_models_listing

PREFIX = "1, 2, 3, 4, 5,"  # a prefix whose continuation is predictable: " 6" follows
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


def _error_shape(status: int, payload: Any) -> str:
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
    chat = f"{engine.base_url}/chat/completions"
    ask = [{"role": "user", "content": "Count on: 1, 2, 3"}]

    def body(**extra: Any) -> dict[str, Any]:
        return {"model": report.model, "messages": ask, "max_tokens": 2, "temperature": 0, **extra}

    status, payload, raw = await engine.post(chat, body())
    if status != 200 or not _choices(payload):
        report.add("chat", False, f"HTTP {status}: {raw[:200]}")
        return report
    report.add("chat", True, "POST /chat/completions")

    async def gives(n: int) -> tuple[bool, str]:
        status, payload, _ = await engine.post(chat, body(n=n, max_tokens=1, temperature=0.8))
        if status != 200:
            return False, f"n={n}: HTTP {status}"
        got = len(_choices(payload))
        return got == n, f"n={n}: {got} choices"

    max_n, note = 1, f"n up to {N_STEPS[-1]} tried"
    for n in N_STEPS:  # doubling, then halving the gap between the largest n that worked and the first that did not
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
    report.add("max_n", max_n, note)

    if max_n >= 2:
        status, payload, _ = await engine.post(chat, body(n=2, max_tokens=4, temperature=1.0, logprobs=True))
        choices = _choices(payload)
        usage = (payload or {}).get("usage") if isinstance(payload, dict) else None
        counted = [len(_entries(c)) for c in choices]
        if status == 200 and isinstance(usage, dict) and all(counted):
            one = usage.get("completion_tokens") == counted[0] and sum(counted) != counted[0]
            report.add("usage_counts_one_choice", one, f"usage {usage.get('completion_tokens')} for choices of "
                                                       f"{counted} tokens")
        else:
            report.add("usage_counts_one_choice", None, "not measurable (no logprobs to count tokens)")

    top = 0
    for k in TOP_LOGPROBS_STEPS:
        status, payload, _ = await engine.post(chat, body(logprobs=True, top_logprobs=k))
        entries = _entries(_choices(payload)[0]) if status == 200 and _choices(payload) else []
        if entries:
            top = max(len(e.get("top_logprobs") or []) for e in entries)
            break
    report.add("logprobs", top > 0, "chat logprobs with top_logprobs")
    report.add("max_top_logprobs", top, f"asked for up to {TOP_LOGPROBS_STEPS[0]}")
    sample_id: int | None = None
    ids_note = "an `id` in every logprob entry"
    for extra in ({}, {"return_tokens_as_token_ids": True}):  # vLLM names ids only when asked, as "token_id:N"
        if not top:
            break
        status, payload, _ = await engine.post(chat, body(logprobs=True, top_logprobs=1, **extra))
        entries = _entries(_choices(payload)[0]) if status == 200 and _choices(payload) else []
        ids = [_entry_id(e) for e in entries]
        if entries and all(i is not None for i in ids):
            sample_id = ids[0]
            ids_note = "`token_id:N` tokens with return_tokens_as_token_ids" if extra else ids_note
            break
    report.add("token_ids", sample_id is not None, ids_note)

    prefilled = body(messages=[*ask, {"role": "assistant", "content": PREFIX}], max_tokens=3)
    status, payload, _ = await engine.post(chat, prefilled)
    reply = _content(_choices(payload)[0]) if status == 200 and _choices(payload) else ""
    echoes = reply.startswith(PREFIX)
    continued = (reply[len(PREFIX):] if echoes else reply).lstrip().startswith("6")
    how = "a trailing assistant message"
    if not continued and status == 200:  # vLLM continues only when asked to
        status, payload, _ = await engine.post(chat, {**prefilled, "continue_final_message": True,
                                                      "add_generation_prompt": False})
        reply = _content(_choices(payload)[0]) if status == 200 and _choices(payload) else ""
        echoes = reply.startswith(PREFIX)
        continued = (reply[len(PREFIX):] if echoes else reply).lstrip().startswith("6")
        how = "with continue_final_message, a trailing assistant message"
    report.add("prefill", continued, f"{how} {PREFIX!r} went on with {reply[:24]!r}")
    report.add("prefill_echo", echoes if continued else None, "the reply repeats the prefix")

    completions = f"{engine.base_url}/completions"
    status, payload, raw = await engine.post(completions, {"model": report.model, "prompt": PREFIX, "max_tokens": 2,
                                                           "temperature": 0, "logprobs": 3})
    text_ok = status == 200 and bool(_choices(payload))
    report.add("completions", text_ok, "POST /completions with a text prompt" if text_ok else f"HTTP {status}")

    ids: list[int] | None = None
    status, payload, _ = await engine.post(f"{engine.root}/tokenize", {"content": PREFIX, "model": report.model,
                                                                       "prompt": PREFIX})
    tokens = payload.get("tokens") if status == 200 and isinstance(payload, dict) else None
    if isinstance(tokens, list):  # ids, or {id, piece} objects; llamafiler answers token texts (no ids)
        found = [t if isinstance(t, int) else t.get("id") if isinstance(t, dict) else None for t in tokens]
        ids = found if all(isinstance(i, int) for i in found) else None
    report.add("tokenize", ids is not None, f"POST /tokenize: {len(ids)} ids" if ids else
               f"HTTP {status}{'' if tokens is None else ', tokens without ids'}")
    if ids and text_ok:
        status, payload, _ = await engine.post(completions, {"model": report.model, "prompt": ids, "max_tokens": 2,
                                                             "temperature": 0})
        report.add("completions_token_ids", status == 200 and bool(_choices(payload)),
                   "POST /completions with a token-id prompt")
    rendered = False
    status, payload, _ = await engine.post(f"{engine.root}/apply-template", {"messages": ask})
    if status == 200 and isinstance(payload, dict) and isinstance(payload.get("prompt"), str):
        rendered = True
        note = "POST /apply-template"
    else:
        status, payload, _ = await engine.post(f"{engine.root}/tokenize", {"model": report.model, "messages": ask})
        # Non-empty: a /tokenize that ignores `messages` (llama-server-like ones) answers no tokens.
        rendered = status == 200 and isinstance(payload, dict) and isinstance(payload.get("tokens"), list) \
            and bool(payload["tokens"])
        note = "POST /tokenize with messages" if rendered else "no template endpoint"
    report.add("render", rendered, note)

    if sample_id is not None:
        status, payload, _ = await engine.post(chat, body(max_tokens=1, logprobs=True,
                                                          logit_bias={str(sample_id): -100},
                                                          **({} if "id`" in ids_note else
                                                             {"return_tokens_as_token_ids": True})))
        entries = _entries(_choices(payload)[0]) if status == 200 and _choices(payload) else []
        moved = bool(entries) and _entry_id(entries[0]) not in (sample_id, None)
        report.add("logit_bias", moved, f"-100 on the greedy first token {'moved' if moved else 'did not move'} it"
                   if status == 200 else f"HTTP {status}")
    else:
        report.add("logit_bias", None, "not measurable without token ids")

    seeded = body(max_tokens=8, temperature=1.0, seed=7)
    first = await engine.post(chat, seeded)
    second = await engine.post(chat, seeded)
    same = first[0] == 200 and second[0] == 200 and _choices(first[1]) and _choices(second[1]) and \
        _content(_choices(first[1])[0]) == _content(_choices(second[1])[0])
    report.add("seed_determinism", bool(same), "two seeded samples at temperature 1")

    status, payload, _ = await engine.post(chat, body(max_tokens=6))
    free = _content(_choices(payload)[0]) if status == 200 and _choices(payload) else ""
    stop = free.strip()[1:3] if len(free.strip()) >= 3 else ""  # text the greedy reply goes through
    if stop:
        status, payload, _ = await engine.post(chat, body(max_tokens=6, stop=[stop]))
        cut = _content(_choices(payload)[0]) if status == 200 and _choices(payload) else ""
        report.add("stop_kept", stop in cut, f"stop {stop!r} in the greedy {free!r}: the reply was {cut!r}")
    else:
        report.add("stop_kept", None, f"not measurable: the greedy reply {free!r} is too short")

    done, usage, note = await engine.stream_tail(body(stream=True, stream_options={"include_usage": True}))
    report.add("stream_done", done, f"the stream ends with data: [DONE] ({note})")
    report.add("stream_usage", usage, "stream_options.include_usage gives a usage chunk")

    status, payload, _ = await engine.post(chat, body(messages="not a list"))
    report.add("error_shape", _error_shape(status, payload), "messages that are not a list")
    return report


CONFIG_FIELDS = ("max_n", "logprobs", "max_top_logprobs", "prefill", "completions", "usage_counts_one_choice",
                 "tokenize", "render", "token_ids", "logit_bias", "stop_kept")


def config_block(report: ProbeReport, name: str = "probed") -> str:
    """The `backends:` entry to paste into config.yaml for what was measured."""
    capabilities = {f: report.value(f) for f in CONFIG_FIELDS if report.value(f) is not None}
    lines = [f"  - name: {name}", f"    kind: {report.value('kind')}", f"    base_url: {report.base_url}",
             f"    models: {json.dumps(report.value('models') or [report.model])}",
             "    capabilities: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in capabilities.items()) + "}"]
    return "\n".join(lines)
