"""Prefix-cache scheduling: document order, order restoration, and the radix-cache replay."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.rollout.scheduling import (
    RadixCacheSim,
    RolloutRequest,
    document_order,
    generate_in_document_order,
    prefix_reuse,
    restore_order,
)


def _requests():
    docs = {"d0": list(range(100, 160)), "d1": list(range(200, 260)), "d2": list(range(300, 360))}
    head = [1, 2, 3]
    reqs = [RolloutRequest(d, t, tuple(head + toks[:t])) for d, toks in docs.items() for t in (10, 30, 50)]
    random.Random(0).shuffle(reqs)
    return reqs


def test_document_order_groups_by_document_then_position():
    reqs = _requests()
    ordered = [reqs[i] for i in document_order(reqs)]
    docs = [r.doc_id for r in ordered]
    assert all(docs.index(d) + 3 == len(docs) - docs[::-1].index(d) for d in set(docs))  # contiguous
    for d in set(docs):
        positions = [r.position for r in ordered if r.doc_id == d]
        assert positions == sorted(positions)


@given(st.lists(st.integers(0, 5), min_size=0, max_size=30))
def test_restore_order_inverts_any_schedule(values):
    order = list(range(len(values)))
    random.Random(len(values)).shuffle(order)
    assert restore_order([values[i] for i in order], order) == values


def test_generate_in_document_order_answers_in_caller_order():
    reqs = _requests()
    seen = []

    def fake_generate(prompts):
        seen.extend(prompts)
        return [p[-1] for p in prompts]

    assert generate_in_document_order(fake_generate, reqs) == [r.prompt_ids[-1] for r in reqs]
    assert seen == [reqs[i].prompt_ids for i in document_order(reqs)]


def test_reuse_by_hand():
    # unbounded: every request reuses its longest prefix with any earlier one
    assert prefix_reuse([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3, 4, 5]]).reused_tokens == 0 + 2 + 4
    # capacity 4 with LRU: [5,6,7] evicts 1,2,3 partly, so the repeat of [1,2,3] reuses less
    stats = prefix_reuse([[1, 2, 3], [5, 6, 7], [1, 2, 3]], capacity_tokens=4)
    assert stats.reused_tokens < 3 and stats.evicted_tokens >= 2
    # response tokens take cache space; n samples of one prompt: all but the first reuse it
    s = prefix_reuse([[1, 2, 3, 4]], n=8, response_tokens=10, capacity_tokens=100)
    assert s.reused_tokens == 7 * 4 and s.hit_rate == 7 / 8


def test_cache_never_exceeds_capacity_and_evicts_lru_first():
    cache = RadixCacheSim(capacity_tokens=6)
    cache.insert([1, 2, 3])
    cache.insert([4, 5, 6])
    cache.match([1, 2, 3])  # touch: [4,5,6] is now least recently used
    cache.insert([7, 8])
    assert cache.size <= 6
    assert cache.match([1, 2, 3]) == 3 and cache.match([4, 5, 6]) < 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=12),
       st.integers(1, 20))  # fmt: skip
def test_bounded_cache_reuse_never_beats_unbounded(prompts, cap):
    bounded = prefix_reuse(prompts, capacity_tokens=cap)
    unbounded = prefix_reuse(prompts)
    assert bounded.reused_tokens <= unbounded.reused_tokens <= unbounded.prompt_tokens


def test_document_order_beats_random_under_pressure():
    reqs = _requests()
    prompts_doc = [reqs[i].prompt_ids for i in document_order(reqs)]
    shuffled = [r.prompt_ids for r in reqs]
    kw = dict(n=4, capacity_tokens=120, response_tokens=20)
    assert prefix_reuse(prompts_doc, **kw).hit_rate > prefix_reuse(shuffled, **kw).hit_rate
