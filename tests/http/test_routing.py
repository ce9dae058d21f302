"""Routing: model-name prefixes, the `ttc` body object, aliases, and /v1/models."""

from __future__ import annotations

import threading
import time
from types import MappingProxyType

import httpx
import openai
import pytest
import uvicorn

from ttc_proxy.proxy.app import create_app
from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.proxy.errors import InvalidRequest
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply
from ttc_proxy.proxy.routing import resolve_route, split_model_name
from ttc_proxy.strategies import BUILTIN_STRATEGIES
from ttc_proxy.strategies.framework import Strategy, StrategyParams, StrategyResult, StrategySpec
from ttc_proxy.strategies.sc import SelfConsistency

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, user, validate_schema


class FirstSample(Strategy):
    """A test-only strategy: one sample, returned as is."""

    slug = "first"
    description = "first sample"

    async def run(self, ctx, params: StrategyParams) -> StrategyResult:
        (candidate,) = await ctx.generate(n=1)
        return StrategyResult([candidate])


REGISTRY = MappingProxyType({"sc": SelfConsistency, "first": FirstSample})
VALID = ", ".join(sorted(BUILTIN_STRATEGIES))  # as error messages list them


class RegistryProxyServer(ProxyServer):
    """ProxyServer with a custom strategy registry."""

    def __init__(self, config: ProxyConfig, registry) -> None:
        super().__init__(config)
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(config, registry), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="proxy-registry")


ALIASES = {
    "smart": {"model": "fake-model", "strategy": "sc", "params": {"n": 3}},
    "house-model": {"model": "fake-model"},
}


@pytest.fixture(scope="module")
def two_strategies(fake_backend: FakeBackend):
    with RegistryProxyServer(fake_config(fake_backend, aliases=ALIASES), REGISTRY) as server:
        yield server


def sdk_error(client: openai.OpenAI, model: str, **kwargs) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, messages=user(), **kwargs)
    return info.value


# ---- the model-name grammar ----

def test_prefix_selects_strategy(client, fake):
    completion = client.chat.completions.create(model="sc-fake-model", messages=user())
    assert completion.model == "sc-fake-model"
    assert completion.ttc["strategy"] == "sc"
    assert completion.ttc["params"]["n"] == 8  # the default
    assert {r.body["model"] for r in fake.chat_requests()} == {"fake-model"}


def test_prefix_with_params(client, fake):
    completion = client.chat.completions.create(model="sc:n=3,min_success=2-fake-model", messages=user())
    assert completion.ttc["params"]["n"] == 3 and completion.ttc["params"]["min_success"] == 2
    (request,) = fake.chat_requests()  # 3 samples fit one request under the cap of 4
    assert request.body["n"] == 3 and request.body["model"] == "fake-model"


def test_model_with_dashes_after_prefix(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, models=["org-model-7b-q4"])])
    with ProxyServer(config) as server, sync_client(server) as client:
        client.chat.completions.create(model="sc:n=2-org-model-7b-q4", messages=user())
    assert fake.chat_requests()[0].body["model"] == "org-model-7b-q4"


def test_plain_model_passes_through(client, fake):
    completion = client.chat.completions.create(model="fake-model", messages=user())
    (request,) = fake.chat_requests()
    assert request.body == {"model": "fake-model", "messages": user()}
    assert completion.id == "chatcmpl-fake"
    assert getattr(completion, "ttc", None) is None


def test_unknown_strategy_prefix_lists_valid_ones(proxy, fake):
    error = assert_openai_error(chat(proxy, {"model": "bnn:n=8-fake-model", "messages": user()}), 400,
                                param="model", code="unknown_strategy")
    assert "'bnn'" in error["message"] and f"valid strategies: {VALID}" in error["message"]
    assert fake.requests == []


def test_unknown_strategy_prefix_lists_all_registered(two_strategies, fake):
    error = assert_openai_error(chat(two_strategies, {"model": "bnn:n=8-fake-model", "messages": user()}), 400)
    assert "valid strategies: first, sc" in error["message"]


def test_bad_param_lists_valid_params(client, fake):
    error = sdk_error(client, "sc:samples=3-fake-model")
    assert error.status_code == 400
    message = error.body["message"]
    assert "samples" in message
    for name in ("n", "temperature", "min_success"):
        assert f"{name} (" in message
    assert error.body["code"] == "invalid_strategy_params"
    assert fake.requests == []


def test_mistyped_param_is_400(client, fake):
    error = sdk_error(client, "sc:n=lots-fake-model")
    assert error.status_code == 400 and "n" in error.body["message"]
    error = sdk_error(client, "sc:n=0-fake-model")
    assert error.status_code == 400
    error = sdk_error(client, "sc:adaptive=true,stop_rule=soon-fake-model")
    assert error.status_code == 400 and "stop_rule" in error.body["message"] and "predictive" in error.body["message"]
    assert fake.requests == []


def test_malformed_param_list_is_400(client, fake):
    for model in ("sc:n-fake-model", "sc:=3-fake-model", "sc:n=3,-fake-model"):
        error = sdk_error(client, model)
        assert error.status_code == 400 and error.body["code"] == "invalid_strategy_params", model
    error = sdk_error(client, "sc-")
    assert error.status_code == 400 and error.body["code"] == "invalid_model"
    assert fake.requests == []


def test_param_above_default_maximum(client, fake):
    error = sdk_error(client, "sc:n=65-fake-model")
    assert error.status_code == 400
    assert error.body["code"] == "strategy_param_above_maximum"
    assert "maximum of 64" in error.body["message"]
    assert fake.requests == []


def test_param_above_configured_maximum(fake_backend, fake):
    with ProxyServer(fake_config(fake_backend, strategies={"max_samples": 4})) as server:
        client = sync_client(server)
        error = sdk_error(client, "sc:n=5-fake-model")
        assert error.status_code == 400 and "maximum of 4" in error.body["message"]
        assert error.body["param"] == "ttc.params.n"
        assert client.chat.completions.create(model="sc:n=4-fake-model", messages=user()).ttc["params"]["n"] == 4
        error = sdk_error(client, "fake-model", extra_body={"ttc": {"strategy": "sc", "params": {"n": 6}}})
        assert error.status_code == 400


# ---- the `ttc` body object ----

def test_ttc_object_selects_strategy(client, fake):
    completion = client.chat.completions.create(
        model="fake-model", messages=user(), extra_body={"ttc": {"strategy": "sc", "params": {"n": 2}}})
    assert completion.ttc["strategy"] == "sc" and completion.ttc["params"]["n"] == 2
    assert completion.model == "fake-model"
    (request,) = fake.chat_requests()
    assert request.body["n"] == 2 and "ttc" not in request.body


def test_ttc_params_add_to_prefix(client, fake):
    completion = client.chat.completions.create(
        model="sc:n=3-fake-model", messages=user(), extra_body={"ttc": {"params": {"min_success": 2}}})
    assert completion.ttc["params"]["n"] == 3 and completion.ttc["params"]["min_success"] == 2


def test_ttc_unknown_strategy(client, fake):
    error = sdk_error(client, "fake-model", extra_body={"ttc": {"strategy": "bnn"}})
    assert error.status_code == 400
    assert error.body["param"] == "ttc.strategy" and f"valid strategies: {VALID}" in error.body["message"]
    assert fake.requests == []


def test_ttc_bad_shapes(client, fake):
    for ttc in ("sc", {"strategy": "sc", "extra": 1}, {"strategy": "sc", "params": [1]},
                {"strategy": "sc", "budget": 3}, {"params": {"n": 3}}, {"strategy": "sc", "params": {"bogus": 1}}):
        error = sdk_error(client, "fake-model", extra_body={"ttc": ttc})
        assert error.status_code == 400, ttc
        assert error.body["param"].startswith("ttc"), (ttc, error.body)
    assert fake.requests == []


def test_ttc_conflicts_with_prefix(two_strategies, fake):
    client = sync_client(two_strategies)
    error = sdk_error(client, "sc-fake-model", extra_body={"ttc": {"strategy": "first"}})
    assert error.status_code == 400
    assert error.body["code"] == "conflicting_strategy" and error.body["param"] == "ttc.strategy"
    # The same strategy named twice is no conflict.
    completion = client.chat.completions.create(model="first-fake-model", messages=user(),
                                                extra_body={"ttc": {"strategy": "first"}})
    assert completion.ttc["strategy"] == "first"


def test_resolve_route_units():
    config = ProxyConfig.model_validate({"backends": [{"name": "b", "base_url": "http://127.0.0.1:9"}],
                                         "aliases": ALIASES})
    route = resolve_route("sc:n=4-m", None, config, REGISTRY)
    assert route.model == "m" and route.spec == StrategySpec("sc", {"n": "4"})
    route = resolve_route("m", {"strategy": "first", "budget": {"max_calls": 2}}, config, REGISTRY)
    assert route.spec == StrategySpec("first") and route.budget == {"max_calls": 2}
    assert resolve_route("gpt-4o-mini", None, config, REGISTRY).spec is None
    assert resolve_route("smart", None, config, REGISTRY).spec.params == {"n": 3}
    assert split_model_name("first-m", REGISTRY) == (StrategySpec("first"), "m")
    assert split_model_name("plain-model-name", REGISTRY) == (None, "plain-model-name")
    with pytest.raises(InvalidRequest, match="conflicting|selects strategy"):
        resolve_route("smart", {"strategy": "first"}, config, REGISTRY)


def test_composition_in_the_model_name_and_in_ttc():
    config = ProxyConfig.model_validate({"backends": [{"name": "b", "base_url": "http://127.0.0.1:9"}]})
    nested = StrategySpec("sc", {"n": "4"}, StrategySpec("sc", {"n": "2"}, StrategySpec("first")))
    assert split_model_name("sc:n=4>sc:n=2>first-m-x", REGISTRY) == (nested, "m-x")
    assert nested.describe() == "sc:n=4>sc:n=2>first" and len(nested.chain()) == 3
    route = resolve_route("m", {"strategy": "sc", "params": {"n": 4},
                                "over": {"strategy": "first"}}, config, REGISTRY)
    assert route.spec == StrategySpec("sc", {"n": 4}, StrategySpec("first"))
    # The ttc object's params merge over the model name's, level by level.
    route = resolve_route("sc:n=4>sc:n=2-m", {"params": {"min_success": 2},
                                              "over": {"strategy": "sc", "params": {"n": 3}}}, config, REGISTRY)
    assert route.spec == StrategySpec("sc", {"n": "4", "min_success": 2}, StrategySpec("sc", {"n": 3}))
    for bad, code in (("sc>nope-m", "unknown_strategy"), ("nope>sc-m", "unknown_strategy"),
                      ("sc>first", "invalid_model")):
        with pytest.raises(InvalidRequest) as caught:
            resolve_route(bad, None, config, REGISTRY)
        assert caught.value.code == code, bad
    with pytest.raises(InvalidRequest, match="names 'first'"):
        resolve_route("sc>sc-m", {"over": {"strategy": "first"}}, config, REGISTRY)
    with pytest.raises(InvalidRequest, match="unknown keys"):
        resolve_route("sc-m", {"over": {"strategy": "first", "n": 2}}, config, REGISTRY)


# ---- aliases ----

def test_alias_with_strategy(two_strategies, fake):
    client = sync_client(two_strategies)
    completion = client.chat.completions.create(model="smart", messages=user())
    assert completion.model == "smart"
    assert completion.ttc["strategy"] == "sc" and completion.ttc["params"]["n"] == 3
    (request,) = fake.chat_requests()
    assert request.body["model"] == "fake-model" and request.body["n"] == 3


def test_alias_request_params_override_alias_params(two_strategies, fake):
    client = sync_client(two_strategies)
    completion = client.chat.completions.create(model="smart", messages=user(),
                                                extra_body={"ttc": {"params": {"n": 2}}})
    assert completion.ttc["params"]["n"] == 2


def test_alias_without_strategy_passes_through(two_strategies, fake):
    client = sync_client(two_strategies)
    completion = client.chat.completions.create(model="house-model", messages=user())
    assert completion.model == "house-model"
    assert fake.chat_requests()[0].body["model"] == "fake-model"


def test_alias_to_unknown_backend_is_a_config_error(fake_backend):
    with pytest.raises(ValueError, match="unknown backend"):
        fake_config(fake_backend, aliases={"x": {"model": "m", "backend": "nope"}})


# ---- /v1/models ----

def test_models_listing(two_strategies, fake):
    response = httpx.get(two_strategies.url + "/v1/models")
    assert response.status_code == 200
    listing = response.json()
    validate_schema(listing, "ListModelsResponse")
    ids = [m["id"] for m in listing["data"]]
    assert "fake-model" in ids  # discovered from the backend's own /v1/models
    assert "sc-fake-model" in ids and "first-fake-model" in ids
    assert "smart" in ids and "house-model" in ids
    assert len(ids) == len(set(ids))
    by_id = {m["id"]: m for m in listing["data"]}
    assert by_id["sc-fake-model"]["ttc"] == {"strategy": "sc", "model": "fake-model"}
    assert by_id["smart"]["ttc"]["strategy"] == "sc" and by_id["smart"]["ttc"]["params"] == {"n": 3}
    assert by_id["fake-model"]["owned_by"] == "fake"


def test_models_listing_with_sdk(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "fake-model"  # the backend's model, then one name per strategy
    assert ids[1:] == [f"{slug}-fake-model" for slug in sorted(BUILTIN_STRATEGIES)]
    assert "sc-fake-model" in ids


def test_configured_models_route_to_their_backend(fake_backend, fake):
    other = FakeBackend(slots=2, model="other-model").start_in_thread()
    try:
        config = ProxyConfig.model_validate({"backends": [
            {"name": "a", "kind": "llama_cpp", "base_url": fake_backend.base_url, "models": ["fake-model"]},
            {"name": "b", "kind": "llama_cpp", "base_url": other.base_url, "models": ["other-model"]},
        ]})
        with ProxyServer(config) as server:
            client = sync_client(server)
            client.chat.completions.create(model="sc:n=2-other-model", messages=user())
            assert fake.requests == [] and len(other.chat_requests()) == 1
            client.chat.completions.create(model="fake-model", messages=user())
            assert len(fake.chat_requests()) == 1
            error = sdk_error(client, "unknown-model")
            assert error.status_code == 404 and error.body["code"] == "model_not_found"
            ids = [m.id for m in client.models.list()]
            assert {"fake-model", "other-model", "sc-fake-model", "sc-other-model"} <= set(ids)
    finally:
        other.stop_thread()


# ---------------------------------------------------------------- which backend serves a model


def test_a_name_the_backend_does_not_list_is_a_404_naming_what_is_served(proxy, fake):
    # The fake lists "fake-model" on GET /v1/models, as --backend would learn it: a typo is not answered by it.
    for stream in (False, True):
        error = assert_openai_error(chat(proxy, {"model": "gpt-4o-typo", "messages": user(), "stream": stream}), 404,
                                    param="model", code="model_not_found")
        assert "gpt-4o-typo" in error["message"] and "fake-model" in error["message"]
    assert fake.chat_requests() == []


def test_a_backend_that_lists_no_models_takes_any_name():
    silent = FakeBackend(model=None).start_in_thread()
    try:
        config = ProxyConfig.model_validate({"backends": [{"name": "b", "base_url": silent.base_url}]})
        with ProxyServer(config) as server, sync_client(server) as client:
            client.chat.completions.create(model="anything-at-all", messages=user())
        assert silent.chat_requests()[0].body["model"] == "anything-at-all"
    finally:
        silent.stop_thread()


def test_a_mapped_model_name_is_what_the_engine_gets_and_the_client_sees_its_own(fake_backend, fake):
    entry = backend_entry(fake_backend, models=["fake-model"], model_names={"smol": "/models/SmolLM2"})
    with ProxyServer(fake_config(fake_backend, backends=[entry])) as server, sync_client(server) as client:
        completion = client.chat.completions.create(model="smol", messages=user())
        client.chat.completions.create(model="sc:n=2-smol", messages=user())
        listed = {m.id for m in client.models.list().data}
    assert [r.body["model"] for r in fake.chat_requests()] == ["/models/SmolLM2", "/models/SmolLM2"]
    assert completion.model == "smol"
    assert {"smol", "fake-model", "sc-smol"} <= listed


def two_fakes() -> tuple[FakeBackend, FakeBackend]:
    return FakeBackend(model="shared").start_in_thread(), FakeBackend(model="shared").start_in_thread()


def test_a_model_served_twice_goes_to_the_less_loaded_backend():
    first, second = two_fakes()
    try:
        first.script = lambda body: FakeReply(texts=["slow"], delay=1.0)
        config = ProxyConfig.model_validate({"backends": [
            {"name": "a", "base_url": first.base_url, "max_in_flight": 1},
            {"name": "b", "base_url": second.base_url, "max_in_flight": 1}]})
        with ProxyServer(config) as server:
            slow = threading.Thread(target=lambda: chat(server, {"model": "shared", "messages": user()}))
            slow.start()
            deadline = time.monotonic() + 5
            while not first.chat_requests() and time.monotonic() < deadline:
                time.sleep(0.01)
            response = chat(server, {"model": "shared", "messages": user()})  # "a" is busy: "b" takes it
            slow.join()
        assert response.status_code == 200
        assert len(first.chat_requests()) == 1 and len(second.chat_requests()) == 1
    finally:
        first.stop_thread()
        second.stop_thread()


def test_a_backend_refusing_connections_fails_over_and_is_passed_over_for_a_while():
    from ttc_proxy.proxy.backends.engine import free_port

    up = FakeBackend(model="shared").start_in_thread()
    down_url = f"http://127.0.0.1:{free_port('127.0.0.1')}/v1"  # nothing listens
    try:
        config = ProxyConfig.model_validate({"backends": [
            {"name": "down", "base_url": down_url, "models": ["shared"]},
            {"name": "up", "base_url": up.base_url, "models": ["shared"]}]})
        with ProxyServer(config) as server:
            for stream in (False, True):
                response = chat(server, {"model": "shared", "messages": user(), "stream": stream})
                assert response.status_code == 200, response.text
            health = httpx.get(f"{server.url}/health").json()
        assert len(up.chat_requests()) == 2
        assert "down" in health["backends"]
    finally:
        up.stop_thread()


def test_the_only_backend_refusing_connections_is_a_502_naming_it():
    from ttc_proxy.proxy.backends.engine import free_port

    config = ProxyConfig.model_validate({"backends": [
        {"name": "down", "base_url": f"http://127.0.0.1:{free_port('127.0.0.1')}/v1", "models": ["m"]}]})
    with ProxyServer(config) as server:
        error = assert_openai_error(chat(server, {"model": "m", "messages": user()}), 502,
                                    code="backend_unreachable")
        assert "down" in error["message"]
