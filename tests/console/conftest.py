from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .browser import browser_or_skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from browser_or_skip()
