"""The web console (`GET /ui`): one page, its script and its style, shipped in the package (no CDN, no build step).

The page itself holds nothing private; everything it shows it fetches with the proxy key the user enters: the key's
recent traces (GET /v1/traces, the same ownership rule as GET /v1/traces/{id}), the models, and the playground's
streamed completions.
"""

from __future__ import annotations

from importlib.resources import files

# The files it serves, and as what: nothing else under /ui is answered.
ASSETS = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}


def asset(name: str) -> bytes | None:
    """A console file's bytes, or None for a name that is not one of them."""
    if name not in ASSETS:
        return None
    return files(__package__).joinpath(name).read_bytes()
