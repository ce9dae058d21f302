"""`ttc-proxy bench --routing` in a tiny configuration: auto against the same stages run fixed, on the fake
backend. Not a timing assertion (a busy machine moves the figures): the pairs run, every request is answered, both
sides send the same backend calls, and the report holds what its table shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttc_proxy.tools.cli import main
from ttc_proxy.tools.routing_bench import auto_body, fixed_body


def test_the_auto_side_runs_every_stage_of_the_fixed_sides_cascade() -> None:
    for stages in (1, 2, 3):
        policy = auto_body(stages)["ttc"]["params"]["policy"]
        names = [stage["name"] for stage in policy["points"][0]["stages"]]
        assert len(names) == stages and all("stop" not in stage for stage in policy["points"][0]["stages"])
        assert fixed_body(stages)["model"] == f"{names[-1]}-fake-model"


def test_bench_routing_pairs_auto_with_the_fixed_stages_on_the_same_backend_calls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "routing.json"
    assert main(["bench", "--routing", "--pairs", "5", "--warmup", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["all_answered_ok"] is True and report["same_backend_calls"] is True
    cascades = report["cascades"]
    assert [c["stages"] for c in cascades] == [1, 2, 3]
    # cot: 1 call; bon:n=4>cot: 4 (auto: 1 + the 3 it lacks); bon:n=8>cot: 8 (auto: 1 + 3 + 4).
    assert [c["backend_calls"] for c in cascades] == [{"fixed": 1, "auto": 1}, {"fixed": 4, "auto": 4},
                                                      {"fixed": 8, "auto": 8}]
    for cascade in cascades:
        assert cascade["pairs"] == 5 and cascade["failed"] == 0
        assert cascade["fixed_p50_ms"] > 0 and cascade["auto_p50_ms"] > 0
        low, high = cascade["added_ci95_ms"]
        assert low <= cascade["added_p50_ms"] <= high
        assert cascade["added_per_stage_ms"] == pytest.approx(cascade["added_p50_ms"] / cascade["stages"])
    assert report["target"]["worst_ms"] == max(c["added_per_stage_ms"] for c in cascades)
    table = capsys.readouterr().out
    assert "auto's routing cost" in table and "per stage" in table
