"""Which engine samples which contexts: document-affinity blocks, balanced by expected tokens.

A sampling round's requests (one per context, each sampled G times) are cut into *blocks*:

* requests are taken in document order (``scheduling.document_order``: grouped by document,
  then by position), and a block holds whole documents: all G samples of a context and all
  contexts of a document land in one block, hence on one engine, whose prefix cache then sees
  the shared prefixes;
* a block closes when the next document would take it past ``max_contexts`` contexts (a
  document with more contexts than that is a block of its own).

Blocks do not depend on the number of engines: each is generated in one engine call with a
seed of its own (``block_seed``), so with seeded sampling the completions are the same
whichever engine generates a block, and 1, 2 or 4 engines give identical rollouts.

Blocks are assigned to engines by expected tokens, ``(prompt + max_new_tokens) * n`` per
context: largest block first, each to the least loaded engine (ties: lower block index, lower
engine index), which is deterministic and identical on every rank. Pure: no torch, no engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_rpt.rollout.scheduling import RolloutRequest, document_order


@dataclass(frozen=True)
class Block:
    """Requests generated together by one engine call."""

    index: int
    requests: tuple[int, ...]
    """Indices into the round's request list, in document order."""
    tokens: int
    """Expected tokens: (prompt + max_new_tokens) * n summed over the block's contexts."""


@dataclass(frozen=True)
class Route:
    """A round's blocks and the blocks of every engine."""

    blocks: tuple[Block, ...]
    engines: tuple[tuple[int, ...], ...]
    """Block indices per engine (engine order), each in block order."""

    def load(self) -> list[int]:
        """Expected tokens per engine."""
        return [sum(self.blocks[b].tokens for b in bs) for bs in self.engines]


def make_blocks(
    requests: Sequence[RolloutRequest], *, max_contexts: int, n: int, max_new_tokens: int
) -> list[Block]:
    """Whole documents per block, at most ``max_contexts`` contexts unless one document has more.

    >>> reqs = [RolloutRequest(d, p, (1,) * 3) for d, p in [("a", 1), ("b", 1), ("a", 2), ("c", 1)]]
    >>> [b.requests for b in make_blocks(reqs, max_contexts=2, n=2, max_new_tokens=5)]
    [(0, 2), (1, 3)]
    >>> make_blocks(reqs, max_contexts=2, n=2, max_new_tokens=5)[0].tokens   # 2 x (3 + 5) x 2
    32
    """
    order = document_order(requests)
    docs: list[list[int]] = []
    for i in order:
        if docs and requests[docs[-1][0]].doc_id == requests[i].doc_id:
            docs[-1].append(i)
        else:
            docs.append([i])
    blocks: list[list[int]] = []
    for doc in docs:
        if blocks and len(blocks[-1]) + len(doc) <= max(1, max_contexts):
            blocks[-1].extend(doc)
        else:
            blocks.append(list(doc))
    return [
        Block(k, tuple(b), sum((len(requests[i].prompt_ids) + max_new_tokens) * n for i in b))
        for k, b in enumerate(blocks)
    ]


def assign_blocks(blocks: Sequence[Block], num_engines: int) -> tuple[tuple[int, ...], ...]:
    """Largest block first to the least loaded engine (deterministic).

    >>> blocks = [Block(i, (i,), t) for i, t in enumerate([5, 9, 4, 4])]
    >>> assign_blocks(blocks, 2)
    ((1, 3), (0, 2))
    """
    load = [0] * num_engines
    mine: list[list[int]] = [[] for _ in range(num_engines)]
    for block in sorted(blocks, key=lambda b: (-b.tokens, b.index)):
        e = min(range(num_engines), key=lambda k: (load[k], k))
        load[e] += block.tokens
        mine[e].append(block.index)
    return tuple(tuple(sorted(bs)) for bs in mine)


def route(
    requests: Sequence[RolloutRequest],
    num_engines: int,
    *,
    max_contexts: int,
    n: int,
    max_new_tokens: int,
) -> Route:
    """Blocks of ``requests`` and their engines (see the module docstring)."""
    blocks = make_blocks(requests, max_contexts=max_contexts, n=n, max_new_tokens=max_new_tokens)
    return Route(tuple(blocks), assign_blocks(blocks, num_engines))


def block_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of block ``index`` of a round seeded ``seed`` (None stays None).

    >>> block_seed(7, 0) == block_seed(7, 0) != block_seed(7, 1)
    True
    """
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}/block/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


__all__ = ["Block", "Route", "assign_blocks", "block_seed", "make_blocks", "route"]
