"""How uncertain the model is at one position, from what an engine returns: the top-k log-probabilities.

Engines give the k most likely next tokens (k ≤ 20 on llama.cpp, pre-sampling), not the whole distribution. The
leftover mass r = 1 − Σp belongs to tokens ranked below the k-th, so each of them has at most p_k (the smallest
listed probability). Completing the distribution two ways bounds its entropy:

  low   the tail as concentrated as the ranking allows: ⌊r / p_k⌋ tokens of p_k and one of the remainder
        (entropy is concave, so fewer, larger pieces give the least);
  high  the tail spread evenly over the rest of the vocabulary (`vocab_size` − k tokens).

The estimate used to classify a position is the low completion: it is what the listed probabilities and the
ranking imply, with no guess about the vocabulary, and equals the true entropy when the tail is empty. Its
varentropy (the variance of the surprise −ln p) is computed on the same completion. With k = 20 listed tokens and
no tail, entropy cannot exceed ln 20 ≈ 3.0 nats, so entropix's thresholds (set on full logits over 128k tokens)
do not transfer: `ttc-proxy calibrate` measures each model's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .framework import Token

Regime = Literal["flowing", "careful", "fork", "misty", "middle"]

# entropix's names for its quadrants: low/low flows on, high entropy/low varentropy treads carefully, low
# entropy/high varentropy is a fork in the path, high/high is mist; anything else is the adaptive middle.
REGIMES: tuple[Regime, ...] = ("flowing", "careful", "fork", "misty", "middle")
DEFAULT_VOCAB_SIZE = 131_072  # for the upper bound only, when the model's vocabulary size is not known


@dataclass(frozen=True)
class Uncertainty:
    """Entropy (nats) and varentropy (nats²) at one position, with the bounds the unlisted tail allows."""

    entropy: float
    varentropy: float
    entropy_low: float
    entropy_high: float
    tail_mass: float  # r = 1 − Σp over the listed alternatives
    listed: int  # how many alternatives the engine listed

    def as_dict(self) -> dict[str, float]:
        return {"entropy": round(self.entropy, 4), "varentropy": round(self.varentropy, 4),
                "entropy_bounds": [round(self.entropy_low, 4), round(self.entropy_high, 4)],
                "tail_mass": round(self.tail_mass, 4)}


def uncertainty(logprobs: Sequence[float], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Uncertainty | None:
    """The uncertainty of a next-token distribution known by its top-k log-probabilities (any order).

    None when no finite log-probability was listed. Probabilities summing slightly above 1 (rounding in the
    engine) are scaled back to 1.
    """
    probs = sorted((math.exp(lp) for lp in logprobs if math.isfinite(lp)), reverse=True)
    probs = [p for p in probs if p > 0]
    if not probs:
        return None
    total = sum(probs)
    if total > 1.0:
        probs = [p / total for p in probs]
        total = 1.0
    tail = max(0.0, 1.0 - total)
    rest = max(1, vocab_size - len(probs))
    low = _concentrated(probs, tail, rest)
    entropy = sum(count * -p * math.log(p) for p, count in low)
    varentropy = sum(count * p * (-math.log(p) - entropy) ** 2 for p, count in low)
    high = _entropy(probs) + (-tail * math.log(tail / rest) if tail > 0 else 0.0)
    return Uncertainty(entropy, varentropy, entropy, max(entropy, high), tail, len(probs))


def token_uncertainty(token: Token, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Uncertainty | None:
    """The uncertainty of the distribution a generated token was drawn from (its listed alternatives)."""
    if not token.top:
        return None
    return uncertainty([a.logprob for a in token.top], vocab_size)


def _concentrated(probs: Sequence[float], tail: float, room: int) -> list[tuple[float, int]]:
    """The listed probabilities plus the tail in pieces no larger than the smallest listed one, as (probability,
    count) pairs. At most `room` such pieces (the unlisted tokens): an engine's rounding (a top token reported at
    p = 1 − 6e-8 in float32 beside alternatives of 1e-16) can leave a tail that no real distribution of that
    ranking holds, and billions of pieces; what is left then is one larger piece, which only lowers the bound."""
    smallest = probs[-1]
    completed = [(p, 1) for p in probs]
    if tail <= 1e-12:
        return completed
    whole = min(int(tail // smallest), room)
    if whole:
        completed.append((smallest, whole))
    remainder = tail - whole * smallest
    if remainder > 1e-12:
        completed.append((remainder, 1))
    return completed


def _entropy(probs: Sequence[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


class Thresholds(BaseModel):
    """Where entropy and varentropy count as low or high, for one model (written by `ttc-proxy calibrate`).

    The defaults are for a model nobody calibrated: quartiles measured on SmolLM2-135M over 20 listed
    alternatives, which are at least of the right scale for any 20-alternative engine (ln 20 ≈ 3.0 caps entropy).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    low_entropy: float = Field(default=0.1, ge=0, description="entropy at or below this is low (nats)")
    high_entropy: float = Field(default=1.5, ge=0, description="entropy at or above this is high (nats)")
    low_varentropy: float = Field(default=0.5, ge=0, description="varentropy at or below this is low (nats²)")
    high_varentropy: float = Field(default=2.5, ge=0, description="varentropy at or above this is high (nats²)")

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.low_entropy > self.high_entropy:
            raise ValueError("low_entropy must not exceed high_entropy")
        if self.low_varentropy > self.high_varentropy:
            raise ValueError("low_varentropy must not exceed high_varentropy")
        return self

    def regime(self, measured: Uncertainty) -> Regime:
        """entropix's quadrants, tested in its order; a position in none of them is the middle."""
        entropy, varentropy = measured.entropy, measured.varentropy
        if entropy <= self.low_entropy and varentropy <= self.low_varentropy:
            return "flowing"
        if entropy >= self.high_entropy and varentropy <= self.low_varentropy:
            return "careful"
        if entropy <= self.high_entropy and varentropy >= self.high_varentropy:
            return "fork"
        if entropy >= self.high_entropy and varentropy >= self.high_varentropy:
            return "misty"
        return "middle"
