"""`ttc-proxy load` end to end at a tiny size: every phase runs, every request is answered, the report has its
shape. Not a timing assertion: the figures themselves come from `make load` on an idle machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttc_proxy.tools.cli import main
from ttc_proxy.tools.load import PACED_MODEL


def test_load_command_runs_every_phase_without_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "load.json"
    code = main(["load", "--clients", "5", "--chunks", "3", "--chunk-delay", "0.01", "--background", "2",
                 "--probe-connections", "2", "--probe-seconds", "0.3", "--probe-rounds", "2", "--disconnects", "2",
                 "--disconnect-n", "2",
                 "--timeout", "60", "--output", str(output)])
    assert code == 0

    report = json.loads(output.read_text())
    assert report["errors"] == 0
    phases = report["phases"]
    assert set(phases) == {"streaming", "non_streaming", "mix", "isolation", "disconnect"}
    for name in ("streaming", "non_streaming"):
        for target in ("direct", "proxy"):
            result = phases[name][target]
            assert result["clients"] == 5 and result["ok"] == 5 and result["error_count"] == 0, (name, target)
            assert result["statuses"] == {"200": 5}
            assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
            assert result["wall_s"] > 0 and result["rps"] > 0
            assert (result["ttft_ms"] is not None) == (name == "streaming")
        assert phases[name]["time_ratio"] > 0
    assert phases["streaming"]["proxy"]["proxy_peak_rss_mb"] > 0

    mix = phases["mix"]
    assert mix["ok"] == 5 and mix["error_count"] == 0
    assert mix["kinds"] == {"none stream": 1, "sc:n=4 stream": 1, "bon:n=4 stream": 1, "none": 1, "sc:n=4": 1}

    isolation = phases["isolation"]
    for probe in ("idle", "loaded"):
        assert isolation[probe]["requests"] > 0 and isolation[probe]["error_count"] == 0
        assert isolation[probe]["seconds"] == pytest.approx(0.6)  # two alternating windows of 0.3 s
    assert isolation["background"]["error_count"] == 0
    assert isolation["p99_ratio"] > 0

    disconnect = phases["disconnect"]
    assert disconnect["model"] == f"sc:n=2-{PACED_MODEL}"
    assert len(disconnect["runs"]) == 2
    for run in disconnect["runs"]:
        assert run["calls"] == 2  # seeded: each sample its own backend call
        assert run["still_open"] == 0  # none left behind, whether cancelled or finished first

    assert report["proxy_peak_rss_mb"] > 0
    assert [t["name"] for t in report["targets"]] == [
        "5 streaming clients: errors via proxy",
        "streaming wall time, via proxy / direct",
        "proxy peak RSS (MB)",
        "client gone -> all sc:n=2 backend calls closed, max ms",
        "pass-through p99 with 2 x sc:n=16 / idle",
    ]
    assert report["setup"]["clients"] == 5 and report["machine"]["nproc"] >= 1

    table = capsys.readouterr().out
    assert "via proxy / direct" in table and "peak RSS" in table and "disconnect" in table


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--clients", "5000"]) == 2
    assert "clients must be in" in capsys.readouterr().err
