"""What aiohttp answers before any handler runs (a request line or header it refuses to parse) is still JSON in
OpenAI's error shape with an ``x-request-id``, asserted on the raw bytes at the client socket; the request's bytes
(a credential, maybe) are neither echoed nor logged."""

from __future__ import annotations

import logging

import pytest

from guardproxy.testing.fake_upstream import TEST_KEY, FakeUpstream, RunningProxy, proxy_config
from tests.server.raw import port_of, raw_request, send_raw


@pytest.fixture
async def proxy():
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url), engine=None) as p:
            yield fake, port_of(p.base_url)


def assert_raw_openai_error(r, status: int, code: str) -> None:
    head = r.raw.split(b"\r\n\r\n", 1)[0].lower()
    assert r.status == status, r.raw[:300]
    assert b"content-type: application/json" in head and b"x-request-id: " in head, head
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    assert err["type"] == "invalid_request_error"
    assert b"Traceback" not in r.raw and r.complete


@pytest.mark.parametrize("name", ["X-Big", "Authorization"])
async def test_oversized_header_value_is_431_json(proxy, caplog, name):
    fake, port = proxy
    caplog.set_level(logging.DEBUG)
    secret = "sk-" + TEST_KEY + "z" * 9000
    r = await raw_request(port, "GET", "/v1/models", auth=False, headers={name: secret})
    assert_raw_openai_error(r, 431, "request_header_too_large")
    assert b"zzzz" not in r.raw and TEST_KEY.encode() not in r.raw
    assert not any(TEST_KEY in rec.getMessage() or "zzzz" in repr(rec.exc_info) for rec in caplog.records)
    assert fake.requests == []


async def test_oversized_header_name_is_431_json(proxy):
    _, port = proxy
    r = await raw_request(port, "GET", "/v1/models", head=b"X-" + b"n" * 9000 + b": 1\r\n")
    assert_raw_openai_error(r, 431, "request_header_too_large")


async def test_too_many_headers_is_431_json(proxy):
    _, port = proxy
    r = await raw_request(port, "GET", "/v1/models", head=b"".join(b"X-H%d: v\r\n" % i for i in range(200)))
    assert_raw_openai_error(r, 431, "request_header_too_large")


async def test_oversized_request_line_is_431_json(proxy):
    _, port = proxy
    r = await raw_request(port, "GET", "/v1/models/" + "m" * 9000)
    assert_raw_openai_error(r, 431, "request_header_too_large")


@pytest.mark.parametrize("line", [b"GET /v1/models HTTP/9.9", b"GET /v1/a b HTTP/1.1", b"\x16\x03\x01\x02\x00",
                                  b"GET /v1/models HTTP/1.1\r\nBad Header: x"])
async def test_malformed_requests_are_400_json(proxy, line):
    _, port = proxy
    assert_raw_openai_error(await send_raw(port, line + b"\r\nHost: x\r\n\r\n"), 400, "invalid_request")
