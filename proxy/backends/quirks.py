"""What a call's body needs for the engine that serves it, beyond the OpenAI request: each engine's quirk is a
capability flag (capabilities.py), and this is the one place a body is adapted to it."""

from __future__ import annotations

from typing import Any

from .capabilities import Capabilities


def adapt_call(capabilities: Capabilities, body: dict[str, Any], n: int) -> None:
    """Fields a sampling call (plain or streamed) adds for this engine."""
    chat = "messages" in body
    # An engine whose usage counts one choice only: the logprob entries count every choice exactly.
    if n > 1 and capabilities.usage_counts_one_choice and capabilities.logprobs:
        body["logprobs"] = True if chat else max(1, int(body.get("logprobs") or 1))
    # Tokens named by id only when asked; the text then comes from their bytes, which only chat logprobs carry
    # (vLLM's legacy completions logprobs have none), so chat calls only.
    if capabilities.token_ids_on_request and body.get("logprobs") and chat:
        body["return_tokens_as_token_ids"] = True


def adapt_prefill(capabilities: Capabilities, body: dict[str, Any]) -> None:
    """A chat body whose trailing assistant message is to be continued, not answered."""
    if capabilities.prefill_by_flag:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
