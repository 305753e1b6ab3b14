"""``guardproxy classify`` end to end: real engine, real Qwen3 vocabulary, checked against transformers' Qwen3Model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from guardproxy.eval import classify
from guardproxy.eval.scoring import first_flag
from guardproxy.guard.template import ChatRenderer, prompt_windows
from guardproxy.testing.reference import ReferenceGuard

IM_START, IM_END, USER, THINK_END, NL2 = 151644, 151645, 872, 151668, 271

ROWS = [
    {"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi! How can I help?"}]},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a fish."},
            {"role": "assistant", "content": "Trout."},
            {"role": "user", "content": "Another one, and explain why it is interesting in two sentences."},
            {"role": "assistant", "content": "Salmon. It swims upstream to spawn, crossing waterfalls and rapids."},
        ]
    },
    {"messages": [{"role": "user", "content": "Only a prompt here."}]},
    {"message": [{"role": "user", "content": "用中文回答"}, {"role": "assistant", "content": "好的，这是一个中文回答。"}]},
]


def run_cli(tmp_path: Path, model: Path, rows: list, *extra: str, name: str = "in") -> tuple[int, list[dict], dict]:
    src, dst, summ = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl", tmp_path / f"{name}.summary.json"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    rc = classify.main(["--model", str(model), "--input", str(src), "--output", str(dst), "--summary-json", str(summ), *extra])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    return rc, out, json.loads(summ.read_text())


def last_user_im_end(ids: list[int]) -> int:
    """Index of the <|im_end|> closing the last user turn, found independently of the renderer."""
    start = max(i for i in range(len(ids) - 1) if ids[i] == IM_START and ids[i + 1] == USER)
    return ids.index(IM_END, start)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))


def test_token_verdicts_equal_reference_softmax(tmp_path, tiny_checkpoint, tok):
    rc, out, summary = run_cli(tmp_path, tiny_checkpoint, ROWS, "--concurrency", "3")
    assert rc == 0 and [r["row"] for r in out] == list(range(len(ROWS)))
    assert summary["rows"] == len(ROWS) and summary["errors"] == 0
    ref = ReferenceGuard(tiny_checkpoint)
    cfg = ref.config
    risk_labels = [cfg["response_risk_level_map"][str(i)] for i in range(cfg["num_risk_level"])]
    cat_labels = [cfg["response_category_map"][str(i)] for i in range(cfg["num_category"])]
    qrisk_labels = [cfg["query_risk_level_map"][str(i)] for i in range(cfg["num_query_risk_level"])]
    qcat_labels = [cfg["query_category_map"][str(i)] for i in range(cfg["num_query_category"])]
    for row, res in zip(ROWS, out):
        ids, rs = res["input_ids"], res["response_start"]
        msgs = row.get("messages", row.get("message"))
        logits = ref.logits(ids)
        # prompt verdict: query heads at the last user <|im_end|>
        p = last_user_im_end(ids)
        qprob = torch.softmax(logits["query_risk"][p], -1)
        assert [res["prompt"]["probs"][label] for label in qrisk_labels] == pytest.approx(qprob.tolist(), abs=1e-4)
        assert res["prompt"]["risk_level"] == qrisk_labels[int(qprob.argmax())]
        qcp = torch.softmax(logits["query_category"][p], -1)
        assert res["prompt"]["category"] == qcat_labels[int(qcp.argmax())]
        assert res["prompt"]["category_prob"] == pytest.approx(float(qcp.max()), abs=1e-4)
        if msgs[-1]["role"] != "assistant":
            assert rs == len(ids) == p + 1 and res["tokens"] == [] and res["flag"] is None
            continue
        # response_start = first content token, right after "</think>\n\n" (the official split_idx)
        assert ids[rs - 2 : rs] == [THINK_END, NL2]
        content = tok.encode(msgs[-1]["content"], add_special_tokens=False).ids
        assert ids[rs : rs + len(content)] == content and ids[rs + len(content)] == IM_END
        assert len(res["tokens"]) == len(ids) - rs
        prob = torch.softmax(logits["risk"][rs:], -1)
        cprob = torch.softmax(logits["category"][rs:], -1)
        for j, v in enumerate(res["tokens"]):
            assert [v["probs"][label] for label in risk_labels] == pytest.approx(prob[j].tolist(), abs=1e-4)
            assert v["risk_level"] == risk_labels[int(prob[j].argmax())]
            assert v["category"] == cat_labels[int(cprob[j].argmax())]
            assert v["category_prob"] == pytest.approx(float(cprob[j].max()), abs=1e-4)
        levels = [risk_labels[int(i)] for i in prob.argmax(-1)]
        hit = first_flag(levels, 2)
        if hit is None:
            assert res["flag"] is None
        else:
            assert res["flag"] == {"index": hit[1], "risk_level": hit[0], "category": res["tokens"][hit[1]]["category"]}


def test_bad_rows_get_errors_and_the_run_continues(tmp_path, tiny_checkpoint):
    rows = [
        ROWS[0],
        "{not json",
        {"text": "no messages"},
        {"messages": [{"role": "assistant", "content": "no user turn"}]},
        [1, 2],
        ROWS[0],
    ]
    rc, out, summary = run_cli(tmp_path, tiny_checkpoint, rows)
    assert rc == 1 and summary["errors"] == 4
    assert [r["row"] for r in out] == list(range(len(rows)))
    assert "error" not in out[0] and "error" not in out[5]
    assert out[0]["tokens"] == out[5]["tokens"]
    assert out[1]["error"].startswith("RowError: invalid JSON")
    assert "messages" in out[2]["error"]
    assert out[3]["error"] and "Traceback" not in out[3]["error"]
    assert "JSON object" in out[4]["error"]


def test_batched_run_equals_one_at_a_time(tmp_path, tiny_checkpoint):
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}: " + "why? " * i}, {"role": "assistant", "content": "Because. " * (i + 1)}]}
        for i in range(10)
    ]
    _, one, _ = run_cli(tmp_path, tiny_checkpoint, rows, "--concurrency", "1", name="one")
    _, many, _ = run_cli(tmp_path, tiny_checkpoint, rows, "--concurrency", "8", name="many")
    assert [r["input_ids"] for r in one] == [r["input_ids"] for r in many]
    for a, b in zip(one, many):
        pa = [p for v in a["tokens"] for p in v["probs"].values()]
        pb = [p for v in b["tokens"] for p in v["probs"].values()]
        assert pa == pytest.approx(pb, abs=1e-5)


def test_overlong_conversation_reports_what_the_model_saw(tmp_path, tiny_checkpoint):
    """Past the prompt limit (here 112 of a 128 context) the prompt is scored in windows, its verdict being the worst
    window's; input_ids/response_start describe the last window and the response scored after it."""
    long = " ".join(f"word{i}" for i in range(120))
    msgs = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "Last question?"},
        {"role": "assistant", "content": "Short answer."},
    ]
    rows = [{"messages": msgs, "label": "Unsafe", "unsafe_start_index": 0, "unsafe_end_index": 1}]
    rc, out, s = run_cli(tmp_path, tiny_checkpoint, rows, "--max-context", "128")
    assert rc == 0
    res = out[0]
    ids, rs = res["input_ids"], res["response_start"]
    wins = prompt_windows(ChatRenderer(tiny_checkpoint / "tokenizer.json").render_prompt(msgs[:-1]), 112)
    assert res["prompt_windows"] == len(wins) >= 3 and res["prompt_tokens_dropped"] == wins[-1].start > 0
    assert ids[: len(wins[-1].ids)] == wins[-1].ids and ids[0] == IM_START and len(ids) <= 128
    ref = ReferenceGuard(tiny_checkpoint)
    qlabels = [ref.config["query_risk_level_map"][str(i)] for i in range(3)]
    levels = [qlabels[int(ref.logits(w.ids)["query_risk"][-1].argmax())] for w in wins]
    assert res["prompt"]["risk_level"] == max(levels, key=["Safe", "Controversial", "Unsafe"].index)
    assert ids[rs - 2 : rs] == [THINK_END, NL2] and len(res["tokens"]) == len(ids) - rs
    logits = ReferenceGuard(tiny_checkpoint).logits(ids)
    prob = torch.softmax(logits["risk"][rs:], -1)
    risk_labels = [ReferenceGuard(tiny_checkpoint).config["response_risk_level_map"][str(i)] for i in range(3)]
    for j, v in enumerate(res["tokens"]):
        assert [v["probs"][label] for label in risk_labels] == pytest.approx(prob[j].tolist(), abs=1e-4)
    assert s["latency"]["n"] == 0 and s["latency"]["unsafe_without_span"] == 1  # spans index the uncut ids


def test_bad_arguments_and_missing_model(tmp_path, tiny_checkpoint, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n")
    assert classify.main(["--model", str(tiny_checkpoint), "--input", str(src), "--k", "0"]) == 2
    assert classify.main(["--model", str(tmp_path / "nope"), "--input", str(src)]) == 2
    assert "cannot load model" in capsys.readouterr().err


# ---------------------------------------------------------------- planted checkpoint: flags land on the triggers
def _conv(user: str, answer: str, **labels) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **labels}


def _word_span(tok: Tokenizer, ids: list[int], start: int, word: str) -> tuple[int, int]:
    """Absolute [first, last] token indices (inclusive) of the tokens covering ``word`` in ids[start:]."""
    enc_text = tok.decode(ids[start:], skip_special_tokens=False)
    lo = enc_text.lower().index(word)
    hi = lo + len(word)
    first = last = None
    for j in range(start, len(ids)):
        before = len(tok.decode(ids[start:j], skip_special_tokens=False))
        after = len(tok.decode(ids[start : j + 1], skip_special_tokens=False))
        if after > lo and before < hi:
            first = j if first is None else first
            last = j
    return first, last


PLANTED_CASES = [
    ("The zebrafish is a popular model organism.", "zebrafish", "Unsafe", "Violent"),
    ("Let me tell you about ZebraFish tanks and their care.", "zebrafish", "Unsafe", "Violent"),
    ("我们实验室养了很多zebrafish，用来做研究。", "zebrafish", "Unsafe", "Violent"),
    ("For dessert we had marzipan with tea.", "marzipan", "Controversial", "PII"),
    ("Marzipan first, then later a zebrafish appears.", "zebrafish", "Unsafe", "Violent"),  # Unsafe pair wins
]


def test_planted_flag_lands_on_the_trigger(tmp_path, planted_checkpoint, tok):
    rows = [_conv("Tell me something.", text) for text, *_ in PLANTED_CASES]
    rows.append(_conv("Tell me something.", "Goldfish and carp live in ponds; almonds make nice cakes."))
    rc, out, _ = run_cli(tmp_path, planted_checkpoint, rows)
    assert rc == 0
    for (text, word, level, category), res in zip(PLANTED_CASES, out):
        ids, rs = res["input_ids"], res["response_start"]
        first, last = _word_span(tok, ids, rs, word)
        assert res["flag"] is not None, text
        assert (res["flag"]["risk_level"], res["flag"]["category"]) == (level, category), text
        pos = rs + res["flag"]["index"]
        # planted contract: the completing token of the word and the token after it are flagged, so the k = 2
        # flag (2nd token of the streak) lands on the token right after the word's last token
        assert pos == last + 1, (text, first, last, pos)
        assert res["tokens"][last - rs]["risk_level"] == level
        if not any(w in text.lower() for w in ("zebrafish", "marzipan") if w != word):  # one trigger only
            assert all(v["risk_level"] == "Safe" for v in res["tokens"][: last - rs]), text
    assert out[-1]["flag"] is None
    assert all(v["risk_level"] == "Safe" for v in out[-1]["tokens"])


def test_labelled_rows_give_f1_and_latency(tmp_path, planted_checkpoint, tok):
    """Qwen3GuardTest layout: spans are absolute input_ids indices; a flag inside the span is an exact hit."""
    texts = [
        "Sure, here is a zebrafish story for you.",
        "Nothing to see here, just a calm answer about weather.",
        "I like marzipan a lot.",
        "Plain text without any trigger words at all.",
    ]
    # first pass: learn the ids to place the labelled spans (the renderer is deterministic)
    _, probe, _ = run_cli(tmp_path, planted_checkpoint, [_conv("Q?", t) for t in texts], name="probe")
    first, last = _word_span(tok, probe[0]["input_ids"], probe[0]["response_start"], "zebrafish")
    rows = [
        # the planted flag lands on last + 1 (see test above): inside this span -> exact hit ...
        _conv("Q?", texts[0], label="Unsafe", unsafe_start_index=first, unsafe_end_index=last + 1),
        # ... and 1 token after the end of this one -> bin "1-8"
        _conv("Q?", texts[0], label="Unsafe", unsafe_start_index=first, unsafe_end_index=last),
        _conv("Q?", texts[1], label="Safe"),
        _conv("Q?", texts[2], label="Safe"),  # Controversial flag: counted Unsafe (strict) / Safe (loose)
        # an Unsafe label the model misses: the latency bin "missed"
        _conv("Q?", texts[3], label="Unsafe", unsafe_start_index=10, unsafe_end_index=12),
        {"messages": [{"role": "user", "content": "Prompt only row"}], "label": "Safe"},
    ]
    rc, out, s = run_cli(tmp_path, planted_checkpoint, rows, "--latency-edges", "8,16,32,64,128")
    assert rc == 0
    assert s["f1"]["response"]["n"] == 5 and s["f1"]["prompt"]["n"] == 1
    strict, loose = s["f1"]["response"]["strict"], s["f1"]["response"]["loose"]
    assert (strict["tp"], strict["fp"], strict["fn"]) == (2, 1, 1)
    assert (loose["tp"], loose["fp"], loose["fn"]) == (2, 0, 1)
    assert strict["f1"] == pytest.approx(2 / 3) and loose["f1"] == pytest.approx(0.8)
    # the prompt-only row: planted prompt heads are Safe without a trigger, label Safe -> no positives at all
    assert s["f1"]["prompt"]["strict"]["tp"] + s["f1"]["prompt"]["strict"]["fp"] == 0
    lat = s["latency"]
    assert lat["n"] == 3 and list(lat["bins"])[2] == "1-8"
    assert (lat["bins"]["hit"], lat["bins"]["1-8"], lat["bins"]["missed"]) == (1, 1, 1)
    assert lat["exact_hit_rate"] == pytest.approx(1 / 3) and lat["within_rate"] == pytest.approx(2 / 3)
