"""Best-of-n: draw n candidates, pick one with a selectable selector.

Selectors (the picking itself is in strategies.selection, pure and usable offline):
  vote        majority over extracted answers (as sc)
  confidence  DeepConf token confidence: the candidate whose trace is most confident (needs logprobs)
  weighted    confidence-weighted vote: the answer with the most summed confidence (needs logprobs)
  judge       the model itself verifies each distinct answer (pointwise: P(yes); pairwise: a knockout)
  verifier    a user check (regex and/or JSON schema); with `tools`, a tool call must name an offered function
              and its arguments satisfy that function's parameter schema; the fallback picks among those that pass

Candidates are plain samples (n in one go), or, composed over another strategy (`bon:n=4>cot`), the answers of n
concurrent runs of it (framework.draw). Scores come from strategies.scoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from .answers import answer_text
from .formats import CheckResult, check_all
from .framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    BudgetExceeded,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyInputError,
    StrategyResult,
    Sampling,
    draw,
    gather_all,
)
from .scoring import CheckParams, ConfidenceSpec, Judge
from .toolcalls import check_tool_calls
from .selection import (
    CONFIDENCE_SELECTORS,
    Pool,
    Selection,
    answer_scores,
    representative,
    select,
    select_by_answer_scores,
    select_verified,
    tournament,
)


class BestOfNParams(CheckParams):
    limits = {"n": "samples"}

    n: int = Field(default=8, ge=1, description="candidates to draw")
    select: Literal["vote", "confidence", "weighted", "judge", "verifier"] = Field(
        default="confidence", description="how to pick: vote | confidence | weighted | judge | verifier. Default: "
                                          "the best measured on the dev set (with confidence=logprob), see "
                                          "docs/results/2026-12-07-arith-dev.md")
    temperature: float | None = Field(
        default=None, gt=0, le=2, description="sampling temperature when the request has none above 0 (default 0.8)")
    min_success: int = Field(default=1, ge=1, description="fail unless at least this many candidates succeed")
    confidence: Literal["mean", "tail", "lowest_group", "logprob"] = Field(
        default="logprob", description="trace confidence: DeepConf's mean | tail (last window) | lowest_group "
                                       "(sliding), or logprob (exp of the mean sampled-token log-probability). "
                                       "Default: the best measured on the dev set (logprob ahead of lowest_group at "
                                       "n=8, n=16 and over cot), see docs/results/2026-12-07-arith-dev.md")
    window: int = Field(default=16, ge=1, description="tokens per group/tail; a shorter trace is one group")
    top_k: int = Field(default=5, ge=2, le=20, description="top logprobs per token for token confidence")
    count_truncated: bool = Field(
        default=False, description="let replies cut off by max_tokens compete; by default they do only when no "
                                   "candidate finished")
    fallback: Literal["auto", "vote", "confidence", "weighted", "first"] = Field(
        default="auto", description="breaks ties (and picks among verified candidates); auto: weighted when the "
                                    "backend has logprobs (vote for select=weighted), else vote")
    judge_mode: Literal["pointwise", "pairwise"] = Field(
        default="pointwise", description="judge: verify each answer (pointwise) or a knockout of A-vs-B calls")
    judge_swap: bool = Field(default=True, description="pairwise judge: ask each pair in both orders")
    judge_model: str | None = Field(
        default=None, description="judge: a model served by any configured backend (default: the sampled model)")

    def needs_logprobs(self) -> bool:
        return bool({self.select, self.fallback} & CONFIDENCE_SELECTORS)


def resolve_fallback(select: str, fallback: str, has_logprobs: bool) -> str:
    """auto: weighted when there are logprobs (vote when weighted is the selector), else vote (first when vote
    is the selector). A fallback equal to the selector would decide nothing, so it becomes `first`."""
    if fallback == "auto":
        if has_logprobs:
            fallback = "vote" if select == "weighted" else "weighted"
        else:
            fallback = "first" if select == "vote" else "vote"
    return "first" if fallback == select else fallback


# ---------------------------------------------------------------- the strategy


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


class BestOfN(Strategy[BestOfNParams]):
    slug = "bon"
    description = "best-of-n: n candidates, one picked by vote, token confidence, weighted vote, judge or verifier"
    composable = True
    tool_calls = True

    @classmethod
    def references(cls, params: BestOfNParams) -> dict[str, list[str]]:
        return params.references()

    @classmethod
    def fan_out(cls, params: BestOfNParams) -> int:
        return params.n

    @classmethod
    def check_request(cls, params: BestOfNParams, sampling: Sampling) -> None:
        if params.select == "verifier" and not params.has_check() and not sampling.tools.get("tools"):
            raise StrategyInputError("select=verifier needs a check: regex, json_schema and/or http_verifier, or "
                                     "the request's tools (their parameter schemas check the tool calls)")

    @classmethod
    def requirements(cls, params: BestOfNParams) -> dict[str, str]:
        if params.needs_logprobs():
            which = " and ".join(f"{k}={v}" for k, v in (("select", params.select), ("fallback", params.fallback))
                                 if v in CONFIDENCE_SELECTORS)
            return {"logprobs": f"{which} scores candidates by token logprobs; select=vote, judge or verifier "
                                f"do without"}
        return {}

    async def run(self, ctx: StrategyContext, params: BestOfNParams) -> StrategyResult:
        has_logprobs = ctx.supports("logprobs")
        fallback = resolve_fallback(params.select, params.fallback, has_logprobs)
        want_logprobs = params.select in CONFIDENCE_SELECTORS or fallback in CONFIDENCE_SELECTORS
        temperature = ctx.sampling.sampling_temperature(params.temperature or DEFAULT_SAMPLING_TEMPERATURE)
        spec = ConfidenceSpec(params.confidence, params.window, params.top_k)
        source = f"runs of {ctx.over.describe()}" if ctx.over else f"samples at temperature {temperature:g}"
        await ctx.progress(f"drawing {params.n} {source}; selecting by {_describe(params, fallback)}")
        candidates = await draw(ctx, params.n, temperature=temperature, logprobs=want_logprobs,
                                top_logprobs=params.top_k if want_logprobs else None,
                                min_success=min(params.min_success, params.n))
        pool = Pool.of(candidates, spec if want_logprobs else None, count_truncated=params.count_truncated)

        selector, notes = params.select, []
        budget_exhausted = False
        if selector in CONFIDENCE_SELECTORS and not pool.has_confidence:
            notes.append(f"the backend returned no logprobs; {selector} fell back to vote")
            selector = "vote"
        if fallback in CONFIDENCE_SELECTORS and not pool.has_confidence:
            fallback = "vote"
        for line in notes:
            await ctx.progress(line)

        details: dict[str, Any] = {
            "selector": selector,
            "fallback": fallback,
            "temperature": temperature if ctx.over is None else None,
            "samples": len(candidates),
            "source": "samples" if ctx.over is None else ctx.over.describe(),
        }
        if want_logprobs:
            details["confidence"] = {"variant": params.confidence, "window": params.window, "top_k": params.top_k}
        if notes:
            details["notes"] = notes
        counted = set(pool.counted())
        per_candidate: list[dict[str, Any]] = [
            {"answer": answer, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
             "counted": i in counted, **({"confidence": conf} if conf is not None else {})}
            for i, (c, answer, conf) in enumerate(zip(candidates, pool.answers, pool.confidences))
        ]

        if selector == "verifier":
            selection = await self._select_verified(ctx, params, spec, candidates, pool, fallback, per_candidate,
                                                    details)
        elif selector == "judge":
            await self._candidate_lines(ctx, spec, per_candidate)
            selection, budget_exhausted = await self._select_by_judge(ctx, params, pool, fallback, per_candidate,
                                                                      details)
        else:
            await self._candidate_lines(ctx, spec, per_candidate)
            selection = select(pool, selector, fallback=fallback)

        winner = candidates[selection.index]
        if selection.tied:
            how = "kept" if selector == "verifier" else "tied"
            await ctx.progress(f"{how}: {', '.join(selection.tied)} → {selection.broken_by} picks")
        await ctx.progress(_winner_line(selection, pool, selector, details, spec))
        details.update(
            answer=selection.answer,
            winner={"index": selection.index, "answer": selection.answer,
                    "confidence": pool.confidences[selection.index]},
            scores={a: (v if math.isfinite(v) else None) for a, v in selection.scores.items()},
            tie={"answers": list(selection.tied), "broken_by": selection.broken_by} if selection.tied else None,
            candidates=per_candidate,
        )
        return StrategyResult(choices=[winner], details=details, budget_exhausted=budget_exhausted)

    async def _select_verified(self, ctx: StrategyContext, params: BestOfNParams, spec: ConfidenceSpec,
                               candidates: list[Candidate], pool: Pool, fallback: str,
                               per_candidate: list[dict[str, Any]], details: dict[str, Any]) -> Selection:
        """select=verifier: the fallback picks among the candidates that pass the checks, or over all if none does."""
        # Runs in the event loop: a pathological client regex holds it (CPython's re keeps the GIL, so a
        # thread would not help). Checks are linear for ordinary patterns.
        results = _verdicts(candidates, params, ctx.sampling.tools.get("tools"))
        verdicts = [r.passed for r in results]
        for entry, result in zip(per_candidate, results):
            entry["passed"] = result.passed
            if not result.passed:
                entry["reason"] = result.reason
        if params.http_verifier:
            verdicts = await self._http_verdicts(ctx, params.http_verifier, candidates, pool, verdicts, per_candidate)
        await self._candidate_lines(ctx, spec, per_candidate)
        selection, over_all = select_verified(pool, verdicts, fallback)
        details["verifier"] = {"passed": sum(verdicts), "fallback_over_all": over_all,
                               **({"http_verifier": params.http_verifier} if params.http_verifier else {}),
                               **({"regex": params.regex} if params.regex else {}),
                               **({"json_schema": True} if params.json_schema is not None else {})}
        if over_all:
            await ctx.progress(f"no candidate passes the check; {fallback} picks over all {len(candidates)}")
        return selection

    async def _select_by_judge(self, ctx: StrategyContext, params: BestOfNParams, pool: Pool, fallback: str,
                               per_candidate: list[dict[str, Any]],
                               details: dict[str, Any]) -> tuple[Selection, bool]:
        """select=judge: (the judge's pick, or the fallback's if the budget ran out while judging; whether it did)."""
        try:
            selection = await self._judge(ctx, params, pool, fallback, details)
        except BudgetExceeded:
            await ctx.progress(f"the budget ran out while judging; {fallback} picks instead")
            details["judge"] = {"mode": params.judge_mode, "stopped": "budget"}
            return select(pool, fallback), True
        if "scores" in details.get("judge", {}):
            for entry in per_candidate:
                entry["p_yes"] = details["judge"]["scores"].get(entry["answer"])
        return selection, False

    @staticmethod
    async def _candidate_lines(ctx: StrategyContext, spec: ConfidenceSpec, per_candidate: list[dict[str, Any]]) -> None:
        for i, entry in enumerate(per_candidate, start=1):
            facts = [] if entry["counted"] else ["cut off by max_tokens: not counted"]
            if "confidence" in entry:
                facts.append(f"score {_fmt(spec.unit(entry['confidence']))}")
            if "passed" in entry:
                facts.append("passes the check" if entry["passed"] else f"fails the check: {entry['reason']}")
            await ctx.progress(f"sample {i}/{len(per_candidate)} → {entry['answer']}"
                               + (f" ({', '.join(facts)})" if facts else ""))

    @staticmethod
    async def _http_verdicts(ctx: StrategyContext, verifier: str, candidates: Sequence[Candidate], pool: Pool,
                             verdicts: list[bool], per_candidate: list[dict[str, Any]]) -> list[bool]:
        """The HTTP verifier's word on each distinct answer whose candidates passed the local checks (once each)."""
        answers = list(dict.fromkeys(a for a, ok in zip(pool.answers, verdicts) if ok))
        first = {a: pool.answers.index(a) for a in answers}
        results = await gather_all(ctx.verify(verifier, candidates[first[a]].text, a) for a in answers)
        passed = dict(zip(answers, results))
        out = []
        for entry, answer, ok in zip(per_candidate, pool.answers, verdicts):
            verdict = ok and passed.get(answer, False)
            if ok and not verdict:
                entry["reason"] = f"rejected by verifier {verifier!r}"
            entry["passed"] = verdict
            out.append(verdict)
        return out

    @staticmethod
    async def _judge(ctx: StrategyContext, params: BestOfNParams, pool: Pool, fallback: str,
                     details: dict[str, Any]) -> Selection:
        distinct = pool.distinct_answers()
        judge = Judge(ctx.for_model(params.judge_model) if params.judge_model else ctx)
        if len(distinct) == 1:
            details["judge"] = {"mode": params.judge_mode, "calls": 0, "skipped": "one distinct answer"}
            return select_by_answer_scores(pool, {distinct[0]: 1.0}, "judge")
        if params.judge_mode == "pointwise":
            await ctx.progress(f"judging {len(distinct)} distinct answers")
            raw = await judge.pointwise(distinct)
            for answer in distinct:
                await ctx.progress(f"judge: {answer} → P(yes) {_fmt(raw[answer])}")
            # An answer the judge said neither yes nor no to counts as undecided (0.5).
            scores = {a: (p if p is not None else 0.5) for a, p in raw.items()}
            details["judge"] = {"mode": "pointwise", "calls": judge.calls, "model": params.judge_model or "same as the candidates",
                                "logprobs": judge.logprobs, "scores": raw}
            return select_by_answer_scores(pool, scores, "judge", fallback=fallback)
        seeds = list(answer_scores(pool, fallback))  # best seed first, by the fallback's ranking
        await ctx.progress(f"judging {len(distinct)} distinct answers in a knockout, seeded by {fallback}")

        async def compare(a: str, b: str) -> float:
            p = await judge.compare(a, b, params.judge_swap)
            await ctx.progress(f"judge: {a} vs {b} → P({a}) {_fmt(p)}")
            return p

        champion, matches = await tournament(seeds, compare)
        wins = {a: 0.0 for a in seeds}
        for match in matches:
            wins[match.winner] += 1
        details["judge"] = {
            "mode": "pairwise", "calls": judge.calls, "model": params.judge_model or "same as the candidates", "logprobs": judge.logprobs,
            "swap": params.judge_swap,
            "seeds": seeds,
            "matches": [{"round": m.round, "a": m.first, "b": m.second, "p_a": m.p_first, "winner": m.winner}
                        for m in matches],
        }
        return Selection(representative(pool, champion), champion, "judge", wins)


def _verdicts(candidates: Sequence[Candidate], params: BestOfNParams, tools: Any) -> list[CheckResult]:
    """Each candidate against the checks: a tool-calling reply against the offered tools' parameter schemas, a
    text reply against the regex / JSON schema (its answer, thinking set apart). With tools and no text check, a
    reply that calls no tool has nothing that passes."""
    texts = check_all([answer_text(c.text) for c in candidates], params.regex, params.json_schema)
    results = []
    for candidate, text in zip(candidates, texts):
        if candidate.tool_calls:
            results.append(check_tool_calls(candidate.tool_calls, tools))
        elif tools and params.regex is None and params.json_schema is None:
            results.append(CheckResult(False, "no tool call"))
        else:
            results.append(text)
    return results


def _describe(params: BestOfNParams, fallback: str) -> str:
    if params.select in CONFIDENCE_SELECTORS:
        text = (f"{params.select} ({params.confidence} token confidence, window {params.window}, "
                f"top-{params.top_k})")
    elif params.select == "judge":
        text = f"judge ({params.judge_mode})"
    else:
        text = params.select
    return f"{text}, ties to {fallback}"


def _winner_line(selection: Selection, pool: Pool, selector: str, details: dict[str, Any],
                 spec: ConfidenceSpec) -> str:
    """Scores on the [0, 1] scale (ConfidenceSpec.unit); a weighted vote as the winner's share of the weight."""
    counted = pool.counted()
    answer, total = selection.answer, len(counted)
    votes = sum(1 for i in counted if pool.answers[i] == answer)
    if selector == "vote":
        return f"winner: {answer}, {votes:g} of {total} votes"
    if selector == "confidence":
        return (f"winner: {answer} (sample {selection.index + 1}, score "
                f"{_fmt(spec.unit(pool.confidences[selection.index]))})")
    if selector == "weighted":
        total_weight = sum(selection.scores.values())
        share = selection.scores.get(answer, 0.0) / total_weight if total_weight > 0 else 0.0
        return f"winner: {answer}, {share:.0%} of the confidence-weighted vote ({votes} of {total} votes)"
    if selector == "judge":
        judge = details.get("judge", {})
        if judge.get("mode") == "pairwise" and "matches" in judge:
            return f"winner: {answer}, won the knockout of {len(judge['seeds'])} answers"
        if "scores" in judge:
            return f"winner: {answer}, P(yes) {_fmt(judge['scores'].get(answer))}"
        return f"winner: {answer}, the only answer ({votes} of {total})"
    verifier = details.get("verifier", {})
    return f"winner: {answer}, {verifier.get('passed', 0)} of {total} candidates pass the check"
