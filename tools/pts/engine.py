"""The engine as the offline search sees it: only the proxy's HTTP API, engine-neutral.

Token ids of the rendered chat and of replies come from the proxy's POST /v1/tokenize and /v1/detokenize;
continuations of an exact token-id prefix come from /v1/completions with a token-id prompt and `n` (through the
official SDK), so the engine's prefix cache serves the shared prompt. A request above the engine's cap on `n` is
split once the engine has said what the cap is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ttc_proxy.proxy.backends.capabilities import cap_from_n_error
from ttc_proxy.proxy.runs.sampling import logprob_entries

from .records import Spend
from .search import Ids


class EngineError(Exception):
    """A call through the proxy failed (HTTP error, unreachable proxy, a body without what was asked for)."""


class BudgetSpent(Exception):
    """The run's token budget (--max-tokens-total) is spent: no further generation call is made."""


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class Alternative:
    """A next token the engine listed at a position, most likely first."""

    text: str
    token_id: int
    logprob: float | None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(body)[:300]


class ProxyEngine:
    """One model behind the proxy. Every generation call is charged to `spent` (the run's total) and to the
    `spend` the caller passes (its task's); with `max_total_tokens`, a call is refused once the total reaches it
    (calls already in flight finish, so the total may end above it by what they spend)."""

    def __init__(self, base_url: str, api_key: str, model: str, *, temperature: float, timeout: float = 300.0,
                 max_total_tokens: int | None = None, extra_body: Mapping[str, Any] | None = None) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.temperature = temperature
        self.timeout = timeout
        self.max_total_tokens = max_total_tokens
        self.extra_body = dict(extra_body or {})
        self.max_n: int | None = None  # learned from the engine's refusal of a larger n
        self.spent = Spend()
        self._sdk = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout)
        self._http = httpx.AsyncClient(headers={"authorization": f"Bearer {api_key}"}, timeout=timeout)

    async def close(self) -> None:
        await self._sdk.close()
        await self._http.aclose()

    # ---- tokenizer (no generation: not charged to the budget) ----

    async def _utility(self, path: str, body: dict[str, Any], spend: Spend) -> dict[str, Any]:
        spend.tokenizer_calls += 1
        self.spent.tokenizer_calls += 1
        try:
            response = await self._http.post(f"{self.base_url}{path}", json={"model": self.model, **body})
        except httpx.HTTPError as exc:
            raise EngineError(f"POST {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise EngineError(f"POST {path}: HTTP {response.status_code}: {_error_message(response)}")
        try:
            payload = response.json()
        except ValueError as exc:
            raise EngineError(f"POST {path}: the answer is not JSON") from exc
        if not isinstance(payload, dict):
            raise EngineError(f"POST {path}: the answer is not a JSON object")
        return payload

    async def tokenize_chat(self, messages: Sequence[Mapping[str, Any]], spend: Spend) -> Ids:
        """The ids of the conversation rendered with the model's chat template, the assistant's turn opened."""
        payload = await self._utility("/tokenize", {"messages": list(messages), "add_generation_prompt": True},
                                      spend)
        return self._ids(payload)

    async def tokenize(self, text: str, spend: Spend) -> Ids:
        return self._ids(await self._utility("/tokenize", {"prompt": text}, spend))

    async def detokenize(self, ids: Sequence[int], spend: Spend) -> str:
        if not ids:
            return ""
        payload = await self._utility("/detokenize", {"tokens": list(ids)}, spend)
        text = payload.get("prompt")
        if not isinstance(text, str):
            raise EngineError("POST /detokenize: no `prompt` text in the answer")
        return text

    @staticmethod
    def _ids(payload: Mapping[str, Any]) -> Ids:
        tokens = payload.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise EngineError("POST /tokenize: no list of token ids in the answer")
        return tuple(tokens)

    # ---- generation (charged) ----

    def _check_budget(self) -> None:
        if self.max_total_tokens is not None and self.spent.total_tokens >= self.max_total_tokens:
            raise BudgetSpent(f"{self.spent.total_tokens} of {self.max_total_tokens} tokens spent")

    async def _complete(self, prompt: Ids, spend: Spend, **options: Any) -> dict[str, Any]:
        import openai

        from ..eval.runner import describe_error

        self._check_budget()
        if self.extra_body:
            options["extra_body"] = self.extra_body
        try:
            response = await self._sdk.completions.create(model=self.model, prompt=list(prompt), **options)
        except openai.BadRequestError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            requested = options.get("n") or 1
            cap = cap_from_n_error(str(body.get("message") or exc.message), requested) if requested > 1 else None
            if cap is not None:
                raise _NTooLarge(cap) from exc
            raise EngineError(describe_error(exc, self.timeout)) from exc
        except openai.OpenAIError as exc:
            raise EngineError(describe_error(exc, self.timeout)) from exc
        body = response.model_dump()
        usage = body.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        charge = Spend(calls=1, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage.get("completion_tokens") or 0),
                       cached_prompt_tokens=cached if isinstance(cached, int) else None)
        choices = sorted((c for c in body.get("choices") or [] if isinstance(c, dict)), key=lambda c: c.get("index", 0))
        if len(choices) > 1:  # an engine may count one choice (llama-server): the continuations, re-tokenized
            texts = [str(c.get("text") or "") for c in choices]
            distinct = list(dict.fromkeys(texts))
            lengths = await asyncio.gather(*(self.tokenize(t, spend) for t in distinct))
            by_text = {text: len(ids) for text, ids in zip(distinct, lengths)}
            charge.completion_tokens = max(charge.completion_tokens,
                                           sum(by_text[t] for t in texts))
        spend.add(charge)
        self.spent.add(charge)
        return {**body, "choices": choices}

    async def sample(self, prompt: Ids, n: int, max_tokens: int, spend: Spend, seed: int | None = None) -> list[Reply]:
        """`n` continuations of `prompt` at the engine's temperature, in requests of at most the engine's cap on n
        (request i of a seeded sample is sent with seed + i)."""
        replies: list[Reply] = []
        part = 0
        while len(replies) < n:
            count = min(n - len(replies), self.max_n or n)
            options: dict[str, Any] = {"n": count, "max_tokens": max_tokens, "temperature": self.temperature}
            if seed is not None:
                options["seed"] = seed + part
            try:
                body = await self._complete(prompt, spend, **options)
            except _NTooLarge as exc:
                self.max_n = exc.cap
                continue
            choices = body["choices"]
            if not choices:
                raise EngineError("/v1/completions answered without choices")
            replies += [Reply(str(c.get("text") or ""), c.get("finish_reason")) for c in choices[:count]]
            part += 1
        return replies

    async def alternatives(self, prompt: Ids, k: int, spend: Spend) -> list[Alternative]:
        """The engine's top-`k` next tokens after `prompt` (one call, one generated token, logprobs=k), most likely
        first. Entries without ids are tokenized; one that is not a single token is left out."""
        body = await self._complete(prompt, spend, n=1, max_tokens=1, temperature=self.temperature, logprobs=k)
        entries = logprob_entries(body["choices"][0]) if body["choices"] else None
        if not entries:
            return []
        found: list[Alternative] = []
        for entry in entries[0].get("top_logprobs") or []:
            text = entry.get("token")
            if not isinstance(text, str):
                continue
            token_id = entry.get("id")
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                ids = await self.tokenize(text, spend)
                if len(ids) != 1:
                    continue
                token_id = ids[0]
            logprob = entry.get("logprob")
            found.append(Alternative(text, token_id, float(logprob) if isinstance(logprob, (int, float)) else None))
        found.sort(key=lambda a: -(a.logprob if a.logprob is not None else float("-inf")))
        return found


class _NTooLarge(Exception):
    def __init__(self, cap: int) -> None:
        super().__init__(f"n above the engine's cap of {cap}")
        self.cap = cap
