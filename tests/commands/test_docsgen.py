"""The docs site's reference tables come from the pydantic models: every built-in strategy's Params and every
config section render, each field with its description (a missing one fails the docs build)."""

from __future__ import annotations

import pytest
from pydantic import Field

from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.strategies import BUILTIN_STRATEGIES
from ttc_proxy.strategies.framework import StrategyParams
from ttc_proxy.tools import docsgen


def test_a_params_marker_becomes_the_strategy_table() -> None:
    page = "# sc\n\n<!-- params: sc -->\n\nafter\n"
    expanded = docsgen.expand(page)
    assert "<!-- params" not in expanded and expanded.endswith("after\n")
    assert "| `n` | integer | `8` | ≥ 1 | samples to draw (the most, when adaptive) |" in expanded
    assert "| `stop_rule` | `beta` \\| `predictive` | `\"beta\"` |" in expanded


@pytest.mark.parametrize("slug", sorted(BUILTIN_STRATEGIES))
def test_every_builtin_strategy_documents_every_parameter(slug: str) -> None:
    table = docsgen.params_table(slug)
    fields = BUILTIN_STRATEGIES[slug].Params.model_fields
    assert table.count("\n") == len(fields) + 1  # the header, its rule, one row per field
    for name in fields:
        assert f"| `{name}` |" in table


@pytest.mark.parametrize("section", sorted(ProxyConfig.model_fields))
def test_every_config_section_renders_with_nested_fields(section: str) -> None:
    table = docsgen.config_table(section)
    assert table.startswith("| name | type | default | range | description |")
    assert "|  |\n" not in table  # every row has a description


def test_config_tables_nest_models_by_path() -> None:
    table = docsgen.config_table("backends")
    assert "| `timeouts.connect` | number | `5.0` | > 0 |" in table
    assert "| `embedded.slots` | integer | `8` | ≥ 1 |" in table
    assert "| `capabilities` | object (CapabilityOverrides) | (below) |" in table


def test_unknown_names_and_undocumented_fields_are_errors() -> None:
    with pytest.raises(docsgen.ReferenceTableError, match="no strategy 'nope'"):
        docsgen.expand("<!-- params: nope -->")
    with pytest.raises(docsgen.ReferenceTableError, match="no config section"):
        docsgen.config_table("nope")

    class Undocumented(StrategyParams):
        n: int = Field(default=1)

    with pytest.raises(docsgen.ReferenceTableError, match="Undocumented.n has no description"):
        list(docsgen.field_rows(Undocumented))


def test_the_readme_is_short_and_its_links_resolve() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    targets = {m.split("#")[0] for m in re.findall(r"\]\(([^)]+)\)", readme) if not m.startswith("http")}
    assert "docs/results/index.md" in targets
    assert [t for t in sorted(targets) if not (root / t).exists()] == []


def test_every_strategy_and_config_section_has_its_table_on_a_page() -> None:
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    strategy_pages = "".join(p.read_text(encoding="utf-8") for p in sorted((docs / "strategies").glob("*.md")))
    missing = [slug for slug in sorted(BUILTIN_STRATEGIES) if f"<!-- params: {slug} -->" not in strategy_pages]
    assert missing == [], f"add `<!-- params: SLUG -->` to a page under docs/strategies/ for {missing}"
    configuration = (docs / "configuration.md").read_text(encoding="utf-8")
    missing = [s for s in ProxyConfig.model_fields if f"<!-- config: {s} -->" not in configuration]
    assert missing == [], f"add `<!-- config: SECTION -->` to docs/configuration.md for {missing}"
