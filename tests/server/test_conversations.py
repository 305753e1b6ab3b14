"""The conversations behind ``previous_response_id``: bounded per tenant by count and age, and never another's."""

from __future__ import annotations

from guardproxy.server.conversations import RESPONSE_ID, ConversationStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def turns(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_tenant_reads_only_its_own_entries():
    store = ConversationStore(8, 60)
    store.put("a", "resp_1", turns("a's"))
    assert store.get("a", "resp_1") == turns("a's")
    assert store.get("b", "resp_1") is None and store.owner("resp_1") == "a"
    store.put("b", "resp_1", turns("b's"))  # an id another tenant holds is not taken over
    assert store.get("a", "resp_1") == turns("a's") and store.get("b", "resp_1") is None


def test_entries_are_bounded_by_count_per_tenant():
    store = ConversationStore(3, 60)
    for k in range(5):
        store.put("a", f"resp_{k}", turns(str(k)))
    store.put("b", "resp_b", turns("b"))
    assert [store.get("a", f"resp_{k}") is not None for k in range(5)] == [False, False, True, True, True]
    assert store.owner("resp_0") is None and store.get("b", "resp_b") == turns("b")
    assert ConversationStore(0, 60).get("a", "x") is None


def test_entries_expire():
    clock = Clock()
    store = ConversationStore(8, 10, clock=clock)
    store.put("a", "old", turns("old"))
    clock.now = 6
    store.put("a", "new", turns("new"))
    clock.now = 11
    assert store.get("a", "old") is None and store.owner("old") is None
    assert store.get("a", "new") == turns("new")
    clock.now = 17
    assert store.get("a", "new") is None


def test_only_plain_ids_are_fetched():
    for ok in ["resp_68f0a1b2c3d4", "resp-1.2:3"]:
        assert RESPONSE_ID.match(ok)
    for bad in ["..", ".", "a/b", "a%2Fb", "", "x" * 257, "a b", "a?b"]:
        assert not RESPONSE_ID.match(bad), bad
