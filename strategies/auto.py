"""`auto`: a cascade chosen from measurements. Runs a policy's first stage; when the stage's signal clears its
threshold the answer returns, else the next stage runs, reusing what earlier stages drew.

The policy (strategies.policy) is the model's policy file (config `strategies.policies`, written by `ttc-proxy
tune`), a `policy` given inline, or the built-in default cascade. Reuse: a stage that runs over another strategy
(`bon:n=16>cot`) takes the answers of earlier runs of that strategy (a first `cot` stage's answer, an earlier
`bon:n=4>cot`'s four `cot` runs) as its first runs and draws only the rest.

With tools (an agent's request), a stage runs only what compares tool calls (Strategy.tool_calls): its outer
strategies that do (`bon:n=8>cot` runs as `bon:n=8`, sampling calls directly), else TOOL_STAGE_SPEC. The stop signals
then read tool-call candidates: agreement on name and canonical arguments, the chosen reply's logprob.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from .framework import (
    BudgetExceeded,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyError,
    StrategyParams,
    StrategyResult,
    StrategySpec,
    Usage,
)
from .policy import CascadePolicy, SpecModel, Stage, default_policy, stage_signals
from .stages import STAGE_STRATEGIES
from .toolcalls import asks_for_tools, describe_tool_calls

SIGNAL_TOP_LOGPROBS = 5  # alternatives asked per token of a stage's answer (what bon's confidence scores use)

# What a stage with nothing that compares tool calls (`cot`, `think`, `mcts`, ...) becomes on a request with tools:
# self-consistency over the calls, in waves, ending after the first three samples when they all agree.
TOOL_STAGE_SPEC = SpecModel(strategy="sc", params={"n": 5, "adaptive": True, "first_wave": 3})


class AutoParams(StrategyParams):
    budget: int | None = Field(
        default=None, ge=1, description="tokens per request the operating point may spend on average (default: "
                                        "the policy's default point)")
    policy: CascadePolicy | None = Field(
        default=None, description="the cascade (default: the model's policy file named in strategies.policies, "
                                  "else the built-in default cascade)")


class RunBank:
    """Answers of runs of a strategy drawn by earlier stages, by the strategy's description."""

    def __init__(self) -> None:
        self.runs: dict[str, list[Candidate]] = {}

    def add(self, spec: StrategySpec, answer: Candidate) -> None:
        self.runs.setdefault(spec.describe(), []).append(answer)


class ReusingContext:
    """A stage's context: the run's own, over the stage's inner strategy, whose runs come first from the bank.

    Every run of the inner strategy that is drawn afresh is kept for later stages; reused ones cost nothing. The
    stage's emits go nowhere (auto emits its final answer itself)."""

    def __init__(self, ctx: StrategyContext, over: StrategySpec, available: Sequence[Candidate]) -> None:
        self._ctx = ctx
        self._over = over
        self._available = list(available)
        self.reused = 0
        self.drawn: list[Candidate] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    @property
    def over(self) -> StrategySpec:
        return self._over

    async def emit(self, text: str) -> None:
        return None

    async def run_strategy(self, spec: StrategySpec | str, params: Mapping[str, Any] | None = None, *,
                           messages: Sequence[dict[str, Any]] | None = None,
                           budget: Mapping[str, float] | None = None,
                           sampling: Mapping[str, Any] | None = None) -> StrategyResult:
        same = (isinstance(spec, StrategySpec) and not params and messages is None
                and spec.describe() == self._over.describe())
        if same and self._available:
            self.reused += 1
            return StrategyResult(choices=[self._available.pop(0)], details={"reused": True}, usage=Usage())
        result = await self._ctx.run_strategy(spec, params, messages=messages, budget=budget, sampling=sampling)
        if same and result.choices:
            self.drawn.append(result.answer)
        return result


class Auto(Strategy[AutoParams]):
    slug = "auto"
    description = ("a cascade tuned on measurements: a cheap stage first, a costlier one only when the cheap "
                   "answer's signal is weak, reusing what earlier stages drew")

    tool_calls = True

    async def run(self, ctx: StrategyContext, params: AutoParams) -> StrategyResult:
        policy = params.policy or default_policy()
        tools = asks_for_tools(ctx.sampling.tools)
        point, why = policy.point_for(params.budget, ctx.budget.tokens)
        source = (policy.model_extra or {}).get("source") or f"tuned for {policy.model}" + (
            f" on {policy.created}" if policy.created else "")
        await ctx.progress(f"policy: {source}; operating point for {point.budget:g} tokens ({why}), "
                           f"{len(point.stages)} stage{'s' if len(point.stages) > 1 else ''}")
        bank = RunBank()
        stages: list[dict[str, Any]] = []
        answer: StrategyResult | None = None
        stopped = "no stage ran"
        budget_exhausted = False
        ran: dict[str, int] = {}  # what each stage that ran ran -> its number
        for number, stage in enumerate(point.stages, start=1):
            last = number == len(point.stages)
            record: dict[str, Any] = {"stage": stage.name}
            stages.append(record)
            instead = ""
            if tools:
                stage, instead = _stage_with_tools(stage, record, ran)
                if "skipped" in record:
                    await ctx.progress(f"stage {number}: {record['stage']} skipped ({record['skipped']})")
                    stopped = f"stage {number} would repeat stage {ran[stage.name]} with tools"
                    continue
            missing = _missing_capabilities(ctx, stage, STAGE_STRATEGIES)
            if missing:
                record["skipped"] = f"the backend lacks {', '.join(missing)}"
                await ctx.progress(f"stage {number}: {stage.name} skipped ({record['skipped']})")
                continue
            await ctx.progress(f"stage {number}/{len(point.stages)}: {stage.name}{instead}")
            tokens_before, calls_before = ctx.budget.tokens, ctx.budget.calls
            try:
                result, reused = await _run_stage(ctx.span(f"stage {number}", strategy=stage.name), stage, bank,
                                                  STAGE_STRATEGIES)
            except BudgetExceeded:
                if answer is None:
                    raise
                budget_exhausted = True
                record["stopped"] = "budget"
                stopped = f"the budget ran out in stage {number}; the answer is stage {number - 1}'s"
                await ctx.progress(stopped)
                break
            signals = stage_signals(result)
            answer = result
            ran.setdefault(stage.name, number)
            budget_exhausted = budget_exhausted or result.budget_exhausted or ctx.budget.exhausted
            record.update(answer=shown(result.answer), signals={k: round(v, 6) for k, v in signals.items()},
                          tokens=tokens_before - ctx.budget.tokens, calls=calls_before - ctx.budget.calls,
                          **({"reused_runs": reused} if reused else {}))
            if stage.stop is not None:
                record["rule"] = {"signal": stage.stop.signal, "threshold": stage.stop.threshold}
            if last:
                record["decision"] = "last stage"
                stopped = f"stage {number} is the last"
            elif stage.stop is not None and stage.stop.stops(signals):
                record["decision"] = "stop"
                stopped = (f"stage {number}'s {stage.stop.signal} {signals[stage.stop.signal]:.3g} >= "
                           f"{stage.stop.threshold:.3g}")
            else:
                record["decision"] = "continue"
            await ctx.progress(_stage_line(number, stage, result, signals, record["decision"]))
            if record["decision"] != "continue":
                break
        if answer is None:
            raise StrategyError("auto: no stage of the policy could run on this backend: "
                                + "; ".join(f"{s['stage']}: {s.get('skipped', '')}" for s in stages))
        if stopped == "no stage ran":
            stopped = "the stages after the last answer could not run on this backend"
        await ctx.emit(answer.answer.text)
        details = {
            "policy": source,
            "operating_point": {"budget": point.budget, "chosen_by": why, "expected": point.expected},
            "stages": stages,
            "stopped": stopped,
            "answer": shown(answer.answer),
        }
        return StrategyResult(choices=[answer.answer], details=details, budget_exhausted=budget_exhausted)


def _stage_with_tools(stage: Stage, record: dict[str, Any], ran: Mapping[str, int]) -> tuple[Stage, str]:
    """The stage a tool request runs in its place, and the progress note saying so; `record` gets what ran
    instead and why, and `skipped` when that is what an earlier stage already ran (the same vote again with new
    samples is no escalation)."""
    planned = stage.name
    stage, replaced = stage_for_tools(stage, STAGE_STRATEGIES)
    if replaced is None:
        return stage, ""
    record.update(ran=stage.name, replaced=replaced)
    if stage.name in ran:
        record["skipped"] = f"with tools it runs as stage {ran[stage.name]} did ({stage.name})"
    return stage, f" (in place of {planned}: {replaced})"


def shown(answer: Candidate) -> str:
    """A stage's answer as details and progress show it: its tool calls when it made any, else its text."""
    return describe_tool_calls(answer.tool_calls) if answer.tool_calls else answer.text


def stage_for_tools(stage: Stage, builtins: Mapping[str, type[Strategy]]) -> tuple[Stage, str | None]:
    """The stage as it runs on a request with tools, and why it differs from the policy's (None: it does not). It
    keeps its outer strategies that compare tool calls, up to the first that does not (`bon:n=8>cot` becomes
    `bon:n=8`, which samples the calls itself); with none kept it becomes TOOL_STAGE_SPEC. The stop rule stays."""
    kept: list[SpecModel] = []
    spec: SpecModel | None = stage.spec
    while spec is not None:
        strategy = builtins.get(spec.strategy)
        if strategy is None or not strategy.tool_calls:
            break
        kept.append(spec)
        spec = spec.over
    if spec is None:
        return stage, None
    reason = "does not take tools" if spec.strategy in builtins else "is not a built-in known to compare tool calls"
    replacement: SpecModel | None = None
    for outer in reversed(kept):
        replacement = SpecModel(strategy=outer.strategy, params=dict(outer.params), over=replacement)
    if replacement is None:
        replacement = TOOL_STAGE_SPEC
    why = f"{spec.strategy} {reason}; tool calls are compared by {replacement.spec().describe()}"
    return Stage(name=replacement.spec().describe(), spec=replacement, stop=stage.stop), why


def _missing_capabilities(ctx: StrategyContext, stage: Stage, builtins: Mapping[str, type[Strategy]]) -> list[str]:
    """Capabilities a stage's outermost strategy needs (when it is a built-in: the others are checked by the
    proxy when they run) that the backend lacks."""
    strategy = builtins.get(stage.spec.strategy)
    if strategy is None:
        return []
    params = strategy.Params.model_validate(stage.spec.params)
    return [c for c in strategy.requirements(params) if not ctx.supports(c)]


async def _run_stage(ctx: StrategyContext, stage: Stage, bank: RunBank,
                     builtins: Mapping[str, type[Strategy]]) -> tuple[StrategyResult, int]:
    """One stage's result and how many earlier runs it reused. A stage over another strategy runs here, on a
    context that serves the inner strategy's earlier runs first; any other stage is an ordinary nested run (with
    logprobs asked for its answer where the engine has them, for the logprob signal)."""
    spec = stage.spec.spec()
    outer = builtins.get(spec.slug)
    if spec.over is not None and outer is not None and outer.composable:
        reusing = ReusingContext(ctx, spec.over, bank.runs.get(spec.over.describe(), []))
        result = await outer().run(reusing, outer.Params.model_validate(spec.params))  # type: ignore[arg-type]
        for drawn in reusing.drawn:
            bank.add(spec.over, drawn)
        return result, reusing.reused
    sampling = {"top_logprobs": SIGNAL_TOP_LOGPROBS} if ctx.supports("logprobs") else None
    result = await ctx.run_strategy(spec, sampling=sampling)
    if result.choices:
        bank.add(spec, result.answer)
    return result, 0


def _stage_line(number: int, stage: Stage, result: StrategyResult, signals: Mapping[str, float],
                decision: str) -> str:
    signals_shown = ", ".join(f"{k} {v:.3g}" for k, v in signals.items()) or "no signals"
    rule = ""
    if stage.stop is not None and decision != "last stage":
        rule = f"; stop when {stage.stop.signal} >= {stage.stop.threshold:.3g}"
    return f"stage {number} → {shown(result.answer)!r} ({signals_shown}{rule}): {decision}"
