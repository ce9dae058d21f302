"""`ttc-proxy tune`: fit an `auto` cascade policy for a model on tasks with checkable answers.

The parts: measure (every candidate and chain of stages scored on the eval's shared pools of samples, per task:
correctness, tokens, signals), fit (the policy fit and its cross-validation; pure), command (the CLI, the policy
file, the frontier table, plot and per-task table).
"""

from .command import add_parser

__all__ = ["add_parser"]
