"""Built-in strategies, by slug. Each is a plugin on strategies.framework.Strategy; third-party ones register through
the `ttc_proxy.strategies` entry-point group (proxy/registry.py)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .auto import Auto
from .framework import Strategy
from .stages import STAGE_STRATEGIES

BUILTIN_STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType({**STAGE_STRATEGIES, Auto.slug: Auto})
