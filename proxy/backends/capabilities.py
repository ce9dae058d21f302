"""What a backend can do, from its kind's preset, free discovery endpoints and config overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config import BackendKind, CapabilityOverrides

# Sampling fields of the OpenAI API itself: every OpenAI-compatible engine takes them.
STANDARD_FIELDS = frozenset({"temperature", "top_p", "max_tokens", "stop", "seed", "n", "logprobs",
                             "top_logprobs", "presence_penalty", "frequency_penalty", "user"})


@dataclass(frozen=True)
class Capabilities:
    kind: BackendKind
    max_n: int  # the largest `n` one request may carry
    logprobs: bool
    max_top_logprobs: int
    prefill: bool  # a trailing assistant message is continued
    completions: bool  # raw /v1/completions, with text or token-id prompts
    usage_counts_one_choice: bool  # usage.completion_tokens ignores all but one choice (llama-server)
    tokenize: bool  # /tokenize and /detokenize
    render: bool  # the engine applies its chat template on request (or a template is configured)
    token_ids: bool  # logprob entries carry token ids
    logit_bias: bool
    # Engine fields beyond the OpenAI standard that a call may carry; None: not known, anything is forwarded.
    engine_fields: frozenset[str] | None
    stop_kept: bool = False  # a `stop` string that ended the reply stays in it (the proxy cuts it)
    # The logprob entries of tokens that split a multi-byte character come merged into one, with the last token's
    # id (llama-server): such an entry's id names none of its bytes.
    merges_split_characters: bool = False
    # Sampled tokens are named by id only when a chat call asks (vLLM's return_tokens_as_token_ids).
    token_ids_on_request: bool = False
    # A trailing assistant message is continued only when the call says so (vLLM's continue_final_message).
    prefill_by_flag: bool = False

    def with_overrides(self, overrides: CapabilityOverrides) -> Capabilities:
        changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
        if "engine_fields" in changes:
            changes["engine_fields"] = frozenset(changes["engine_fields"])
        return dataclasses.replace(self, **changes)

    def supports(self, feature: str) -> bool:
        """A capability a strategy may require (Strategy.requires): a field above, or "continue" (continue a
        prefix: prefill, or raw completions of the rendered conversation)."""
        if feature == "continue":
            return self.prefill or (self.completions and self.render)
        return bool(getattr(self, feature))

    def refused_fields(self, fields: set[str]) -> list[str]:
        """The engine fields among `fields` this backend is known not to take."""
        if self.engine_fields is None:
            return []
        return sorted(f for f in fields - STANDARD_FIELDS - self.engine_fields
                      if not (f == "logit_bias" and self.logit_bias))


_LLAMA_CPP_FIELDS = frozenset({
    "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta",
    "cache_prompt", "n_probs", "samplers", "id_slot", "dynatemp_range", "dynatemp_exponent", "xtc_probability",
    "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length", "grammar", "json_schema", "ignore_eos",
    "n_keep", "t_max_predict_ms", "return_tokens", "logit_bias", "response_format", "chat_template_kwargs",
})
_VLLM_FIELDS = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "continue_final_message", "add_generation_prompt", "return_tokens_as_token_ids", "prompt_logprobs",
    "logit_bias", "response_format", "echo", "include_stop_str_in_output", "chat_template_kwargs",
})

PRESETS: dict[BackendKind, Capabilities] = {
    # max_n is learned from /props (total_slots); 1 is the safe value until then.
    "llama_cpp": Capabilities("llama_cpp", 1, True, 20, True, True, True, True, True, True, True, _LLAMA_CPP_FIELDS,
                              merges_split_characters=True),
    # llamafile 0.9.3 (documented shapes, contract-tested): what both its servers offer. `llamafile --server`
    # (an older llama.cpp server) ignores `n` and the logprob fields on chat and has no /v1/completions;
    # llamafiler (`--server --v2`) refuses them with a 400 and its /tokenize answers token texts, not ids.
    # Neither continues a trailing assistant message or renders a template on request.
    "llamafile": Capabilities("llamafile", 1, False, 0, False, False, False, False, False, False, False,
                              frozenset()),
    "vllm": Capabilities("vllm", 64, True, 20, True, True, False, True, True, True, True, _VLLM_FIELDS,
                         token_ids_on_request=True, prefill_by_flag=True),
    # Measured (`ttc-proxy probe`, transformers 5.19): n ignored (one choice), no logprobs, no prefill, raw
    # /v1/completions of a text prompt, no tokenizer or template endpoint (a configured chat_template renders),
    # the stop string left in the reply.
    "transformers": Capabilities("transformers", 1, False, 0, False, True, False, False, False, False, False,
                                 frozenset(), stop_kept=True),
    "openai": Capabilities("openai", 8, True, 20, False, False, False, False, False, False, True,
                           frozenset({"logit_bias", "response_format"})),
    "generic": Capabilities("generic", 1, False, 0, False, False, False, False, False, False, False, None),
}


def kind_from_models_listing(payload: object) -> BackendKind | None:
    """Recognise an engine from its free GET /v1/models answer."""
    if not isinstance(payload, dict):
        return None
    entries = payload.get("data")
    if not isinstance(entries, list):
        return None
    for entry in entries:
        owner = str(entry.get("owned_by", "")).lower() if isinstance(entry, dict) else ""
        if owner == "llamacpp" or owner == "llama.cpp":
            return "llama_cpp"
        if owner == "vllm":
            return "vllm"
        if owner == "llamafile":  # llamafiler; llamafile's default server says "llamacpp"
            return "llamafile"
    return None


def cap_from_n_error(message: str, requested: int) -> int | None:
    """A 400 that complains about `n` lowers the cap: to the largest number it names below the request
    ("Value must be between 1 <= value <= 8, but got 9" -> 8), else to half the request."""
    if not re.search(r"(\bn\b|'n'|number of (choices|completions))", message, re.IGNORECASE):
        return None
    below = [int(x) for x in re.findall(r"\d+", message) if 1 <= int(x) < requested]
    if below:
        return max(below)
    return max(1, requested // 2) if requested > 1 else None
