"""The action matrix (stage x channel x risk level x category -> action) and probability thresholds: lookups
against an independent precedence oracle, the decider taking a token's channel and thresholded level, and the
threshold moving the decision exactly at the boundary on the real engine's probabilities."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.config import CHANNELS, ConfigError, Policy
from guardproxy.guard.labels import CATEGORIES
from guardproxy.moderation.decider import Cut, Decider, Flag, Redact, decide_prompt, risk_level
from tests.moderation.fakes import Span, Verdict

RESPONSE_CATS = [c for c in CATEGORIES if c != "Jailbreak"]


#: The issue's example: Jailbreak prompts block, PII anywhere redacted, political Controversial flagged, anything
#: Unsafe in reasoning cuts before the answer starts.
EXAMPLE = Policy.model_validate({
    "prompt": {"controversial": "allow", "unsafe": "flag", "categories": {"Jailbreak": "block"}},
    "response": {"controversial": "allow", "unsafe": "flag",
                 "categories": {"PII": "redact", "Political": {"controversial": "flag"}},
                 "channels": {"reasoning": {"unsafe": "cut"}}},
})


@pytest.mark.parametrize("level", ["Controversial", "Unsafe"])
@pytest.mark.parametrize("category", RESPONSE_CATS)
@pytest.mark.parametrize("channel", CHANNELS)
def test_the_example_matrix(level, category, channel):
    want = "allow" if level == "Controversial" else "flag"
    if category == "Political" and level == "Controversial":
        want = "flag"
    if category == "PII":
        want = "redact"
    if channel == "reasoning" and level == "Unsafe":
        want = "cut"  # the channel's tier action beats the stage's category override
    assert EXAMPLE.response.action(level, category, channel) == want
    assert EXAMPLE.response.action("Safe", category, channel) == "allow"


def test_the_example_prompt_stage():
    assert EXAMPLE.prompt.action("Controversial", "Jailbreak") == "block"
    assert EXAMPLE.prompt.action("Unsafe", "jailbreak") == "block"
    assert EXAMPLE.prompt.action("Unsafe", "Violent") == "flag"
    assert EXAMPLE.prompt.action("Controversial", "Violent") == "allow"


acts = st.sampled_from(["allow", "flag", "redact", "cut"])
maybe = st.none() | acts
overrides = st.dictionaries(st.sampled_from(RESPONSE_CATS),
                            st.fixed_dictionaries({}, optional={"controversial": acts, "unsafe": acts}), max_size=3)
channel_secs = st.fixed_dictionaries({}, optional={"controversial": acts, "unsafe": acts, "categories": overrides})


@settings(max_examples=100, deadline=None)
@given(stage_c=acts, stage_u=acts, cats=overrides,
       channels=st.dictionaries(st.sampled_from(CHANNELS), channel_secs, max_size=3),
       level=st.sampled_from(["Controversial", "Unsafe"]), category=st.sampled_from(RESPONSE_CATS),
       channel=st.sampled_from(list(CHANNELS) + [None]))
def test_lookup_order_channel_category_channel_tier_stage_category_stage_tier(stage_c, stage_u, cats, channels, level,
                                                                           category, channel):
    p = Policy.model_validate({"response": {"controversial": stage_c, "unsafe": stage_u, "categories": cats,
                                            "channels": channels}})
    key = level.lower()
    sec = channels.get(channel, {}) if channel else {}
    candidates = [sec.get("categories", {}).get(category, {}).get(key), sec.get(key),
                  cats.get(category, {}).get(key), {"controversial": stage_c, "unsafe": stage_u}[key]]
    assert p.response.action(level, category, channel) == next(c for c in candidates if c is not None)
    # every action the matrix can give is among those the decider plans its holding for
    assert p.response.action(level, category, channel) in p.response.actions_for_level(level)


@pytest.mark.parametrize("text, message", [
    ({"release": "async", "response": {"channels": {"reasoning": {"unsafe": "redact"}}}},
     "response.channels.reasoning.unsafe: 'redact' needs release: buffered"),
    ({"release": "async", "response": {"channels": {"content": {"categories": {"PII": "redact"}}}}},
     "response.channels.content.categories.PII.controversial"),
    ({"response": {"channels": {"thinking": {"unsafe": "cut"}}}}, "response.channels.thinking: unknown key"),
    ({"response": {"channels": {"reasoning": {"categories": {"Jailbreak": "cut"}}}}}, "prompt head only"),
    ({"response": {"unsafe_at": 0}}, "response.unsafe_at: Input should be greater than 0"),
    ({"prompt": {"categories": {"PII": {"controversial_at": 1.5}}}}, "prompt.categories.PII.controversial_at"),
])
def test_matrix_errors_name_the_key(tmp_path, text, message):
    import yaml

    from guardproxy.config import load_policy
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    assert message in str(e.value)


# --- the decider reads each token's channel ---------------------------------------------------------------------------


def feed(policy: Policy, pieces: list[tuple[str, str | tuple]], flagged: dict[int, Verdict]):
    """Text pieces of (channel kind, text); one token per char, ``flagged`` char index -> verdict (else Safe)."""
    from guardproxy.moderation.choice import channel_of

    d = Decider(policy)
    out, pos = [], 0
    for kind, text in pieces:
        d.text(text, unit=kind if isinstance(kind, tuple) else None, channel=channel_of(kind))
        for ch in text:
            out += d.push(Span(pos, pos, pos + 1), flagged.get(pos, Verdict("Safe")))
            pos += 1
    return out + d.finish()


def test_unsafe_in_reasoning_cuts_before_the_answer_unsafe_in_content_is_flagged():
    pieces = [("reasoning", "think hard"), ("content", "the answer"), (("tool", 0), '{"a": 1}')]
    u = Verdict("Unsafe", "Violent")
    (a,) = feed(EXAMPLE, pieces, {3: u, 4: u})
    assert isinstance(a, Cut) and a.at == 0  # the word "think" starts at 0
    acts = feed(EXAMPLE, pieces, {14: u, 15: u})
    assert [type(x) for x in acts] == [Flag] and acts[0].start == 14  # the word "answer"
    acts = feed(EXAMPLE, pieces, {23: u, 24: u})  # tool arguments: the stage's rule (flag)
    assert [type(x) for x in acts] == [Flag]
    pii = Verdict("Controversial", "PII")
    acts = feed(EXAMPLE, pieces, {1: pii, 2: pii, 12: pii, 13: pii})
    assert [type(x) for x in acts] == [Redact, Redact]  # PII anywhere: redacted in reasoning and content


def test_a_run_crossing_channels_takes_the_channel_of_its_debounced_token():
    pieces = [("reasoning", "ab"), ("content", "cd")]
    u = Verdict("Unsafe", "Violent")
    # run = chars 1 (reasoning), 2 (content): debounced at char 2 (content) -> flag
    assert [type(x) for x in feed(EXAMPLE, pieces, {1: u, 2: u})] == [Flag]
    # debounced at char 1 (reasoning) -> cut at the run's start
    (a,) = feed(EXAMPLE, pieces, {0: u, 1: u})
    assert isinstance(a, Cut) and a.at == 0


def test_template_glue_belongs_to_the_text_before_it():
    d = Decider(EXAMPLE)
    d.text("ab", channel="reasoning")
    d.text("cd", channel="content")
    u = Verdict("Unsafe", "Violent")
    assert d.push(Span(0, 0, 2), Verdict("Safe")) == []
    assert d.push(Span(1, 2, 2), u) == []  # "</think>" glue: covers no char, reasoning's
    (a,) = d.push(Span(2, 2, 2), u)
    assert isinstance(a, Cut)


# --- thresholds -------------------------------------------------------------------------------------------------------


def probs_st():
    return st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda v: sum(v) > 0).map(
        lambda v: dict(zip(("Safe", "Unsafe", "Controversial"), [x / sum(v) for x in v])))


thr = st.none() | st.floats(0.01, 1.0)


@settings(max_examples=150, deadline=None)
@given(probs=probs_st(), u_at=thr, c_at=thr)
def test_thresholded_level_oracle(probs, u_at, c_at):
    argmax = max(probs, key=probs.get)
    p = Policy.model_validate({"response": {"unsafe_at": u_at, "controversial_at": c_at}})
    got = risk_level(p.response, Verdict(argmax, probs=probs), "Violent")
    unsafe = probs["Unsafe"] >= u_at if u_at is not None else argmax == "Unsafe"
    contro = probs["Controversial"] >= c_at if c_at is not None else argmax in ("Controversial", "Unsafe")
    assert got == ("Unsafe" if unsafe else "Controversial" if contro else "Safe")
    if u_at is None and c_at is None:
        assert got == argmax


def test_thresholds_per_category_and_channel():
    p = Policy.model_validate({"response": {"unsafe_at": 0.9, "categories": {"PII": {"unsafe_at": 0.2}},
                                            "channels": {"reasoning": {"unsafe_at": 0.5}}}})
    v = Verdict("Safe", "PII", {"Safe": 0.7, "Unsafe": 0.3, "Controversial": 0.0})
    assert risk_level(p.response, v, "PII", "content") == "Unsafe"
    assert risk_level(p.response, v, "Violent", "content") == "Safe"
    assert p.response.threshold("Unsafe", "Violent", "reasoning") == 0.5
    assert p.response.threshold("Unsafe", "PII", "reasoning") == 0.5  # the channel's tier beats the stage category
    assert p.response.threshold("Controversial", "PII", None) is None


@pytest.fixture(scope="module")
def random_engine(tiny_checkpoint):
    from guardproxy.guard.engine import GuardEngine

    eng = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu", max_streams=4)
    yield eng
    eng.close()


def test_thresholds_move_decisions_exactly_at_the_boundary(random_engine):
    """A random checkpoint's probabilities are what they are; each threshold set to one of them counts that
    verdict, the next float above it does not."""
    stream, pverdict = random_engine.open([{"role": "user", "content": "Tell me a story about a lighthouse."}])
    try:
        pu = pverdict.probs["Unsafe"]
        for at, want in ((pu, "Unsafe"), (math.nextafter(pu, 1.0), None)):
            pol = Policy.model_validate({"prompt": {"unsafe_at": at, "controversial_at": 1.0, "unsafe": "block",
                                                    "controversial": "flag"}})
            dec = decide_prompt(pol, pverdict)
            if want == "Unsafe":
                assert (dec.level, dec.action) == ("Unsafe", "block")
            else:
                assert dec.level != "Unsafe" and dec.action != "block"
        ids = random_engine.renderer.tokenizer.encode("Once upon a time a keeper lit the lamp each night.").ids
        verdicts = stream.feed(ids)
    finally:
        stream.close()
    p_u = [v.probs["Unsafe"] for v in verdicts]
    j = max(range(len(p_u)), key=p_u.__getitem__)  # the token most likely Unsafe: the last one a threshold can take
    cut_at = []
    for at in (p_u[j], math.nextafter(p_u[j], 1.0)):
        pol = Policy.model_validate({"response": {"unsafe_at": at, "controversial_at": 1.0, "unsafe": "cut",
                                                  "controversial": "allow"}, "debounce": 1, "hold_back": 0})
        d = Decider(pol)
        d.text("x" * len(ids), channel="content")
        acts = d.feed((Span(t, i, i + 1), v) for i, (t, v) in enumerate(zip(ids, verdicts)))
        cut_at.append([a.token_index for a in acts if isinstance(a, Cut)])
    assert cut_at == [[j], []]
