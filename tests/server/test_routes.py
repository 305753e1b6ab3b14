"""The route rule of the relay: no spelling of a moderated route is ever relayed, only allow-listed routes are, and
what is relayed is the normalised path the rule checked.

The proxy runs without a guard engine, so its moderated routes answer 503 and never call the upstream: every request
the upstream records came through the relay. The upstream (:class:`RecordingUpstream`) sits below any router and
records the request target byte for byte; :func:`readings` lists how a lenient server might read that target
(decoding escapes, ``%2F`` and ``\\`` as ``/``, twice-encoded escapes, ``;`` parameters cut, dot segments resolved,
letter case ignored, overlong UTF-8 dots). No reading of anything relayed may be a moderated route.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from guardproxy.config import ConfigError
from guardproxy.server.relay import normalized_path, plain_param
from guardproxy.testing.fake_upstream import TEST_KEY, FakeUpstream, RunningProxy, proxy_config
from guardproxy.wire.errors import ProxyError
from tests.server.raw import RecordingUpstream, port_of, raw_request

MODERATED_READINGS = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/chat/completions", "/completions",
                      "/responses"}
#: Readings below these reach the upstream's stored responses (never relayed either).
STORED_READINGS = ("/v1/responses/", "/responses/")


def readings(target: str) -> set[str]:
    """Every path a lenient upstream might route ``target`` (a raw request target) to, lower-cased."""
    out = set()
    path = target.split("#", 1)[0].split("?", 1)[0]
    for rounds in range(4):
        p = re.sub("%c0%ae", ".", re.sub("%c0%af", "/", path, flags=re.I), flags=re.I)
        for _ in range(rounds):
            p = unquote(p)
        for cut in (False, True):
            q = re.split(r"[?#]", p, maxsplit=1)[0] if cut else p
            stack: list[str] = []
            for seg in q.replace("\\", "/").split("/"):
                seg = seg.split(";", 1)[0]
                if seg in ("", "."):
                    continue
                if seg == "..":
                    if stack:
                        stack.pop()
                    continue
                stack.append(seg)
            out.add(("/" + "/".join(stack)).lower())
    return out


def relayed_moderated(up: RecordingUpstream) -> list[str]:
    return [s.target for s in up.seen if readings(s.target) & MODERATED_READINGS
            or any(r.startswith(STORED_READINGS) for r in readings(s.target))]


def test_readings_see_the_known_bypasses():
    """The oracle itself: each of these reaches a moderated handler on some real server."""
    for target in ["/v1/chat%2Fcompletions", "/v1/chat%252Fcompletions", "/v1/x/..%2Fchat/completions",
                   "/v1/Chat/Completions", "/v1/chat/completions;x=1", "/v1/chat\\completions", "/v1//completions",
                   "/v1/models/%2e%2e/chat/completions", "/v1/%c0%ae%c0%ae/v1/completions", "/v1/completions%3Fx",
                   "/v1/models/..;/..;/v1/chat/completions", "/v1/../chat/completions"]:
        assert readings(target) & MODERATED_READINGS, target
    assert not readings("/v1/models/openai%2Fgpt-4o") & MODERATED_READINGS


@pytest.fixture
async def stack():
    """(recording upstream, proxy without a guard engine in front of it, the proxy's port)."""
    async with RecordingUpstream() as up:
        async with RunningProxy(proxy_config(up.base_url), engine=None) as proxy:
            yield up, proxy, port_of(proxy.base_url)


def assert_openai_error(r, status: int, code: str | None = None) -> dict:
    assert r.status == status, r.raw[:400]
    assert r.headers.get("x-request-id") and r.headers["content-type"].startswith("application/json"), r.raw[:400]
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Spellings of the moderated routes
# ---------------------------------------------------------------------------------------------------------------------

def _char(c: str) -> st.SearchStrategy[str]:
    b = ord(c)
    return st.sampled_from([c, c.swapcase(), f"%{b:02x}", f"%{b:02X}", f"%25{b:02X}",
                            f"%{0xC0 | b >> 6:02X}%{0x80 | b & 0x3F:02X}"])


@st.composite
def _word(draw, word: str) -> str:
    return "".join(draw(_char(c)) for c in word)


_SEPARATORS = ["/", "//", "/./", "/%2e/", "%2F", "%2f", "%252F", "\\", "%5C", "/x/../", "/x/%2e%2e/", "/x/.%2E/",
               "/x/..;/", "/x/..%2F", "/;p/", "/%20/"]
_SUFFIXES = ["", "/", "//", "/.", "/./", ";x=1", ";", "%3Bx", "%23frag", "%3Fq=1", "?q=1", "%3F", "%23", "%00",
             "%09", "%0a", "%7f", "%c2%85", "%20", ".", "%2e", "..;/", "/x/..", "/x/%2e%2e", "#f", "%2F", "%5C"]
_PREFIXES = ["", "/v1/..", "/v1/x/..", "/v1/x/%2e%2e", "/v1/models/..", "/v1/models/..%2F..", "/v1/models/%2e%2e%2F..",
             "/v1/%2e%2e", "/v1/./", "/v1/models/..;"]


@st.composite
def moderated_spelling(draw) -> str:
    """A raw request target that a lenient server may read as a moderated route."""
    words = draw(st.sampled_from([["v1", "chat", "completions"], ["v1", "completions"]]))
    parts = [draw(_word(w)) for w in words]
    path = "/" + parts[0]
    for p in parts[1:]:
        path += draw(st.sampled_from(_SEPARATORS)) + p
    prefix = draw(st.sampled_from(_PREFIXES))
    if prefix:
        path = prefix + path
    return path + draw(st.sampled_from(_SUFFIXES))


@st.composite
def param_spelling(draw) -> str:
    """``/v1/models/{model}`` whose parameter an upstream may read as a path to a moderated route."""
    inner = draw(st.sampled_from(["../chat/completions", "../../v1/completions", "../../chat/completions",
                                  "..\\chat\\completions", "..;/chat/completions"]))
    safe = draw(st.sampled_from(["", "/", ".", "/."]))
    enc = quote(inner, safe=safe)
    if draw(st.booleans()):
        enc = enc.replace("%", "%25")
    if draw(st.booleans()):
        enc = enc.lower()
    return "/v1/models/" + enc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.one_of(moderated_spelling(), param_spelling()), method=st.sampled_from(["POST", "GET"]),
       absolute=st.booleans())
async def test_no_spelling_of_a_moderated_route_is_relayed(stack, target, method, absolute):
    up, _, port = stack
    before = len(up.seen)
    r = await raw_request(port, method, ("http://127.0.0.1" if absolute else "") + target,
                          headers={"Content-Type": "application/json"}, body=b'{"model": "m", "messages": []}')
    new = up.seen[before:]
    assert not [s.target for s in new if readings(s.target) & MODERATED_READINGS], (target, new)
    assert r.status in (200, 400, 404, 405, 503), r.raw[:300]
    if not new:  # refused by the proxy: its own error, in OpenAI's shape
        assert_openai_error(r, r.status)
        assert b"Traceback" not in r.raw


@pytest.mark.parametrize("target", [
    "/v1/../chat/completions", "/v1/../v1/chat/completions", "/v1/%2e%2e/chat/completions",
    "/v1/.%2E/completions", "/v1/chat/completions/", "/v1//chat/completions", "/v1/chat//completions",
    "/v1/./chat/completions", "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/chat/completions%3F",
    "/v1/chat/completions%23", "/v1/chat/completions;x", "/v1/chat/completions..;/", "/v1/Chat/Completions",
    "/v1/CHAT/completions", "/v1/x/../chat/completions", "/v1/models/../completions", "/v1/chat\\completions",
    "/v1/chat%5Ccompletions", "/v1/chat/completions%00", "/v1/chat/completions%09", "/V1/chat/completions",
    "/v1/chat%252Fcompletions", "/v1/models/..%2F..%2Fv1%2Fchat%2Fcompletions",
])
async def test_known_spellings_never_reach_the_fake_upstream_handler(target):
    """The fake upstream records every request its handlers take: none reaches its chat/completions handler."""
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url), engine=None) as proxy:
            r = await raw_request(port_of(proxy.base_url), "POST", target, headers={"Content-Type": "application/json"},
                                  body=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    assert [q for q in fake.requests if q.path in ("/v1/chat/completions", "/v1/completions")] == []
    assert r.status in (400, 404), r.raw[:300]
    assert_openai_error(r, r.status, "invalid_path" if r.status == 400 else None)


@pytest.mark.parametrize("target,code", [
    ("/v1/..", "invalid_path"), ("/v1/../models", "invalid_path"), ("/v1/x/../../models", "invalid_path"),
    ("/v1/%2e%2e/models", "invalid_path"), ("/v1//../models", "invalid_path"),
    ("/v1/models%00", "invalid_path"), ("/v1/models/a%09b", "invalid_path"), ("/v1/models/a%7Fb", "invalid_path"),
    ("/v1/models/a%C2%85b", "invalid_path"), ("/v1/models/a%zz", "invalid_path"), ("/v1/models/%C0%AE", "invalid_path"),
    ("/v1/models/..;x", "invalid_path"), ("/v1/models/.;x/y", "invalid_path"),
])
async def test_malformed_paths_are_400_invalid_path(stack, target, code):
    up, _, port = stack
    r = await raw_request(port, "GET", target)
    assert_openai_error(r, 400, code)
    assert up.seen == []


@pytest.mark.parametrize("raw", [b"/v1/models\x00", b"/v1/models\x01x", b"/v1/mod\x7fels", b"/v1/models\tx",
                                 b"/v1/m\xc3\xa9"])
async def test_raw_control_characters_in_the_path_are_400_invalid_path(stack, raw):
    """aiohttp's parser refuses these before any handler: the answer is still JSON in OpenAI's shape."""
    up, _, port = stack
    r = await raw_request(port, "GET", raw)
    assert r.status == 400 and r.headers["content-type"].startswith("application/json"), r.raw[:300]
    assert r.json()["error"]["code"] in ("invalid_path", "invalid_request") and r.headers.get("x-request-id")
    assert up.seen == []


def test_normalized_path_keeps_reserved_escapes_and_decodes_unreserved_ones():
    assert normalized_path("/v1/%6Dodels/a%2fb%3f%23%3b/") == "/v1/models/a%2Fb%3F%23%3B"
    assert normalized_path("/v1/models/x/../y//z/.") == "/v1/models/y/z"
    assert normalized_path("/v1/a|b{c}\\d") == "/v1/a%7Cb%7Bc%7D%5Cd"
    assert normalized_path("/v1/models/%C3%A9") == "/v1/models/%C3%A9"
    for bad in ["/v1/..", "/x/y", "/v1/a%", "/v1/a%0", "/v1/%FF"]:
        with pytest.raises(ProxyError) as e:
            normalized_path(bad)
        assert e.value.status == 400 and e.value.code == "invalid_path"


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30))
def test_normalized_path_is_idempotent_and_has_no_dot_or_empty_segments(text):
    try:
        once = normalized_path("/v1/" + text)
    except ProxyError as e:
        assert e.status == 400 and e.code == "invalid_path"
        return
    assert normalized_path(once) == once
    assert all(seg not in ("", ".", "..") for seg in once.split("/")[1:])
    assert all(c.isascii() and c.isprintable() and c not in "?#" for c in once)


def test_plain_param():
    for ok in ["gpt-4o", "openai%2Fgpt-4o", "ft:gpt-4o:org::id", "m%C3%A9", "a.b", "a%20b"]:
        assert plain_param(ok), ok
    for bad in ["..%2Fchat", "a%2F..", "a%2F", "%2Fa", "a%252Fb", "a;b", "a%3Bb", "a%5Cb", "a%3Fb", "a%23b", "a%2F%2Fb"]:
        assert not plain_param(bad), bad


# ---------------------------------------------------------------------------------------------------------------------
# The allow-list
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel"), ("DELETE", "/v1/responses/resp_1"),
    ("GET", "/v1/responses/resp_1/input_items"), ("GET", "/v1/Responses/resp_1"), ("GET", "/v1/responses%2Fresp_1"),
    ("POST", "/v1/batches"), ("GET", "/v1/batches/b1"), ("POST", "/v1/files"), ("GET", "/v1/files/f1/content"),
    ("GET", "/v1/realtime"), ("POST", "/v1/realtime/sessions"), ("POST", "/v1/realtime/client_secrets"),
    ("POST", "/v1/conversations"), ("GET", "/v1/conversations/c1/items"), ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"), ("POST", "/v1/audio/speech"), ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/generate"), ("POST", "/v1/messages"), ("POST", "/v1/assistants"), ("POST", "/v1/threads"),
    ("POST", "/v1/threads/t1/runs"), ("POST", "/v1/threads/runs"), ("POST", "/v1/engines/davinci/completions"),
    ("POST", "/v1/moderations"), ("POST", "/v1/rerank"), ("POST", "/v1/fine_tuning/jobs"),
    ("DELETE", "/v1/models/x"), ("POST", "/v1/models"), ("HEAD", "/v1/models"), ("OPTIONS", "/v1/models"),
    ("GET", "/v1/embeddings"), ("PUT", "/v1/embeddings"), ("GET", "/v1/tokenize"), ("GET", "/v1/models/a/b"),
    ("GET", "/v1/does-not-exist"),
])
async def test_routes_outside_the_allow_list_are_404_and_never_relayed(stack, method, path):
    up, _, port = stack
    r = await raw_request(port, method, path, body=b"{}")
    assert r.status == 404, r.raw[:300]
    if method != "HEAD":
        err = assert_openai_error(r, 404, "unmoderated_route")
        assert err["type"] == "not_found_error"
    assert up.seen == []


@pytest.mark.parametrize("method,target,sent", [
    ("GET", "/v1/models", "/v1/models"),
    ("GET", "/v1/models/", "/v1/models"),
    ("GET", "/v1/%6Dodels", "/v1/models"),
    ("GET", "/v1/models?limit=2&after=%26x", "/v1/models?limit=2&after=%26x"),
    ("GET", "/v1/models/fake-model", "/v1/models/fake-model"),
    ("GET", "/v1/models/openai%2fgpt-4o", "/v1/models/openai%2Fgpt-4o"),
    ("GET", "/v1/models/ft:gpt-4o:org::id", "/v1/models/ft:gpt-4o:org::id"),
    ("GET", "/v1/models/x/../fake-model", "/v1/models/fake-model"),
    ("POST", "/v1/embeddings", "/v1/embeddings"),
    ("POST", "/v1/embeddings/", "/v1/embeddings"),
    ("POST", "/v1/tokenize", "/v1/tokenize"),
    ("POST", "/v1/detokenize", "/v1/detokenize"),
])
async def test_allow_listed_routes_are_relayed_as_normalised(stack, method, target, sent):
    up, _, port = stack
    r = await raw_request(port, method, target, headers={"Content-Type": "application/json"}, body=b'{"input": "x"}')
    assert r.status == 200 and r.json()["ok"] is True, r.raw[:300]
    assert [(s.method, s.target) for s in up.seen] == [(method, sent)]
    if method == "POST":
        assert up.seen[0].body == b'{"input": "x"}'


async def test_openai_sdk_model_ids_with_a_slash_are_relayed_encoded(stack):
    up, proxy, _ = stack
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
    await client.models.retrieve("openai/gpt-4o")  # the recording upstream's body is no model; the route is the point
    await client.close()
    assert [s.target for s in up.seen] == ["/v1/models/openai%2Fgpt-4o"]


@pytest.mark.parametrize("param", ["..%2Fresponses", "..%2F..%2Fv1%2Fresponses", "a%252F..", "a;b", "a%3Bb",
                                   "a%5Cb", "%2F", "a%2F%2Fb", "a%3Fb", "a%23b"])
async def test_model_param_that_could_leave_the_route_is_refused(stack, param):
    up, _, port = stack
    r = await raw_request(port, "GET", "/v1/models/" + param)
    assert_openai_error(r, 404, "unmoderated_route")
    assert up.seen == []


async def test_configured_passthrough_routes_and_only_those_are_relayed():
    routes = ["GET /v1/files/{file_id}/content", {"method": "post", "path": "/v1/files"}, "DELETE /v1/models/{m}"]
    async with RecordingUpstream() as up:
        async with RunningProxy(proxy_config(up.base_url, upstream={"passthrough_routes": routes}), None) as proxy:
            port = port_of(proxy.base_url)
            for method, target in [("GET", "/v1/files/f-1/content"), ("POST", "/v1/files"), ("DELETE", "/v1/models/x")]:
                r = await raw_request(port, method, target, body=b"{}" if method == "POST" else b"")
                assert r.status == 200, (method, target, r.raw[:300])
            for method, target in [("GET", "/v1/files"), ("DELETE", "/v1/files/f-1"), ("PUT", "/v1/files"),
                                   ("GET", "/v1/files/f-1/content/x"), ("GET", "/v1/files/..%2Fx/content"),
                                   ("POST", "/v1/files/x")]:
                r = await raw_request(port, method, target, body=b"{}")
                assert_openai_error(r, 404, "unmoderated_route")
    assert [(s.method, s.target) for s in up.seen] == [
        ("GET", "/v1/files/f-1/content"), ("POST", "/v1/files"), ("DELETE", "/v1/models/x")]


async def test_stored_responses_are_never_relayed_whatever_the_allow_list():
    """``GET /v1/responses/{id}`` returns the upstream's stored, unmoderated output (of any tenant sharing its key):
    a pattern that happens to match it does not open it."""
    routes = ["GET /v1/{a}/{b}/{c}", "POST /v1/{a}/{b}/{c}"]
    async with RecordingUpstream() as up:
        async with RunningProxy(proxy_config(up.base_url, upstream={"passthrough_routes": routes}), None) as proxy:
            port = port_of(proxy.base_url)
            for method, target in [("GET", "/v1/responses/resp_1/input_items"), ("POST", "/v1/responses/r/cancel"),
                                   ("GET", "/v1/Responses/r/input_items"), ("GET", "/v1/%72esponses/r/x")]:
                r = await raw_request(port, method, target)
                assert_openai_error(r, 404, "unmoderated_route")
            r = await raw_request(port, "GET", "/v1/files/f/content")
            assert r.status == 200
    assert [s.target for s in up.seen] == ["/v1/files/f/content"]


async def test_base_url_with_a_longer_path_gets_the_route_below_it():
    async with RecordingUpstream() as up:
        base = up.base_url.removesuffix("/v1") + "/openai/deployments/d/v1"
        async with RunningProxy(proxy_config(base), None) as proxy:
            r = await raw_request(port_of(proxy.base_url), "GET", "/v1/models/x/../m?api-version=1")
    assert r.status == 200 and [s.target for s in up.seen] == ["/openai/deployments/d/v1/models/m?api-version=1"]


async def test_unauthenticated_relay_is_401_before_any_route_check(stack):
    up, _, port = stack
    r = await raw_request(port, "GET", "/v1/models", auth=False)
    assert_openai_error(r, 401, "missing_api_key")
    r = await raw_request(port, "GET", "/v1/../x", auth=False)
    assert_openai_error(r, 401, "missing_api_key")
    assert up.seen == []


@pytest.mark.parametrize("routes,where,what", [
    (["POST /v1/chat/completions"], "passthrough_routes[0]", "moderated route /v1/chat/completions"),
    (["GET /v1/{a}/{b}"], "passthrough_routes[0]", "moderated route /v1/chat/completions"),
    (["POST /v1/{x}"], "passthrough_routes[0]", "moderated route /v1/completions"),
    (["GET /v1/responses/{id}"], "passthrough_routes[0]", "stored responses"),
    (["DELETE /v1/responses/{id}"], "passthrough_routes[0]", "never relayed"),
    (["GET /v1/files", "FETCH /v1/files"], "passthrough_routes[1].method", "unknown method 'FETCH'"),
    (["GET /v2/files"], "passthrough_routes[0].path", "starts with /v1/"),
    (["GET /v1/files/"], "passthrough_routes[0].path", "segment ''"),
    (["GET /v1/files/../x"], "passthrough_routes[0].path", "segment '..'"),
    (["GET /v1/a%2Fb"], "passthrough_routes[0].path", "segment 'a%2Fb'"),
    (["GET /v1/a;b"], "passthrough_routes[0].path", "segment 'a;b'"),
    (["GET"], "passthrough_routes[0]", "expected 'METHOD /v1/path'"),
    ([{"method": "GET"}], "passthrough_routes[0].path", "required key is missing"),
    ([{"method": "GET", "path": "/v1/x", "extra": 1}], "passthrough_routes[0].extra", "unknown key"),
])
def test_passthrough_routes_are_validated_at_load_naming_the_key(routes, where, what):
    with pytest.raises(ConfigError) as e:
        proxy_config("http://127.0.0.1:1/v1", upstream={"passthrough_routes": routes})
    line = next((ln for ln in str(e.value).splitlines() if ln.startswith(f"upstreams.up.{where}")), None)
    assert line is not None and what in line, str(e.value)


async def test_relay_forwards_the_raw_query_and_no_client_credential(stack):
    up, proxy, _ = stack
    async with httpx.AsyncClient(timeout=10) as h:
        r = await h.get(proxy.base_url + "/models?a=%26b&c=%23d&e=%2F", headers={
            "Authorization": f"Bearer {TEST_KEY}", "x-api-key": TEST_KEY})
    assert r.status_code == 200
    assert [s.target for s in up.seen] == ["/v1/models?a=%26b&c=%23d&e=%2F"]
    assert TEST_KEY not in repr(up.seen[0].headers) and up.seen[0].headers["Authorization"] == "Bearer sk-upstream-secret"
