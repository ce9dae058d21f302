"""Built-in strategies, by slug. Each is a plugin on strategies.framework.Strategy."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .bon import BestOfN
from .deepconf import DeepConf
from .framework import Strategy
from .sc import SelfConsistency

BUILTIN_STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType(
    {strategy.slug: strategy for strategy in (SelfConsistency, BestOfN, DeepConf)}
)
