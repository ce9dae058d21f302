"""AB-MCTS (adaptive-branching tree search) with Sakana's treequest: ABMCTSA decides, by Thompson sampling at each
node, whether to go wider (a new child of that node) or deeper (into one of its children).

Nodes are whole answers (`level=answer`: a child of the root is a fresh answer, a child of an answer refines it
given its score and the other answers found so far) or reasoning steps (`level=step`: a child continues its
parent's text to the next `delimiter`, n ways from one prefix; a step that ends the reply is a leaf). Each new node
is scored in [0, 1] by a scorer from strategies.scoring; the search runs `iterations` rounds of `batch` expansions,
each round concurrently, siblings of one parent drawn together (one `n` request where the engine has one and the
request has no seed; with a seed each sample is its own call, so it repeats). The answer
is the best node (or the vote over nodes); when the budget runs out, the best node so far.

With `models` (a list; `mcts:models=a+b-<model>` in a model name), each model is a treequest action: at every
node Thompson sampling also chooses which model expands it (treequest's multi-LLM AB-MCTS), each model's calls go
to the backend that serves it, the run's one budget covers them all, and every node records the model that made it.

The search itself is treequest's ask/tell API: we own the tree state, ask for a batch of trials, run them, tell the
scores. treequest draws from numpy's global random state; a run keeps its own state (seeded from the request
seed) and swaps it in only while asking, which never awaits, so concurrent runs neither disturb nor repeat each
other and a seeded run repeats exactly.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from .answers import extract_answer
from .framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    BudgetExceeded,
    CallOptions,
    Candidate,
    ModelNames,
    Strategy,
    StrategyContext,
    StrategyError,
    StrategyInputError,
    StrategyResult,
    draw,
    gather_all,
    gather_successes,
)
from .scoring import SCORER_NAMES, UNINFORMED, CheckParams, Scorer, make_scorer, needs_logprobs
from .selection import Pool, select

REFINE_PROMPT = ("Your answer above was scored {score:.2f} out of 1 by a checker. Answers found so far: {others}. "
                 "Check your answer. If it is wrong, correct it; if it is right, give it again. Reply with the answer.")
GENERATE = "generate"  # the one treequest action of a one-model search: what it generates depends on the node


class MctsParams(CheckParams):
    limits = {"iterations": "iterations", "batch": "samples"}

    iterations: int = Field(default=4, ge=1, description="rounds of the search")
    batch: int = Field(default=4, ge=1, description="nodes expanded concurrently in each round")
    level: Literal["auto", "answer", "step"] = Field(
        default="auto", description="nodes are whole answers or reasoning steps; auto: step where it can run (the "
                                    "backend continues text and mcts runs over no other strategy), else answer. "
                                    "Default: the best measured on the dev set, see "
                                    "docs/results/2026-12-07-search.md")
    score: Literal["logprob", "confidence", "agreement", "judge", "verifier"] = Field(
        default="logprob", description=f"node scorer: {' | '.join(SCORER_NAMES)} (see strategies.scoring)")
    select: Literal["best", "vote", "weighted"] = Field(
        default="best", description="the answer: the best-scored node, the most common answer among nodes, or the "
                                    "answer with the highest summed score")
    max_depth: int = Field(default=3, ge=1, description="answer: refinements in a chain; step: steps in a reply")
    temperature: float | None = Field(
        default=None, gt=0, le=2, description="sampling temperature when the request has none above 0 (default 0.8)")
    delimiter: str = Field(default="\n", min_length=1, description="step: where a step ends")
    step_tokens: int = Field(default=64, ge=1, description="step: max tokens of one step")
    top_k: int = Field(default=5, ge=2, le=20, description="confidence scorer: top logprobs per token")
    judge_model: str | None = Field(default=None, description="judge scorer: another model to judge with")
    count_truncated: bool = Field(default=False, description="score answers cut off by max_tokens like others (by "
                                                             "default they score 0: they have no answer yet)")
    prior: Literal["gaussian", "beta"] = Field(default="beta", description="treequest's Thompson-sampling prior")
    models: ModelNames | None = Field(default=None, description="models that expand nodes, chosen per node by "
                                                                "Thompson sampling (`a+b` in a model-name prefix; "
                                                                "default: the request's model alone)")

    @model_validator(mode="after")
    def _consistent(self) -> MctsParams:
        if self.score == "verifier" and not self.has_check():
            raise ValueError("score=verifier needs a check: regex, json_schema and/or http_verifier")
        if self.models is not None and len(set(self.models)) < len(self.models):
            raise ValueError("models: each model once")
        return self

    def references(self) -> dict[str, list[str]]:
        named = super().references()
        if self.models:
            named["models"] = list(dict.fromkeys([*named.get("models", []), *self.models]))
        return named

    def actions(self) -> list[str]:
        """treequest's actions: one per model, or the one generic action."""
        return list(self.models) if self.models else [GENERATE]


@dataclass
class Node:
    """One node of the search: an answer (or the reply up to a step), its score, where it came from."""

    id: int
    parent: int | None  # None: a child of the root
    action: str  # widen | deepen | step | finish | refused
    candidate: Candidate
    score: float
    depth: int
    model: str | None = None  # the model that made it, in a search over several
    terminal: bool = True  # step level: the reply ended here
    answer: str = field(init=False)

    def __post_init__(self) -> None:
        self.answer = extract_answer(self.candidate.text)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "parent": self.parent, "action": self.action, "depth": self.depth,
                "answer": self.answer, "score": round(self.score, 4), "terminal": self.terminal,
                "finish_reason": self.candidate.finish_reason, **({"model": self.model} if self.model else {})}


@dataclass(frozen=True)
class Trial:
    """A treequest trial: expand `parent` (None: the root) with `action` (a model's name, or GENERATE)."""

    trial_id: str
    parent: Node | None
    action: str = GENERATE


class TreeSearch:
    """The treequest algorithm and its state for one run, with the run's own random state."""

    def __init__(self, prior: str, seed: int | None) -> None:
        treequest = importlib.import_module("treequest")  # imported on first use: it loads scipy, slow to import
        self.algorithm = treequest.ABMCTSA(dist_type=prior)
        self.random = np.random.RandomState(seed)
        with self._random():
            self.state = self.algorithm.init_tree()

    @contextmanager
    def _random(self) -> Iterator[None]:
        # Safe only because nothing inside awaits: no other run can draw from numpy's global state meanwhile.
        saved = np.random.get_state()
        np.random.set_state(self.random.get_state())
        try:
            yield
        finally:
            self.random.set_state(np.random.get_state())
            np.random.set_state(saved)

    def ask(self, batch: int, actions: list[str]) -> list[Trial]:
        with self._random():
            self.state, trials = self.algorithm.ask_batch(self.state, batch, actions)
        return [Trial(t.trial_id, t.parent_state, t.action) for t in trials]

    def tell(self, trial: Trial, node: Node) -> None:
        with self._random():
            self.state = self.algorithm.tell(self.state, trial.trial_id, (node, min(1.0, max(0.0, node.score))))


class Mcts(Strategy[MctsParams]):
    slug = "mcts"
    description = "AB-MCTS (treequest ABMCTSA): Thompson sampling decides at each node whether to widen or deepen"
    composable = True

    @classmethod
    def references(cls, params: MctsParams) -> dict[str, list[str]]:
        return params.references()

    @classmethod
    def fan_out(cls, params: MctsParams) -> int:
        return params.iterations * params.batch

    @classmethod
    def requirements(cls, params: MctsParams) -> dict[str, str]:
        needed: dict[str, str] = {}
        if needs_logprobs(params.score):
            needed["logprobs"] = f"score={params.score} scores nodes by token logprobs; agreement or judge do without"
        if params.level == "step":
            needed["continue"] = "level=step continues a node's text to its next step"
        return needed

    async def run(self, ctx: StrategyContext, params: MctsParams) -> StrategyResult:
        if params.level == "step" and ctx.over is not None:
            raise StrategyInputError("mcts level=step continues raw text and cannot run over another strategy; "
                                     "use level=answer")
        if params.level == "auto":
            level = "step" if ctx.over is None and ctx.supports("continue") else "answer"
            params = params.model_copy(update={"level": level})
        search = MctsRun(ctx, params)
        return await search.run()


class MctsRun:
    """One search: the tree, the scorer and the calls that grow it."""

    def __init__(self, ctx: StrategyContext, params: MctsParams) -> None:
        self.ctx = ctx
        self.params = params
        self.temperature = ctx.sampling.sampling_temperature(params.temperature or DEFAULT_SAMPLING_TEMPERATURE)
        self.scorer: Scorer = make_scorer(params.score, variant="lowest_group", top_k=params.top_k,
                                          judge_model=params.judge_model, regex=params.regex,
                                          json_schema=params.json_schema, http_verifier=params.http_verifier)
        self.logprobs = needs_logprobs(params.score)
        self.nodes: list[Node] = []
        self.widened = 0  # fresh answers drawn: the next one is sample `widened` of the run
        self.refused = 0
        self.round_budget_exhausted = False  # a call of the last round was refused by the budget
        self.failure: str | None = None  # why the search stopped early, if a round failed

    async def run(self) -> StrategyResult:
        params, ctx = self.params, self.ctx
        for model in params.models or ():  # the request's backend was checked before the run; the others here
            missing = [c for c in Mcts.requirements(params) if not self._context(model).supports(c)]
            if missing:
                raise StrategyInputError(f"mcts: model {model!r} is served by a backend without {', '.join(missing)}"
                                         f", which these parameters need")
        search = TreeSearch(params.prior, ctx.random_seed)
        by = f", each node expanded by one of {', '.join(params.models)}" if params.models else ""
        await ctx.progress(f"AB-MCTS: {params.iterations} rounds of {params.batch} nodes ({params.level} level), "
                           f"scored by {params.score}{by}")
        budget_exhausted = False
        for round_number in range(1, params.iterations + 1):
            trials = search.ask(params.batch, params.actions())
            try:
                grown = await self._expand(trials, round_number)
            except BudgetExceeded:
                budget_exhausted = True
                break
            except Exception as exc:  # noqa: BLE001 - a failed round ends the search, not the answer found
                if not self.nodes:
                    raise
                self.failure = str(exc)
                await ctx.progress(f"round {round_number} failed ({exc}); answering with the tree so far")
                break
            for trial, node in grown:
                search.tell(trial, node)
            if self.round_budget_exhausted:
                budget_exhausted = True
                break
        return await self._result(budget_exhausted)

    # ---- one round ----

    async def _expand(self, trials: Sequence[Trial], round_number: int) -> list[tuple[Trial, Node]]:
        """Run a round's trials: those expanding the same node share one call (n siblings), all concurrently.
        The new nodes are then numbered parent by parent, in the order treequest asked for them, and scored among
        one pool (the answers so far plus this round's), so the tree does not depend on which call the engine
        answered first."""
        # Trials expanding the same node with the same model share a call.
        groups: dict[tuple[int | None, str], list[Trial]] = {}
        for trial in trials:
            groups.setdefault((trial.parent.id if trial.parent is not None else None, trial.action), []).append(trial)
        growing = [key for key in groups if key[0] is None or self._expandable(self.nodes[key[0]])]

        async def grow(key: tuple[int | None, str]) -> tuple[tuple[int | None, str], list[Candidate], list[str]]:
            candidates, actions = await self._children(self._node(key[0]), len(groups[key]), self._model(key[1]))
            return key, candidates, actions

        results, errors = await gather_successes((lambda k=k: grow(k) for k in growing), min_success=0,
                                                 what="expansion")
        if any(isinstance(e, BudgetExceeded) for e in errors):
            self.round_budget_exhausted = True
        if errors and not results:
            if self.round_budget_exhausted:
                raise next(e for e in errors if isinstance(e, BudgetExceeded))
            raise errors[0]
        fetched = {key: (candidates, actions) for key, candidates, actions in results}
        fresh = [c for key in groups if key in fetched for c in fetched[key][0]]
        finished = [a != "step" for key in groups if key in fetched for a in fetched[key][1]]
        # What a node is scored among: the answers found so far (finished nodes), this round's included.
        pool = [n.candidate for n in self.nodes if n.action != "refused" and n.terminal] + \
            [c for c, done in zip(fresh, finished) if done]
        scores = iter(await gather_all(self._score(c, pool) for c in fresh))  # in the order of `fresh`
        grown: list[tuple[Trial, Node]] = []
        for key, group in groups.items():
            parent, model = self._node(key[0]), self._model(key[1])
            depth = parent.depth + 1 if parent is not None else 1
            if key[0] is not None and key not in growing:
                # treequest may pick a leaf that cannot grow (a finished reply, or too deep): the trial is told a
                # score of 0, so the search learns to go elsewhere; no call is made.
                assert parent is not None
                self.refused += len(group)
                grown += [(t, self._add(key[0], "refused", parent.candidate, 0.0, depth, model)) for t in group]
                continue
            if key not in fetched:
                continue  # its call failed: those trials stay untold
            candidates, actions = fetched[key]
            for i, (candidate, action) in enumerate(zip(candidates, actions)):
                node = self._add(key[0], action, candidate, next(scores), depth, model)
                node.terminal = action != "step"
                if i < len(group):  # a call may give fewer choices than asked, never more
                    grown.append((group[i], node))
        for _, node in grown:
            if node.action != "refused":
                await self.ctx.progress(self._line(node, round_number))
        return grown

    def _node(self, node_id: int | None) -> Node | None:
        return self.nodes[node_id] if node_id is not None else None

    def _model(self, action: str) -> str | None:
        """The model an action names (None: the request's own, in a one-model search)."""
        return action if self.params.models else None

    def _context(self, model: str | None) -> StrategyContext:
        """Where a node's calls go: the model's backend (pass-through's routing), in this run's budget and trace."""
        return self.ctx.for_model(model) if model is not None else self.ctx

    def _expandable(self, node: Node) -> bool:
        if node.action == "refused" or node.depth >= self.params.max_depth:
            return False
        return not (self.params.level == "step" and node.terminal)

    async def _children(self, parent: Node | None, n: int, model: str | None) -> tuple[list[Candidate], list[str]]:
        ctx, params = self._context(model), self.params
        if params.level == "answer":
            if parent is None:
                first, self.widened = self.widened, self.widened + n
                found = await draw(ctx, n, temperature=self.temperature, logprobs=self.logprobs,
                                   top_logprobs=params.top_k if self.logprobs else None, index=first,
                                   label="widen")
                return found, ["widen"] * len(found)
            span = ctx.span("deepen", expands=parent.id)
            found = await draw(span, n, messages=self._refine_messages(parent), temperature=self.temperature,
                               logprobs=self.logprobs, top_logprobs=params.top_k if self.logprobs else None,
                               label="refine")
            return found, ["deepen"] * len(found)
        return await self._steps(parent, n, model)

    def _refine_messages(self, node: Node) -> list[dict[str, Any]]:
        others = list(dict.fromkeys(n.answer for n in self.nodes if n.action != "refused" and n is not node))
        prompt = REFINE_PROMPT.format(score=node.score, others=", ".join(others[:8]) or "none")
        return [*self.ctx.messages, {"role": "assistant", "content": node.candidate.text},
                {"role": "user", "content": prompt}]

    async def _steps(self, parent: Node | None, n: int, model: str | None) -> tuple[list[Candidate], list[str]]:
        """n next steps after the parent's text; at the last allowed depth, n complete replies."""
        params = self.params
        prefix = parent.candidate.text if parent is not None else ""
        depth = parent.depth + 1 if parent is not None else 1
        last = depth >= params.max_depth
        ctx = self._context(model).span("step", expands=parent.id if parent is not None else None)
        options = CallOptions(temperature=self.temperature, max_tokens=None if last else params.step_tokens,
                              logprobs=self.logprobs, top_logprobs=params.top_k if self.logprobs else None)
        if prefix:
            found = await ctx.continue_prefix(prefix, options, n=n, label="step")
        else:
            found = await ctx.generate(options, n=n, label="step")
        children, actions = [], []
        for piece in found:
            child, ended = self._cut(piece, parent, last)
            children.append(child)
            actions.append("finish" if ended else "step")
        return children, actions

    def _cut(self, piece: Candidate, parent: Node | None, last: bool) -> tuple[Candidate, bool]:
        """The node for a step: the parent's text plus this continuation up to and including its first
        delimiter (after some text); a continuation without one that stopped on its own ends the reply."""
        text = piece.text
        start = len(text) - len(text.lstrip())
        cut = -1 if last else text.find(self.params.delimiter, start + 1)
        # It ends the reply when it stopped on its own with no delimiter before its end (nothing but whitespace
        # after the first one counts as none), or at the last allowed depth.
        if cut >= 0 and not text[cut + len(self.params.delimiter):].strip() and piece.finish_reason != "length":
            cut = -1
        ended = cut < 0 and piece.finish_reason != "length" or last
        if cut >= 0:
            text = text[:cut + len(self.params.delimiter)]
        prefix = parent.candidate.text if parent is not None else ""
        shifted = tuple(replace(t, offset=t.offset + len(prefix)) for t in piece.tokens or () if t.offset < len(text))
        tokens = (parent.candidate.tokens or ()) + shifted if parent is not None else shifted
        finish = piece.finish_reason if ended else "step"
        return replace(piece, text=prefix + text, tokens=tokens or None, finish_reason=finish,
                       completion_tokens=len(tokens) if tokens else piece.completion_tokens), ended

    async def _score(self, candidate: Candidate, pool: Sequence[Candidate]) -> float:
        if candidate.truncated and not self.params.count_truncated:
            return 0.0  # cut off by max_tokens: no answer yet to score
        try:
            return await self.scorer.score(candidate, pool, ctx=self.ctx)
        except BudgetExceeded:
            # A scorer that asks the model (the judge) ran out: the answer is kept, unjudged, and the search ends.
            self.round_budget_exhausted = True
            return UNINFORMED

    def _add(self, parent: int | None, action: str, candidate: Candidate, score: float, depth: int,
             model: str | None = None) -> Node:
        node = Node(len(self.nodes), parent, action, candidate, score, depth, model)
        self.nodes.append(node)
        self.ctx.note("tree", [n.summary() for n in self.nodes])
        self.ctx.count("mcts_nodes")
        return node

    @staticmethod
    def _line(node: Node, round_number: int) -> str:
        where = "from the root" if node.parent is None else f"from node {node.parent}"
        verb = {"widen": "widen", "deepen": "deepen", "step": "step", "finish": "final step"}[node.action]
        by = f" by {node.model}" if node.model else ""
        return (f"round {round_number}: node {node.id} ({verb} {where}{by}) → {node.answer or '…'} "
                f"score {node.score:.3f}")

    # ---- the answer ----

    async def _result(self, budget_exhausted: bool) -> StrategyResult:
        answers = [n for n in self.nodes if n.action != "refused" and n.terminal]
        if not answers:
            answers = await self._finish_best_partial()
        if not answers:
            if budget_exhausted:
                raise BudgetExceeded("the budget ran out before the search found any answer")
            raise StrategyError("the search produced no answer")
        pool = Pool(tuple(n.answer for n in answers), tuple(n.score for n in answers),
                    tuple(self.params.count_truncated or not n.candidate.truncated for n in answers))
        if self.params.select == "best":
            best = max(pool.counted(), key=lambda i: (answers[i].score, -i))
            chosen = answers[best]
        else:
            selector = "vote" if self.params.select == "vote" else "weighted"
            chosen = answers[select(pool, selector, fallback="confidence").index]
        await self.ctx.progress(f"answer: {chosen.answer} (node {chosen.id}, score {chosen.score:.3f}, "
                                f"{len(self.nodes) - self.refused} nodes)")
        candidate = chosen.candidate
        if self.params.level == "step":
            candidate = replace(candidate, finish_reason="stop" if candidate.finish_reason == "step"
                                else candidate.finish_reason)
        return StrategyResult(
            choices=[candidate],
            details={
                "level": self.params.level, "score": self.params.score, "select": self.params.select,
                "temperature": self.temperature if self.ctx.over is None else None,
                "nodes": len(self.nodes) - self.refused, "refused_trials": self.refused,
                "answer": chosen.answer, "node": chosen.id,
                "widened": sum(n.action == "widen" for n in self.nodes),
                "deepened": sum(n.action == "deepen" for n in self.nodes),
                "tree": [n.summary() for n in self.nodes],
                **({"models": self._by_model()} if self.params.models else {}),
                **({"stopped": self.failure} if self.failure else {}),
            },
            budget_exhausted=budget_exhausted,
        )

    def _by_model(self) -> dict[str, dict[str, Any]]:
        """Per model: the nodes it made and their mean score (where the search sent its expansions)."""
        made: dict[str, dict[str, Any]] = {}
        for model in self.params.models or ():
            nodes = [n for n in self.nodes if n.model == model and n.action != "refused"]
            made[model] = {"nodes": len(nodes),
                           "mean_score": round(sum(n.score for n in nodes) / len(nodes), 4) if nodes else None}
        return made

    async def _finish_best_partial(self) -> list[Node]:
        """Step level with no finished reply: complete the best partial one (if the budget allows)."""
        partial = [n for n in self.nodes if n.action == "step"]
        if not partial:
            return []
        best = max(partial, key=lambda n: n.score)
        try:
            (piece,) = await self.ctx.continue_prefix(
                best.candidate.text,
                CallOptions(logprobs=self.logprobs, top_logprobs=self.params.top_k if self.logprobs else None),
                label="finish")
        except BudgetExceeded:
            return [best]  # its text so far is the best answer there is
        candidate, _ = self._cut(piece, best, last=True)
        score = await self._score(candidate, [n.candidate for n in self.nodes])
        node = self._add(best.id, "finish", candidate, score, best.depth + 1)
        return [node]
