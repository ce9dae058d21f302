"""The built-in strategies a cascade's stage can be (every built-in but `auto` itself), by slug: what `auto` runs and
what a policy's stage parameters are checked against. strategies/__init__.py adds `auto` for the registry."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .bon import BestOfN
from .cot import ChainOfThought
from .cot_decoding import CotDecoding
from .deepconf import DeepConf
from .deepthink import DeepThink
from .entropy import EntropySampling
from .framework import Strategy
from .mcts import Mcts
from .moa import MixtureOfAgents
from .pts import PivotalTokenSearch
from .re2 import ReRead
from .sc import SelfConsistency
from .think import BudgetForcing

STAGE_STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType(
    {strategy.slug: strategy for strategy in (SelfConsistency, BestOfN, DeepConf, Mcts, DeepThink, BudgetForcing,
                                              ChainOfThought, EntropySampling, PivotalTokenSearch, CotDecoding,
                                              ReRead, MixtureOfAgents)}
)
