"""optillm's request conventions, read as ours: a client moving from optillm changes only its base URL.

optillm names its approach (or plugin) by slug in three places, in this order of preference: a
`<optillm_approach>...</optillm_approach>` tag in the system prompt (or, failing that, a user message), the body
field `optillm_approach`, and the model-name prefix `<slug>-<model>`. Slugs join with `&` (a pipeline: each
approach answers the previous one's answer) or `|` (side by side: one choice per approach). `none` is the plain
model.

Here an approach becomes the strategy that does the same job (APPROACHES); one we have no counterpart for is a
400 that lists what maps. docs/optillm.md is the user-facing table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ttc_proxy.strategies.framework import StrategySpec

from .errors import InvalidRequest

PASS_THROUGH = "none"
AUTO = "auto"  # optillm's "no approach named": the model name decides

# optillm approach or plugin slug -> our strategy and parameters; None: no counterpart here.
APPROACHES: Mapping[str, tuple[str, dict[str, Any]] | None] = MappingProxyType({
    # approaches (optillm's known_approaches)
    "bon": ("bon", {}),
    "mcts": ("mcts", {}),
    "self_consistency": ("sc", {}),
    "cot_reflection": ("cot", {}),
    "moa": ("moa", {}),
    "re2": ("re2", {}),
    "rto": None, "z3": None, "pvg": None, "rstar": None, "plansearch": None, "leap": None, "cepo": None, "mars": None,
    # decoding approaches of optillm's local inference server
    "thinkdeeper": ("think", {}),
    "entropy_decoding": ("entropy", {}),
    "deepconf": ("deepconf", {}),
    "cot_decoding": ("cot_decoding", {}),
    "autothink": None,
    # plugins
    "deepthink": ("deepthink", {}),
    "majority_voting": ("sc", {"n": 6}),  # optillm's k defaults to 6
    "genselect": ("bon", {"select": "judge"}),  # candidates, then the model picks the best
    "spl": None, "longcepo": None, "mcp": None, "router": None, "coc": None, "memory": None, "privacy": None,
    "readurls": None, "executecode": None, "json": None, "web_search": None, "deep_research": None, "proxy": None,
})
_TAG = re.compile(r"<optillm_approach>(.*?)</optillm_approach>", re.DOTALL)
_JOINERS = re.compile(r"[&|]")


def is_optillm_prefix(head: str) -> bool:
    """Whether a model name's head (before the first '-') is optillm's: `none`, an approach slug, or slugs joined
    by '&' or '|'."""
    return head == PASS_THROUGH or all(part in APPROACHES or part == PASS_THROUGH for part in _JOINERS.split(head))


def optillm_names() -> list[str]:
    """optillm's approach and plugin slugs that have a counterpart here."""
    return [slug for slug, target in APPROACHES.items() if target is not None]


def mapped() -> str:
    return ", ".join(f"{slug} → {target[0]}" + (f" ({_params(target[1])})" if target[1] else "")
                     for slug, target in APPROACHES.items() if target is not None)


def _params(params: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def optillm_spec(head: str, model_name: str) -> StrategySpec | None:
    """The strategy optillm's prefix `head` asks for: one approach's counterpart, a `pipeline` of them ('&') or a
    `parallel` run ('|'); None for `none` (the plain model)."""
    if head == PASS_THROUGH:
        return None
    if "&" in head and "|" in head:
        raise InvalidRequest(f"model {model_name!r}: optillm combines approaches with '&' or with '|', not both",
                             param="model", code="invalid_model")
    parts = _JOINERS.split(head)
    if PASS_THROUGH in parts:
        raise InvalidRequest(f"model {model_name!r}: the optillm approach 'none' cannot be combined with others",
                             param="model", code="invalid_model")
    lacking = [p for p in parts if APPROACHES.get(p) is None]
    if lacking:
        raise InvalidRequest(
            f"model {model_name!r}: optillm approach{'es' if len(lacking) > 1 else ''} {', '.join(lacking)} "
            f"{'have' if len(lacking) > 1 else 'has'} no counterpart here. These map: {mapped()}; 'none' is the "
            f"plain model. See docs/optillm.md", param="model", code="unsupported_optillm_approach")
    stages = [APPROACHES[p] for p in parts]
    if len(stages) == 1:
        slug, params = stages[0]  # type: ignore[misc]
        return StrategySpec(slug, dict(params))
    combination = "pipeline" if "&" in head else "parallel"
    return StrategySpec(combination, {"stages": [{"strategy": s, "params": dict(p)} for s, p in stages]})  # type: ignore[misc]


def read_optillm_request(body: dict[str, Any]) -> dict[str, Any]:
    """The body with optillm's approach moved into the model name: the `optillm_approach` field is taken out and a
    `<optillm_approach>` tag cut from the prompt (the system prompt's wins, then the first user message's, then the
    field's), as optillm reads them. A body without either comes back as it is."""
    approach = body.get("optillm_approach")
    messages = body.get("messages")
    tagged: str | None = None
    if isinstance(messages, list):
        messages = [dict(m) if isinstance(m, dict) else m for m in messages]
        for role in ("system", "user"):
            for message in messages:
                if tagged is None and isinstance(message, dict) and message.get("role") == role:
                    tagged = _cut_tag(message)
    if approach is None and tagged is None:
        return body
    body = {k: v for k, v in body.items() if k != "optillm_approach"}
    if isinstance(messages, list):
        body["messages"] = messages
    chosen = tagged if tagged is not None else approach
    if not isinstance(chosen, str):
        raise InvalidRequest("'optillm_approach' must be a string: an optillm approach slug, slugs joined by '&' "
                             "or '|', or 'auto'", param="optillm_approach", code="invalid_type")
    chosen = chosen.strip()
    model = body.get("model")
    if chosen and chosen != AUTO and isinstance(model, str):
        if not is_optillm_prefix(chosen):
            raise InvalidRequest(f"{chosen!r} is not an optillm approach; these map: {mapped()}; 'none' is the plain "
                                 f"model", param="optillm_approach", code="unsupported_optillm_approach")
        body["model"] = f"{chosen}-{model}"
    return body


def _cut_tag(message: dict[str, Any]) -> str | None:
    """The approach named in this message's tag, the tag cut from its text (string or text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        found = _TAG.search(content)
        if found:
            message["content"] = _TAG.sub("", content).strip()
            return found.group(1).strip()
    elif isinstance(content, list):
        for i, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                found = _TAG.search(part["text"])
                if found:
                    content = list(content)
                    content[i] = {**part, "text": _TAG.sub("", part["text"]).strip()}
                    message["content"] = content
                    return found.group(1).strip()
    return None
