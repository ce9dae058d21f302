"""GET /v1/strategies (issue 17, item 6): every strategy with its purpose, the capabilities it needs and each
parameter's type, default, range or choices and description, from its Params model; published in /openapi.json."""

from __future__ import annotations

import httpx
from jsonschema import Draft202012Validator

from ttc_proxy.proxy.registry import load_registry

from tests.helpers import ProxyServer, assert_openai_error, fake_config


def published(server: ProxyServer, schema: str) -> Draft202012Validator:
    document = httpx.get(server.url + "/openapi.json").json()
    return Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": document["components"]})


def test_the_list_validates_against_the_published_document_and_lists_every_parameter(proxy, fake):
    response = httpx.get(proxy.url + "/v1/strategies")
    assert response.status_code == 200
    listing = response.json()
    published(proxy, "StrategyList").validate(listing)
    document = httpx.get(proxy.url + "/openapi.json").json()
    assert document["paths"]["/v1/strategies"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"] == {"$ref": "#/components/schemas/StrategyList"}
    registry = load_registry()[0]
    by_slug = {entry["id"]: entry for entry in listing["data"]}
    assert sorted(by_slug) == sorted(registry)
    for slug, strategy in registry.items():
        entry = by_slug[slug]
        assert entry["description"] == strategy.description
        assert [p["name"] for p in entry["parameters"]] == list(strategy.Params.model_fields)
        for parameter in entry["parameters"]:
            field = strategy.Params.model_fields[parameter["name"]]
            assert parameter["description"] == field.description and parameter["description"], (slug, parameter)


def test_a_parameter_says_its_type_default_range_choices_and_limit(proxy, fake):
    listing = httpx.get(proxy.url + "/v1/strategies").json()
    bon = next(entry for entry in listing["data"] if entry["id"] == "bon")
    parameters = {p["name"]: p for p in bon["parameters"]}
    assert parameters["n"] == {"name": "n", "type": "integer", "nullable": False, "default": 8, "choices": None,
                               "description": "candidates to draw", "minimum": 1, "limit": "samples"}
    assert parameters["select"]["choices"] == ["vote", "confidence", "weighted", "judge", "verifier"]
    assert parameters["select"]["type"] == "string" and parameters["select"]["default"] == "confidence"
    assert parameters["temperature"]["nullable"] is True and parameters["temperature"]["type"] == "number"
    assert parameters["temperature"]["exclusive_minimum"] == 0 and parameters["temperature"]["maximum"] == 2
    assert bon["capabilities"] == [{"name": "logprobs", "why": "select=confidence scores candidates by token "
                                                               "logprobs; select=vote, judge or verifier do without"}]
    assert bon["composable"] is True and bon["multiple_choices"] is False
    entropy = next(entry for entry in listing["data"] if entry["id"] == "entropy")
    assert [c["name"] for c in entropy["capabilities"]] == ["completions", "logprobs", "render", "tokenize"]


def test_the_list_needs_a_proxy_key_when_keys_are_set(fake_backend):
    config = fake_config(fake_backend, server={"api_keys": ["sk-one"]})
    with ProxyServer(config) as server:
        assert_openai_error(httpx.get(server.url + "/v1/strategies"), 401)
        response = httpx.get(server.url + "/v1/strategies", headers={"authorization": "Bearer sk-one"})
        assert response.status_code == 200 and response.json()["object"] == "list"
