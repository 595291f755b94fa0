"""Fault injection for tests: corrupted weight buckets, failing engines.

* ``corrupt_bucket``: a weight-sync ``BucketFilter`` that corrupts one bucket;
* ``FaultyLink``: the bucket filter to give ``WeightSync(..., bucket_filter=link)``: the
  identity, except inside ``with link.corrupting(i): sync(version=v)``;
* ``FaultyEngine`` / ``EngineFaults``: a rollout engine wrapper whose sampling calls die or
  hang on a plan shared across restarts (trainer/fleet.py tests).

The filter sees bucket ``i`` *after* the trainer-side fingerprints were recorded and before
the engine does, as a transport bug would. It replaces tensors with modified copies: at TP = 1
streamed tensors can be views of the trainer's parameters, which must stay untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def corrupt_bucket(index: int, *, everything: bool = False):  # noqa: ANN201 - a BucketFilter
    """A bucket filter that corrupts bucket ``index``.

    Default: move one element of the bucket's first tensor to the next representable value
    (one ulp: the smallest corruption there is) - invisible to a log-prob probe, caught by
    fingerprints. ``everything=True``: negate every tensor of the bucket - gross corruption the
    probe must catch.

    >>> hook = corrupt_bucket(1)
    >>> t = torch.ones(2, 2)
    >>> hook(0, [("a", t)])[0][1] is t
    True
    >>> bad = hook(1, [("a", t)])[0][1]
    >>> (bad != t).sum().item(), bad[0, 0].item() - 1.0, t[0, 0].item()
    (1, 1.1920928955078125e-07, 1.0)
    """

    def corrupt(i: int, tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        if i != index:
            return tensors
        if everything:
            return [(name, -t) for name, t in tensors]
        (name, first), rest = tensors[0], tensors[1:]
        bad = first.clone()
        flat = bad.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=bad.dtype))
        return [(name, bad), *rest]

    return corrupt


class FaultyLink:
    """A ``BucketFilter`` that passes every bucket through unless a corruption is armed.

    >>> link, t = FaultyLink(), torch.ones(2)
    >>> link(0, [("a", t)])[0][1] is t
    True
    >>> with link.corrupting(0, everything=True):
    ...     link(0, [("a", t)])[0][1].tolist()
    [-1.0, -1.0]
    >>> link(0, [("a", t)])[0][1] is t
    True
    """

    def __init__(self) -> None:
        self._filter = None

    @contextmanager
    def corrupting(self, index: int, *, everything: bool = False) -> Iterator[None]:
        """Corrupt bucket ``index`` (``corrupt_bucket``) of every sync inside the block."""
        self._filter = corrupt_bucket(index, everything=everything)
        try:
            yield
        finally:
            self._filter = None

    def __call__(
        self, index: int, tensors: list[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        return tensors if self._filter is None else self._filter(index, tensors)


class EngineFaults:
    """Which sampling calls fail, counted over every engine that shares this object.

    ``plan`` maps the 1-based index of a sampling ``generate`` call to ``"die"`` (raise, and
    the engine reports itself unhealthy afterwards) or ``"hang"`` (sleep ``hang_s``);
    ``always="die"`` fails every call. Greedy calls (the weight-sync probe) are not counted.
    """

    def __init__(
        self,
        plan: dict[int, str] | None = None,
        *,
        always: str | None = None,
        hang_s: float = 3600.0,
    ) -> None:
        self.plan, self.always, self.hang_s = dict(plan or {}), always, hang_s
        self.calls = 0
        self.injected: list[tuple[int, str]] = []
        self.engines_built = 0


class FaultyEngine:
    """A ``RolloutEngine`` that forwards to ``inner`` except where ``faults`` says otherwise."""

    def __init__(self, inner: Any, faults: EngineFaults) -> None:
        self.inner, self.faults, self.dead = inner, faults, False
        faults.engines_built += 1

    def generate(self, prompts: Sequence[Sequence[int]], params: Any) -> Any:
        """The inner engine's completions, unless this call is planned to fail."""
        if self.dead:
            raise RuntimeError("injected: engine is dead")
        if not params.greedy:
            self.faults.calls += 1
            kind = self.faults.always or self.faults.plan.get(self.faults.calls)
            if kind is not None:
                self.faults.injected.append((self.faults.calls, kind))
            if kind == "die":
                self.dead = True
                raise RuntimeError(f"injected: engine died in generate call {self.faults.calls}")
            if kind == "hang":
                time.sleep(self.faults.hang_s)
        return self.inner.generate(prompts, params)

    def health(self) -> bool:
        """False once an injected death happened."""
        return not self.dead and self.inner.health()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
