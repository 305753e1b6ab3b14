"""Config, policies and tenants: the shipped files validate, every error names its key path, aliases, key lookup."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.cli import main
from guardproxy.config import Config, ConfigError, Policy, config_from_dict, load_config, load_policy
from guardproxy.guard.labels import CATEGORIES, canonical_category
from guardproxy.tenants import TenantRegistry, hash_api_key

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"
DEMO_KEY = "sk-guardproxy-demo"  # the README's example key; config.example.yaml stores only its hash


def example_dict() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def load_dict(data: dict, tmp_path: Path, policies: dict[str, str] | None = None) -> Config:
    (tmp_path / "policies").mkdir(exist_ok=True)
    for name, text in (policies or {"default": ""}).items():
        (tmp_path / "policies" / f"{name}.yaml").write_text(text)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


# --- shipped files ---------------------------------------------------------------------------------------------------


def test_example_config_validates():
    cfg = load_config(EXAMPLE)
    assert list(cfg.upstreams) == ["local"] and cfg.upstreams["local"].base_url == "http://127.0.0.1:8000/v1"
    assert cfg.guard.model == "Qwen/Qwen3Guard-Stream-0.6B"
    assert [t.name for t in cfg.tenants] == ["demo"]
    demo = TenantRegistry(cfg).lookup(f"Bearer {DEMO_KEY}")
    assert demo is not None and demo.name == "demo" and demo.upstream.base_url.endswith("/v1")
    assert demo.policy == load_policy(ROOT / "policies" / "default.yaml")
    assert cfg.upstreams["local"].forward_client_authorization is False
    assert cfg.limits.max_body_bytes == 4 * 1024 * 1024


def test_default_policy_file_is_the_documented_default():
    p = load_policy(ROOT / "policies" / "default.yaml")
    assert p == Policy()
    assert (p.prompt.unsafe, p.prompt.controversial, p.response.unsafe, p.response.controversial) == (
        "block", "flag", "cut", "flag")
    assert (p.release, p.debounce, p.mask, p.fail_mode, p.prompt_mode) == (
        "buffered", 2, "[REDACTED]", "closed", "parallel")
    assert p.moderate.content and p.moderate.reasoning and p.moderate.tool_arguments


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_policy_validates(path):
    p = load_policy(path)
    assert p.response.action("Safe", "Violent") == "allow"


def test_strict_and_permissive_examples():
    strict = load_policy(ROOT / "policies" / "strict.yaml")
    assert strict.response.action("Controversial", "Political") == "redact"
    assert strict.response.action("Unsafe", "PII") == "redact"
    assert strict.response.action("Controversial", "Suicide & Self-Harm") == "cut"
    permissive = load_policy(ROOT / "policies" / "permissive.yaml")
    assert permissive.release == "async" and permissive.fail_mode == "open"
    assert permissive.response.action("Controversial", "Politically Sensitive Topics") == "allow"


# --- errors name the bad key -----------------------------------------------------------------------------------------


def _set(d: dict, path: list, value) -> dict:
    d = copy.deepcopy(d)
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return d


def _del(d: dict, path: list) -> dict:
    d = copy.deepcopy(d)
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    del cur[path[-1]]
    return d


BAD_CONFIGS = [
    (lambda d: _set(d, ["tenants", 0, "api_key_sha"], "x"), "tenants[0].api_key_sha: unknown key"),
    (lambda d: _set(d, ["tenants", 0, "api_key_sha256"], ["abc"]), "tenants[0].api_key_sha256: [0] expected 64 hex"),
    (lambda d: _set(d, ["tenants", 0, "upstream"], "nope"), "tenants[0].upstream: unknown upstream 'nope'"),
    (lambda d: _set(d, ["tenants", 0, "policy"], "missing"), "tenants[0].policy: no policy 'missing'"),
    (lambda d: _set(d, ["tenants", 0, "policy"], "../etc/passwd"), "tenants[0].policy:"),
    (lambda d: _del(d, ["tenants", 0, "upstream"]), "tenants[0].upstream: required key is missing"),
    (lambda d: _set(d, ["listen", "port"], 70000), "listen.port:"),
    (lambda d: _set(d, ["listen", "prot"], 1), "listen.prot: unknown key"),
    (lambda d: _set(d, ["upstreams", "local", "base_url"], "127.0.0.1:8000"), "upstreams.local.base_url: expected"),
    (lambda d: _set(d, ["upstreams", "local", "api_key_env"], "GUARDPROXY_TEST_UNSET_VAR"),
     "upstreams.local: api_key_env: environment variable GUARDPROXY_TEST_UNSET_VAR is not set"),
    (lambda d: _set(d, ["guard", "dtype"], "fp8"), "guard.dtype:"),
    (lambda d: _set(d, ["guard", "device"], "gpu"), "guard.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    (lambda d: _set(d, ["limits", "max_body_bytes"], -1), "limits.max_body_bytes:"),
    (lambda d: _set(d, ["allow_anonymous_tenant"], "ghost"), "allow_anonymous_tenant: no tenant named 'ghost'"),
    (lambda d: _set(d, ["tenants"], d["tenants"] * 2), "tenants[1].name: duplicate tenant name"),
    (lambda d: _del(d, ["upstreams"]), "upstreams: required key is missing"),
]


@pytest.mark.parametrize("mutate, message", BAD_CONFIGS)
def test_config_errors_name_the_key(mutate, message, tmp_path, monkeypatch):
    monkeypatch.delenv("GUARDPROXY_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError) as e:
        load_dict(mutate(example_dict()), tmp_path)
    assert message in str(e.value)
    assert str(tmp_path / "config.yaml") in str(e.value)


BAD_POLICIES = [
    ("response:\n  unsafee: cut\n", "response.unsafee: unknown key"),
    ("response:\n  unsafe: block\n", "response.unsafe: Input should be 'allow', 'flag', 'escalate', 'redact' or 'cut'"),
    ("prompt:\n  unsafe: cut\n", "prompt.unsafe: Input should be 'allow', 'flag', 'escalate', 'route' or 'block'"),
    ("response:\n  categories: {Weapons: cut}\n", "response.categories: unknown category 'Weapons'"),
    ("response:\n  categories: {Jailbreak: cut}\n", "prompt head only"),
    ("response:\n  categories: {PII: cut, pii: flag}\n", "given twice"),
    ("response:\n  categories: {PII: {unsafe: redact, critical: cut}}\n", "response.categories.PII.critical: unknown"),
    ("release: async\nresponse:\n  controversial: redact\n", "response.controversial: 'redact' needs release: buffered"),
    ("release: async\nresponse:\n  categories: {PII: redact}\n", "response.categories.PII.controversial"),
    ("hold_back: -1\n", "hold_back: Input should be greater than or equal to 0"),
    ("debounce: 0\n", "debounce: Input should be greater than or equal to 1"),
    ("release: buffered\nrelease: async\n", "duplicate key 'release'"),
    ("moderate: {content: true, thinking: false}\n", "moderate.thinking: unknown key"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("fail_mode: [\n", "invalid YAML"),
    ("a: {b: 1\nc: [\n", 'in "{path}", line 2'),  # YAML errors name the file, not "<unicode string>"
]


@pytest.mark.parametrize("text, message", BAD_POLICIES)
def test_policy_errors_name_the_key(text, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_dict(example_dict(), tmp_path, policies={"default": text})
    msg = str(e.value)
    assert message.format(path=tmp_path / "policies" / "default.yaml") in msg
    assert "tenants[0].policy" in msg and "default.yaml" in msg


def test_all_problems_reported_at_once(tmp_path):
    d = _set(_set(example_dict(), ["listen", "prot"], 1), ["guard", "modle"], "x")
    with pytest.raises(ConfigError) as e:
        load_dict(d, tmp_path)
    assert "listen.prot" in str(e.value) and "guard.modle" in str(e.value)


def test_cli_check_prints_error_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {u: {base_url: http://x}}\nlisten: {port: many}\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "listen.port" in err and "Traceback" not in err
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 tenant(s)")
    assert main(["hash-key", "abc"]) == 0
    assert capsys.readouterr().out.strip() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- upstream keys, overrides, inline policies -----------------------------------------------------------------------


def test_upstream_key_from_env_is_read_at_load_and_not_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDPROXY_TEST_KEY", "sk-upstream-secret")
    d = _set(example_dict(), ["upstreams", "local", "api_key_env"], "GUARDPROXY_TEST_KEY")
    cfg = load_dict(d, tmp_path)
    up = cfg.upstreams["local"]
    assert up.api_key_value() == "sk-upstream-secret"
    assert "sk-upstream-secret" not in repr(cfg) and "sk-upstream-secret" not in str(up)
    both = _set(d, ["upstreams", "local", "api_key"], "inline")
    with pytest.raises(ConfigError, match="not both"):
        load_dict(both, tmp_path)


def test_overrides_and_engine_kwargs():
    cfg = load_config(EXAMPLE).with_overrides(host="0.0.0.0", port=9999, guard_model="/ckpt")
    assert (cfg.listen.host, cfg.listen.port, cfg.guard.model) == ("0.0.0.0", 9999, "/ckpt")
    kw = cfg.guard.engine_kwargs()
    assert kw["device"] is None and kw["dtype"] is None and kw["max_streams"] == 64
    same = load_config(EXAMPLE).with_overrides()
    assert same.listen == load_config(EXAMPLE).listen


def test_engine_kwargs_are_accepted_by_the_engine(tiny_checkpoint, tmp_path):
    """Every guard setting reaches GuardEngine.from_pretrained in a form it accepts (names, not torch objects)."""
    from guardproxy.guard.engine import GuardEngine

    d = example_dict()
    d["guard"].update(model=str(tiny_checkpoint), device="cpu", dtype="float32", max_streams=3,
                      max_context=256, reanchor_window=64, num_threads=1)
    cfg = load_dict(d, tmp_path)
    eng = GuardEngine.from_pretrained(cfg.guard.model, **cfg.guard.engine_kwargs())
    try:
        assert eng.max_context == 256 and eng.window == 64 and eng.stats().max_streams == 3
        stream, verdict = eng.open([{"role": "user", "content": "hi"}])
        assert verdict.risk_level in ("Safe", "Unsafe", "Controversial")
        stream.close()
    finally:
        eng.close()


def test_inline_policy_and_tenant_isolation(tmp_path):
    d = example_dict()
    d["policies"] = {"gentle": {"response": {"unsafe": "flag"}}}
    d["tenants"].append({"name": "b", "api_key_sha256": hash_api_key("kb"), "policy": "gentle", "upstream": "local"})
    cfg = load_dict(d, tmp_path)
    reg = TenantRegistry(cfg)
    a, b = reg.lookup(f"Bearer {DEMO_KEY}"), reg.lookup("kb")
    assert a.policy.response.unsafe == "cut" and b.policy.response.unsafe == "flag"
    assert a.policy_name == "default" and b.policy_name == "gentle"


# --- aliases ---------------------------------------------------------------------------------------------------------


LONG_TO_SHORT = {
    "Sexual Content or Sexual Acts": "Sexual Content",
    "Suicide & Self-Harm": "Self-Harm",
    "Politically Sensitive Topics": "Political",
    "Copyright Violation": "Copyright",
    "Non-violent Illegal Acts": "Illegal Acts",
    "Unethical Acts": "Unethical",
}


def _respell(name: str, data) -> str:
    words = name.split(" ")
    seps = data.draw(st.lists(st.sampled_from([" ", "  ", "_", " \t"]), min_size=len(words) - 1,
                              max_size=len(words) - 1))
    out = words[0] + "".join(s + w for s, w in zip(seps, words[1:]))
    out = "".join(c.upper() if data.draw(st.booleans()) else c.lower() for c in out)
    return data.draw(st.sampled_from(["", " "])) + out + data.draw(st.sampled_from(["", " "]))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_aliases_canonicalize_any_spelling(data):
    short = data.draw(st.sampled_from(CATEGORIES))
    names = [short] + [long for long, s in LONG_TO_SHORT.items() if s == short]
    name = data.draw(st.sampled_from(names))
    assert canonical_category(_respell(name, data)) == short


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_override_keyed_by_either_name_matches_model_label_by_either_name(data):
    long, short = data.draw(st.sampled_from(sorted(LONG_TO_SHORT.items())))
    key, label = data.draw(st.permutations([long, short]))
    p = Policy.model_validate({"response": {"controversial": "flag", "categories": {key: "cut"}}})
    assert list(p.response.categories) == [short]
    assert p.response.action("Controversial", label) == "cut"
    assert p.response.action("Unsafe", label) == "cut"
    other = next(c for c in CATEGORIES if c not in (short, "Jailbreak"))
    assert p.response.action("Controversial", other) == "flag"


def test_partial_override_falls_back_to_tier():
    p = Policy.model_validate({"prompt": {"controversial": "allow", "categories": {"Jailbreak": {"controversial": "block"}}}})
    assert p.prompt.action("Controversial", "Jailbreak") == "block"
    assert p.prompt.action("Unsafe", "Jailbreak") == "block"  # tier default
    assert p.prompt.action("Controversial", "Violent") == "allow"
    assert p.prompt.action("safe", "Jailbreak") == "allow"
    assert p.prompt.action("Unsafe", "SomethingNew") == "block"  # unknown labels use the tier action
    with pytest.raises(ValueError, match="risk level"):
        p.prompt.action("Critical", "Violent")


# --- tenants ---------------------------------------------------------------------------------------------------------


def test_hash_api_key_is_sha256_hex():
    assert hash_api_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    assert hash_api_key("clé") == hashlib.sha256("clé".encode()).hexdigest()


# API keys are printable tokens (no whitespace or control characters: HTTP trims those around header values)
keys_st = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_categories=("Cs", "Z", "C")),
                  min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(keys_st, min_size=1, max_size=6, unique=True), probe=keys_st, anon=st.booleans())
def test_registry_lookup(keys, probe, anon):
    tenants = [{"name": f"t{i}", "api_key_sha256": [hash_api_key(k).upper()], "upstream": "u"}
               for i, k in enumerate(keys)]
    data = {"upstreams": {"u": {"base_url": "http://u"}}, "tenants": tenants,
            "policies": {"default": {}}, "allow_anonymous_tenant": "t0" if anon else None}
    reg = TenantRegistry(config_from_dict(data))
    for i, k in enumerate(keys):
        for header in (k, f"Bearer {k}", f"bearer  {k} ", f"BEARER {k}"):
            assert reg.lookup(header).name == f"t{i}"
    fallback = "t0" if anon else None
    if probe not in keys:
        got = reg.lookup(f"Bearer {probe}")
        assert (got.name if got else None) == fallback
    for missing in (None, "", "Bearer", "Bearer   "):
        got = reg.lookup(missing)
        assert (got.name if got else None) == fallback


def test_duplicate_key_across_tenants_is_an_error():
    h = hash_api_key("same")
    data = {"upstreams": {"u": {"base_url": "http://u"}}, "policies": {"default": {}},
            "tenants": [{"name": "a", "api_key_sha256": [h], "upstream": "u"},
                        {"name": "b", "api_key_sha256": [h], "upstream": "u"}]}
    with pytest.raises(ConfigError, match=r"tenants\[1\].api_key_sha256\[0\]: key already belongs to tenant 'a'"):
        config_from_dict(data)
