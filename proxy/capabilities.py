"""What a backend can do, from its kind's preset, free discovery endpoints and config overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .config import BackendKind, CapabilityOverrides


@dataclass(frozen=True)
class Capabilities:
    kind: BackendKind
    max_n: int  # the largest `n` one request may carry
    logprobs: bool
    max_top_logprobs: int
    prefill: bool  # a trailing assistant message is continued
    completions: bool  # raw /v1/completions
    usage_counts_one_choice: bool  # usage.completion_tokens ignores all but one choice (llama-server)

    def with_overrides(self, overrides: CapabilityOverrides) -> "Capabilities":
        changes = {k: v for k, v in overrides.model_dump().items() if v is not None}
        return dataclasses.replace(self, **changes)

    def supports(self, feature: str) -> bool:
        return bool(getattr(self, feature))


PRESETS: dict[BackendKind, Capabilities] = {
    # max_n is learned from /props (total_slots); 1 is the safe value until then.
    "llama_cpp": Capabilities("llama_cpp", 1, True, 20, True, True, True),
    "vllm": Capabilities("vllm", 64, True, 20, True, True, False),
    "transformers": Capabilities("transformers", 1, False, 0, False, False, False),
    "openai": Capabilities("openai", 8, True, 20, False, False, False),
    "generic": Capabilities("generic", 1, False, 0, False, False, False),
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
