"""Stop strings cut out of replies, for engines that leave the one that ended a reply in it (`transformers
serve`; Capabilities.stop_kept). The OpenAI API ends a reply before its stop string."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..wire.protocol import choice_index


def stop_strings(body: Mapping[str, Any]) -> list[str]:
    """The request's `stop`, as a list of non-empty strings."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return [s for s in stops if isinstance(s, str) and s]


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """`text` up to the earliest stop string in it; None when it holds none."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else None


def cut_stops_in_reply(payload: dict[str, Any], stops: Sequence[str]) -> bool:
    """Cut every choice of a chat or text completion at its first stop string, in place; True if any was cut."""
    cut_any = False
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        holder, key = (message, "content") if isinstance(message, dict) else (choice, "text")
        text = holder.get(key)
        cut = cut_at_stop(text, stops) if isinstance(text, str) else None
        if cut is not None:
            holder[key] = cut
            choice["finish_reason"] = "stop"
            cut_any = True
    return cut_any


class StreamedStopCutter:
    """The same cut on a stream of deltas: each choice's text is held back by one character less than the longest
    stop string (it could be the start of one), and nothing is passed on after a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.hold = max(len(s) for s in self.stops) - 1
        self.pending: dict[int, str] = {}
        self.stopped: set[int] = set()

    def feed(self, index: int, text: str) -> str:
        """The part of `text` (a choice's next delta) that can go out now."""
        if index in self.stopped:
            return ""
        pending = self.pending.get(index, "") + text
        cut = cut_at_stop(pending, self.stops)
        if cut is not None:
            self.stopped.add(index)
            self.pending.pop(index, None)
            return cut
        ready = len(pending) - self.hold
        if ready <= 0:
            self.pending[index] = pending
            return ""
        self.pending[index] = pending[ready:]
        return pending[:ready]

    def flush(self, index: int) -> str:
        """What was held back of a choice that ended without a stop string."""
        return self.pending.pop(index, "")

    def held_back_chunk(self, last: dict[str, Any]) -> dict[str, Any] | None:
        """At the end of a stream whose choices did not all finish: one more chunk (shaped like `last`, the
        stream's last) with what is still held back, so none of the reply is lost; None when nothing is."""
        held = {index: text for index, text in self.pending.items() if text}
        self.pending.clear()
        if not held:
            return None
        chat = last.get("object") != "text_completion"
        chunk = {k: last[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in last}
        chunk["choices"] = [{"index": index, "delta": {"content": text}, "finish_reason": None} if chat else
                            {"index": index, "text": text, "finish_reason": None} for index, text in held.items()]
        return chunk


def cut_stops_in_chunk(chunk: dict[str, Any], cutter: StreamedStopCutter) -> None:
    """Cut a streamed chat or text completion chunk in place; a choice's finish releases what was held back."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        index = choice_index(choice)
        delta = choice.get("delta")
        holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
        text = holder.get(key)
        if isinstance(text, str) and text:
            holder[key] = cutter.feed(index, text)
        if choice.get("finish_reason"):
            rest = cutter.flush(index)
            if rest:
                holder[key] = (holder.get(key) or "") + rest
            if index in cutter.stopped:
                choice["finish_reason"] = "stop"
