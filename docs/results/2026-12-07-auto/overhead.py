"""Proxy time auto adds per stage: auto with a one-stage [cot] policy against cot itself, on the scripted backend
(median of alternating requests)."""
import statistics, time, json
import httpx
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply
from tests.helpers import ProxyServer, fake_config

fake = FakeBackend()
fake.start_in_thread()
fake.script = lambda body: FakeReply(texts=["<output>7</output>"], token_logprob=-0.1)
policy = {"model": "m", "points": [{"budget": 100, "stages": [{"name": "cot", "spec": {"strategy": "cot"}}]}]}
two = {"model": "m", "points": [{"budget": 100, "stages": [
    {"name": "cot", "spec": {"strategy": "cot"}, "stop": {"signal": "logprob", "threshold": 2}},
    {"name": "cot", "spec": {"strategy": "cot"}}]}]}
import tempfile, pathlib
folder = pathlib.Path(tempfile.mkdtemp())
(folder / "one.json").write_text(json.dumps(policy))
(folder / "two.json").write_text(json.dumps(two))
config = fake_config(fake, strategies={"policies": {"fake-model": str(folder / "one.json")}})
config2 = fake_config(fake, strategies={"policies": {"fake-model": str(folder / "two.json")}})
with ProxyServer(config2) as server2, ProxyServer(config) as server, httpx.Client(base_url=server.url) as client:
    client2 = httpx.Client(base_url=server2.url)
    def one(body, c=None):
        started = time.perf_counter()
        r = (c or client).post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return (time.perf_counter() - started) * 1000
    q = {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "temperature": 0}
    cot, auto1, auto2 = [], [], []
    for i in range(400):
        cot.append(one({**q, "model": "cot-fake-model", "logprobs": True, "top_logprobs": 5}))
        auto1.append(one({**q, "model": "auto-fake-model"}))
        auto2.append(one({**q, "model": "auto-fake-model"}, client2))
    m = statistics.median
    print(json.dumps({"requests_each": 400, "cot_ms_p50": round(m(cot), 3), "auto_1stage_ms_p50": round(m(auto1), 3),
                      "auto_2stage_ms_p50": round(m(auto2), 3),
                      "auto_1stage_minus_cot_ms": round(m(auto1) - m(cot), 3),
                      "second_stage_ms": round(m(auto2) - m(auto1), 3)}))
fake.stop_thread()
