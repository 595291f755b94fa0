"""Prefix-cache-aware request order for RPT rollouts, and a measure of prefix reuse.

RPT prompts are ``instruction + document[:t] + suffix`` for several positions t of the same
document, and each prompt is sampled G times. Contexts of one document therefore share long
prefixes (all of ``document[:t1]`` when t1 < t2, as long as no left truncation happened), and
the G samples share the whole prompt. Sending requests grouped by document and ordered by
position keeps those prefixes in the engine's radix cache while they are still useful; a random
order interleaves documents and lets other documents' tokens (prompts *and* generated
responses) evict them first.

``prefix_reuse`` measures this from token ids alone (no engine): it replays an order through a
token-level radix cache with least-recently-used eviction, the policy of SGLang's radix cache:

* each request looks up the longest cached prefix of its prompt: those tokens are *reused*;
* its prompt is then inserted; each of its ``n`` samples also inserts ``response_tokens``
  unique tokens under the prompt (SGLang caches generated tokens too, and they compete for
  memory) -- the first sample prefills the prompt, the other ``n - 1`` reuse all of it;
* when the cache holds more than ``capacity_tokens`` tokens, least recently used leaves are
  evicted until it fits (None = unbounded).

``hit_rate = reused prompt tokens / submitted prompt tokens`` (each prompt counted n times),
the same ratio as SGLang's ``cached_tokens / prompt_tokens``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RolloutRequest:
    """One context to sample: its document, its position there, and its prompt ids."""

    doc_id: Hashable
    """Document the context comes from."""
    position: int
    """Index of the target token in the document."""
    prompt_ids: tuple[int, ...]
    """Full prompt token ids (template included)."""


def document_order(requests: Sequence[RolloutRequest]) -> list[int]:
    """Indices of ``requests`` grouped by document (first-appearance order), then by position.

    >>> reqs = [RolloutRequest("b", 5, (1,)), RolloutRequest("a", 9, (2,)), RolloutRequest("b", 2, (3,))]
    >>> document_order(reqs)
    [2, 0, 1]
    """
    first_seen: dict[Hashable, int] = {}
    for r in requests:
        first_seen.setdefault(r.doc_id, len(first_seen))
    return sorted(range(len(requests)), key=lambda i: (first_seen[requests[i].doc_id], requests[i].position, i))


def restore_order(results: Sequence[T], order: Sequence[int]) -> list[T]:
    """Undo a schedule: ``results[k]`` answers request ``order[k]``; return caller order.

    >>> restore_order(["r2", "r0", "r1"], [2, 0, 1])
    ['r0', 'r1', 'r2']
    """
    out: list = [None] * len(order)
    for k, i in enumerate(order):
        out[i] = results[k]
    return out


def generate_in_document_order(
    generate: Callable[[list[Sequence[int]]], list[T]], requests: Sequence[RolloutRequest]
) -> list[T]:
    """Call ``generate`` on the prompts in document order; return results in caller order."""
    order = document_order(requests)
    results = generate([requests[i].prompt_ids for i in order])
    return restore_order(results, order)


@dataclass(frozen=True)
class ReuseStats:
    """Outcome of replaying an order through the simulated cache."""

    prompt_tokens: int
    """Prompt tokens submitted (each prompt counted n times)."""
    reused_tokens: int
    """Of those, tokens found in the cache."""
    evicted_tokens: int
    """Tokens evicted to respect the capacity."""

    @property
    def hit_rate(self) -> float:
        """reused / submitted prompt tokens."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _Node:
    __slots__ = ("children", "parent", "key", "last", "weight")

    def __init__(self, parent: _Node | None, key: object, weight: int = 1) -> None:
        self.children: dict[object, _Node] = {}
        self.parent = parent
        self.key = key
        self.last = 0
        self.weight = weight


class RadixCacheSim:
    """Radix cache of token ids with LRU leaf eviction.

    One node per prompt token; a generated response (never shared) is one node weighing its
    length, so it is evicted as a whole, like a leaf segment of SGLang's radix tree. Eviction
    uses a lazily invalidated heap of leaves (entries whose node has since been touched, grown
    children or been removed are skipped).
    """

    def __init__(self, capacity_tokens: int | None = None) -> None:
        self.root = _Node(None, None, 0)
        self.capacity = capacity_tokens
        self.size = 0
        self.evicted = 0
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, _Node]] = []

    def _touch_leaf(self, node: _Node) -> None:
        if not node.children and node is not self.root:
            heapq.heappush(self._heap, (node.last, id(node), node))

    def match(self, tokens: Sequence[object]) -> int:
        """Length of the longest cached prefix of ``tokens`` (touches the matched path)."""
        now, node, depth = next(self._clock), self.root, 0
        for tok in tokens:
            child = node.children.get(tok)
            if child is None:
                break
            child.last = now
            node, depth = child, depth + 1
        self._touch_leaf(node)
        return depth

    def insert(self, tokens: Sequence[object], tail_weight: int = 0) -> None:
        """Cache every prefix of ``tokens`` (plus an unshared tail of ``tail_weight`` tokens)."""
        now, node = next(self._clock), self.root
        for tok in tokens:
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node(node, tok)
                self.size += 1
            child.last = now
            node = child
        if tail_weight > 0:
            tail = node.children[("tail", now)] = _Node(node, ("tail", now), tail_weight)
            tail.last = now
            self.size += tail_weight
            node = tail
        self._touch_leaf(node)
        self._evict()

    def _evict(self) -> None:
        if self.capacity is None:
            return
        while self.size > self.capacity and self._heap:
            last, _, leaf = heapq.heappop(self._heap)
            parent = leaf.parent
            stale = leaf.children or last != leaf.last or parent is None
            if stale or parent.children.get(leaf.key) is not leaf:
                continue
            del parent.children[leaf.key]
            leaf.parent = None
            self.size -= leaf.weight
            self.evicted += leaf.weight
            self._touch_leaf(parent)


def prefix_reuse(
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    capacity_tokens: int | None = None,
    response_tokens: int = 0,
) -> ReuseStats:
    """Replay ``prompts`` in this order through ``RadixCacheSim`` (module docstring).

    >>> prefix_reuse([[1, 2, 3], [1, 2, 4], [1, 2, 3]]).reused_tokens   # 0 + 2 + 3
    5
    >>> prefix_reuse([[1, 2, 3]], n=4).hit_rate                          # 3 of 4 samples reuse
    0.75
    """
    cache = RadixCacheSim(capacity_tokens)
    submitted = reused = 0
    for prompt in prompts:
        prompt = list(prompt)
        for _ in range(n):
            submitted += len(prompt)
            reused += cache.match(prompt)
            cache.insert(prompt, tail_weight=response_tokens)
    return ReuseStats(prompt_tokens=submitted, reused_tokens=reused, evicted_tokens=cache.evicted)
