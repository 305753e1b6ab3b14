"""Per-request policy selection: the x-guard-policy header picks one of the tenant's selectable_policies; any other
name is HTTP 400 in the OpenAI error shape before anything is sent upstream; the header never reaches the upstream;
another tenant's policies cannot be named."""

from __future__ import annotations

import httpx
import pytest

from guardproxy.config import ConfigError, config_from_dict
from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, sse_body, wait_idle
from guardproxy.testing.harness import AUTH, USER, texts, well_formed

ANSWER = [chunk({"role": "assistant", "content": "My pet zebrafish likes cake."}), chunk({}, finish_reason="stop")]


def config(upstream_url: str):
    return config_from_dict({
        "upstreams": {"up": {"base_url": upstream_url, "idle_timeout": 5, "first_byte_timeout": 5}},
        "policies": {"base": {}, "loose": {"response": {"unsafe": "flag"}},
                     "redacting": {"response": {"unsafe": "redact"}, "mask": "[{category}]"},
                     "other": {"prompt": {"unsafe": "allow"}, "response": {"unsafe": "allow"}}},
        "tenants": [{"name": "t", "api_key_sha256": [hash_api_key(TEST_KEY)], "policy": "base", "upstream": "up",
                     "selectable_policies": ["loose", "redacting"]},
                    {"name": "u", "api_key_sha256": [hash_api_key("sk-other")], "policy": "other",
                     "upstream": "up"}],
    })


@pytest.mark.parametrize("header, status, text, finish", [
    (None, 200, "My pet ", "content_filter"),
    ("base", 200, "My pet ", "content_filter"),
    ("loose", 200, "My pet zebrafish likes cake.", "stop"),
    ("redacting", 200, "My pet [Violent] cake.", "stop"),  # the flagged word and the token after it
    ("other", 400, None, None),  # another tenant's policy
    ("Loose", 400, None, None),  # names match exactly
    ("nope", 400, None, None),
    ("", 400, None, None),
])
async def test_selection(engine, header, status, text, finish):
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(ANSWER)))
        async with RunningProxy(config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                headers = {**AUTH, **({"x-guard-policy": header} if header is not None else {})}
                r = await h.post(proxy.base_url + "/chat/completions", headers=headers,
                                 json={"model": model, "stream": True, "messages": USER})
        assert r.status_code == status, r.text
        if status == 400:
            err = r.json()["error"]
            assert (err["code"], err["param"], err["type"]) == ("invalid_policy", "x-guard-policy",
                                                                "invalid_request_error")
            assert "base, loose, redacting" in err["message"] and "other" not in err["message"]
            assert fake.requests == [] or all(q.path != "/v1/chat/completions" for q in fake.requests)
        else:
            got, fin = texts(well_formed(r.content))
            assert (got[0], fin[0]) == (text, finish)
            assert all("x-guard-policy" not in {k.lower() for k in q.headers} for q in fake.requests)
    await wait_idle(engine)


async def test_the_header_twice_is_refused(engine):
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(ANSWER)))
        async with RunningProxy(config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions",
                                 headers=[*AUTH.items(), ("x-guard-policy", "loose"), ("x-guard-policy", "base")],
                                 json={"model": model, "stream": True, "messages": USER})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_policy"


def test_an_unknown_selectable_policy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tenants\[0\].selectable_policies\[1\]: no policy 'ghost'"):
        config_from_dict({"upstreams": {"up": {"base_url": "http://u"}}, "policies": {"default": {}, "a": {}},
                          "tenants": [{"name": "t", "upstream": "up", "selectable_policies": ["a", "ghost"]}]})
    with pytest.raises(ConfigError, match=r"tenants\[0\].selectable_policies: \[0\] '../x' is not a plain name"):
        config_from_dict({"upstreams": {"up": {"base_url": "http://u"}}, "policies": {"default": {}},
                          "tenants": [{"name": "t", "upstream": "up", "selectable_policies": ["../x"]}]})
