"""Policy inheritance (`extends`): deep merge over shipped, file and inline parents; unknown parents and cycles are
errors naming the file, key and line; every shipped policy stays valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.config import ConfigError, Policy, config_from_dict, load_policy, merge_patch

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies"


def write(d: Path, name: str, text: str) -> Path:
    p = d / f"{name}.yaml"
    p.write_text(text)
    return p


def test_child_of_a_shipped_policy_writes_only_its_differences(tmp_path):
    child = write(tmp_path, "mine", "extends: strict\nrelease: buffered\nhold_back: 6\nresponse: {controversial: flag}\n")
    p = load_policy(child, directory=SHIPPED)
    strict = load_policy(SHIPPED / "strict.yaml")
    assert p.hold_back == 6 and p.response.controversial == "flag"
    # everything else is the parent's: the merge is deep (response.unsafe and the category overrides survive)
    assert p.model_dump(exclude={"hold_back"}) == strict.model_copy(update={
        "response": strict.response.model_copy(update={"controversial": "flag"})}).model_dump(exclude={"hold_back"})
    assert p.response.action("Unsafe", "PII") == "redact" and p.response.action("Controversial", "Self-Harm") == "cut"


def test_category_overrides_merge_per_level_under_any_spelling(tmp_path):
    write(tmp_path, "base", "response:\n  categories:\n    PII: redact\n    Political: allow\n")
    child = write(tmp_path, "child", "extends: base\nresponse:\n  categories:\n    personally identifiable information: "
                                     "{unsafe: cut}\n    political: null\n")
    p = load_policy(child)
    assert p.response.action("Controversial", "PII") == "redact"  # the parent's level stays
    assert p.response.action("Unsafe", "PII") == "cut"  # the child's level wins
    assert "Political" not in p.response.categories  # null removes the parent's override (RFC 7386)
    assert p.response.action("Controversial", "Political") == "flag"


def test_three_levels_and_a_file_extending_an_inline_policy(tmp_path):
    (tmp_path / "policies").mkdir()
    write(tmp_path / "policies", "mid", "extends: root\nresponse: {unsafe: redact}\n")
    write(tmp_path / "policies", "leaf", "extends: mid\nannotations: true\n")
    data = {"upstreams": {"u": {"base_url": "http://u"}}, "policies_dir": str(tmp_path / "policies"),
            "policies": {"root": {"prompt": {"controversial": "block"}, "hold_back": 3},
                         "default": {"extends": "default", "debounce": 3}},
            "tenants": [{"name": "a", "upstream": "u", "policy": "leaf"}, {"name": "b", "upstream": "u"}]}
    write(tmp_path / "policies", "default", "mask: '[X]'\n")
    cfg = config_from_dict(data)
    leaf = cfg.policies["leaf"]
    assert (leaf.prompt.controversial, leaf.hold_back, leaf.response.unsafe, leaf.annotations) == (
        "block", 3, "redact", True)
    # an inline policy may extend the file of its own name
    assert (cfg.policies["default"].debounce, cfg.policies["default"].mask) == (3, "[X]")


def test_unknown_parent_names_the_file_the_key_and_the_line(tmp_path):
    child = write(tmp_path, "child", "# a comment\nrelease: buffered\nextends: nowhere\n")
    with pytest.raises(ConfigError) as e:
        load_policy(child)
    msg = str(e.value)
    assert f"{child}, line 3" in msg and "extends: no policy 'nowhere'" in msg


@pytest.mark.parametrize("texts, cycle", [
    ({"a": "extends: b\n", "b": "extends: a\n"}, "a -> b -> a"),
    ({"a": "extends: a\n"}, "a -> a"),
    ({"a": "extends: b\n", "b": "extends: c\n", "c": "extends: b\n"}, "b -> c -> b"),
])
def test_cycles_are_errors_naming_the_file(tmp_path, texts, cycle):
    for name, text in texts.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as e:
        load_policy(tmp_path / "a.yaml")
    assert f"inheritance cycle {cycle}" in str(e.value) and ".yaml, line 1" in str(e.value)


def test_cycle_through_a_config_is_reported_for_the_tenant(tmp_path):
    data = {"upstreams": {"u": {"base_url": "http://u"}}, "policies": {"x": {"extends": "y"}, "y": {"extends": "x"}},
            "tenants": [{"name": "a", "upstream": "u", "policy": "x"}]}
    with pytest.raises(ConfigError, match="inheritance cycle x -> y -> x"):
        config_from_dict(data, source="cfg.yaml")


def test_invalid_merged_value_names_the_line_where_it_is_written(tmp_path):
    write(tmp_path, "base", "release: async\n")
    child = write(tmp_path, "child", "extends: base\nresponse:\n  controversial: flag\n  unsafee: cut\n")
    with pytest.raises(ConfigError) as e:
        load_policy(child)
    assert "response.unsafee: unknown key" in str(e.value) and "(line 4)" in str(e.value)
    # a conflict made of both files: redact (child) needs buffered release, async comes from the parent
    child2 = write(tmp_path, "child2", "extends: base\nresponse:\n  categories: {PII: redact}\n")
    with pytest.raises(ConfigError, match=r"'redact' needs release: buffered"):
        load_policy(child2)
    bad = write(tmp_path, "bad", "extends: [base]\n")
    with pytest.raises(ConfigError, match=r"extends: expected a policy name"):
        load_policy(bad)
    with pytest.raises(ConfigError, match=r"extends: expected a policy name"):
        load_policy(write(tmp_path, "bad2", "extends: ../base\n"))


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.name)
def test_extending_a_shipped_policy_with_nothing_is_that_policy(path, tmp_path):
    child = write(tmp_path, "child", f"extends: {path.stem}\n")
    assert load_policy(child, directory=SHIPPED) == load_policy(path)


actions = st.sampled_from(["allow", "flag", "cut"])
fragments = st.fixed_dictionaries({}, optional={
    "hold_back": st.integers(0, 8), "debounce": st.integers(1, 4), "annotations": st.booleans(),
    "response": st.fixed_dictionaries({}, optional={"controversial": actions, "unsafe": actions,
                                                    "categories": st.dictionaries(
                                                        st.sampled_from(["PII", "pii", "Violent", "Political"]),
                                                        actions, max_size=2)}),
    "prompt": st.fixed_dictionaries({}, optional={"controversial": st.sampled_from(["allow", "flag", "block"])}),
})


def _merged(parent: dict, child: dict) -> dict:
    """The policy a reader expects: every key the child writes wins, level by level for category overrides."""
    out = yaml.safe_load(yaml.safe_dump(parent))
    for key, value in child.items():
        if key in ("response", "prompt"):
            sec = out.setdefault(key, {})
            for k, v in value.items():
                if k == "categories":
                    cats = {kk.upper() if kk.lower() == "pii" else kk: vv for kk, vv in sec.get(k, {}).items()}
                    for cat, act in v.items():
                        cats[cat.upper() if cat.lower() == "pii" else cat] = act
                    sec[k] = cats
                else:
                    sec[k] = v
        else:
            out[key] = value
    return out


@settings(max_examples=60, deadline=None)
@given(parent=fragments, child=fragments)
def test_child_keys_win_and_the_rest_is_the_parents(tmp_path_factory, parent, child):
    if any(len({k.lower() for k in f.get("response", {}).get("categories", {})}) <
           len(f.get("response", {}).get("categories", {})) for f in (parent, child)):
        return  # "PII" and "pii" in one map is an error of its own (tested in test_config)
    d = tmp_path_factory.mktemp("p")
    write(d, "parent", yaml.safe_dump(parent))
    got = load_policy(write(d, "child", yaml.safe_dump({"extends": "parent", **child})))
    assert got == Policy.model_validate(_merged(parent, child))


def test_merge_patch_is_rfc7386():
    # RFC 7386 section 3 example
    target = {"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["example", "sample"],
              "content": "This will be unchanged"}
    patch = {"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": None}, "tags": ["example"]}
    assert merge_patch(target, patch) == {"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                                          "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"}
    assert target["author"] == {"givenName": "John", "familyName": "Doe"}  # unchanged


# --- guardproxy check-policy ------------------------------------------------------------------------------------------


def test_check_policy_prints_the_effective_policy_that_reloads_to_itself(tmp_path, capsys):
    from guardproxy.cli import main

    child = write(tmp_path, "child", "extends: strict\nhold_back: 5\nresponse:\n  categories:\n    PII: {unsafe: cut}\n")
    assert main(["check-policy", str(child), str(SHIPPED / "permissive.yaml"), "--policies-dir", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    docs = list(yaml.safe_load_all(out))
    assert len(docs) == 2 and f"# {child}: valid" in out
    assert Policy.model_validate(docs[0]) == load_policy(child, directory=SHIPPED)
    assert Policy.model_validate(docs[1]) == load_policy(SHIPPED / "permissive.yaml")
    assert docs[0]["hold_back"] == 5 and docs[0]["response"]["categories"]["PII"] == {"controversial": "redact",
                                                                                      "unsafe": "cut"}
    assert "extends" not in docs[0]


def test_check_policy_errors_name_file_line_and_key_and_every_file_is_checked(tmp_path, capsys):
    from guardproxy.cli import main

    bad = write(tmp_path, "bad", "extends: strict\nresponse:\n  unsafe: block\n")
    orphan = write(tmp_path, "orphan", "extends: missing\n")
    good = write(tmp_path, "good", "annotations: true\n")
    assert main(["check-policy", str(bad), str(orphan), str(good), "--policies-dir", str(SHIPPED)]) == 2
    cap = capsys.readouterr()
    assert f"error: {bad}:\nresponse.unsafe: Input should be 'allow', 'flag', 'escalate', 'redact' or 'cut' (line 3)" in cap.err
    assert f"error: {orphan}, line 1:\nextends: no policy 'missing'" in cap.err
    assert f"# {good}: valid" in cap.out and "Traceback" not in cap.err
