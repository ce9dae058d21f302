"""`ttc-proxy bench-strategy` runs end to end against the fake engine (a test of the command, not a timing)."""

from __future__ import annotations

import json
from pathlib import Path

from ttc_proxy.tools import cli
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply


def test_bench_strategy_times_both_ways_on_the_same_engine(fake: FakeBackend, tmp_path: Path) -> None:
    fake.script = lambda body: FakeReply(texts=["It is 4."], delay=0.01)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "question": f"{i}+{i}?", "answer": str(2 * i),
                                         "check": "number"}) + "\n" for i in range(3)))
    out = tmp_path / "strategy.json"
    status = cli.main(["bench-strategy", str(tasks), "--backend", fake.base_url, "--limit", "3",
                       "--strategy", "bon:n=4,select=vote", "--n", "4", "--output", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["tasks"] == 3 and result["strategy"] == "bon:n=4,select=vote"
    assert result["direct_median_s"] > 0 and result["proxied_median_s"] > 0 and result["median_ratio"] > 0
    calls = fake.chat_requests()
    # Per task: the direct n=4 request with logprobs, and the strategy's own draw of 4 through the proxy.
    assert len(calls) == 6 and all(c.body.get("n") == 4 for c in calls)
