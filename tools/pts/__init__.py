"""`ttc-proxy pts`: offline pivotal-token search (the Phi-4 report's subdivision) through the proxy's HTTP API.

The parts: search (the algorithm, on token ids and a p(success | prefix) function, with its cache), engine (the
proxy's /v1/tokenize, /v1/detokenize and /v1/completions with token-id prompts), records (the output files: codelion/pts
records, DPO pairs, progress for resuming, the summary), command (the CLI and one task's search).
"""

from .command import add_parser

__all__ = ["add_parser"]
