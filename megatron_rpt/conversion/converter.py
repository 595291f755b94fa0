"""Per-parameter HF <-> Megatron conversion driven by the name table, plus streaming export.

``WeightConverter(arch, padded_vocab_size)`` is the one object every path uses:

* ``megatron_to_hf(name, full)`` -> ``[(hf_name, tensor), ...]`` for one canonical Megatron
  parameter (full = unsharded: callers holding TP/PP shards gather them first with
  ``tp_sharding.tp_unshard``; this is the per-parameter API live weight sync uses);
* ``hf_to_megatron(name, fetch)`` -> the full Megatron tensor, reading HF tensors lazily
  through ``fetch(hf_name)`` and checking their shapes;
* ``iter_hf_weights(named_tensors)`` streams ``(hf_name, tensor)`` one parameter at a time;
* ``hf_plan(megatron_shapes)`` lists the HF tensors an export will produce, computed by running
  the transforms on meta tensors (no data), so a writer can lay out files before any data moves.

``iter_hf_weights(model_or_state_dict, ...)`` is the one-call streaming export of a full
(TP=1, PP=1) model or a full state dict (model chunks are named by
``model.parameters.named_global_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from megatron_rpt.conversion.mappings import (
    ParamMapping,
    find_mapping,
    hf_names,
    mapping_table,
)
from megatron_rpt.conversion.transforms import TRANSFORMS, ConversionContext
from megatron_rpt.errors import CheckpointError
from megatron_rpt.model.arch import ArchSpec
from megatron_rpt.model.parameters import named_global_parameters

Fetch = Callable[[str], torch.Tensor]


class WeightConverter:
    """Converts single parameters between canonical Megatron names and HF tensors."""

    def __init__(self, arch: ArchSpec, padded_vocab_size: int) -> None:
        if padded_vocab_size < arch.vocab_size:
            raise CheckpointError(
                f"padded vocabulary {padded_vocab_size} is smaller than vocab_size {arch.vocab_size}"
            )
        self.arch = arch
        self.table = mapping_table(arch)
        self.ctx = ConversionContext(
            num_heads=arch.num_attention_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            vocab_size=arch.vocab_size,
            padded_vocab_size=padded_vocab_size,
        )

    def row(self, name: str) -> tuple[ParamMapping, int | None]:
        """The table row of canonical Megatron parameter ``name`` and its layer index."""
        try:
            return find_mapping(self.table, name)
        except KeyError:
            raise CheckpointError(
                f"Megatron parameter '{name}' has no HF mapping for {self.arch.hf_architecture}"
            ) from None

    def hf_names(self, name: str) -> tuple[str, ...]:
        """HF tensors that Megatron parameter ``name`` is made of."""
        row, layer = self.row(name)
        return hf_names(row, layer)

    def megatron_to_hf(self, name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Full Megatron tensor -> [(hf_name, tensor)]; tensors may be views of ``full``."""
        row, layer = self.row(name)
        out = TRANSFORMS[row.transform].to_hf(full, self.ctx)
        names = hf_names(row, layer) if out else ()
        return list(zip(names, out, strict=True))

    def hf_to_megatron(
        self, name: str, fetch: Fetch, expected_shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Build the full Megatron tensor ``name`` from HF tensors read through ``fetch``.

        With ``expected_shape`` (the full Megatron shape) each HF tensor's shape is checked
        first, and a mismatch raises CheckpointError naming the HF tensor.
        """
        row, layer = self.row(name)
        names = hf_names(row, layer)
        tensors = [fetch(n) for n in names]
        if expected_shape is not None:
            want = self.expected_hf_shapes(row, layer, expected_shape)
            for n, t in zip(names, tensors, strict=True):
                if tuple(t.shape) != want[n]:
                    raise CheckpointError(
                        f"HF tensor '{n}' has shape {list(t.shape)}, expected {list(want[n])} "
                        f"for {self.arch.hf_architecture} as described by its config.json"
                    )
        return TRANSFORMS[row.transform].to_megatron(tensors, self.ctx)

    def expected_hf_shapes(
        self, row: ParamMapping, layer: int | None, megatron_shape: Sequence[int]
    ) -> dict[str, tuple[int, ...]]:
        """HF name -> shape, derived from the Megatron shape through the transform (on meta)."""
        meta = torch.empty(tuple(megatron_shape), device="meta")
        names = hf_names(row, layer)
        if row.transform == "tied_vocab":  # imported like a vocab row block, never exported
            return {names[0]: (self.arch.vocab_size, *tuple(megatron_shape)[1:])}
        outs = TRANSFORMS[row.transform].to_hf(meta, self.ctx)
        return {n: tuple(t.shape) for n, t in zip(names, outs, strict=True)}

    def iter_hf_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream HF tensors from full Megatron tensors, one parameter at a time.

        ``named_tensors`` may be ``named_global_parameters([model])`` of a TP=1/PP=1 model or
        the items of a full state dict; nothing beyond one parameter's outputs is held.
        """
        for name, tensor in named_tensors:
            with torch.no_grad():
                yield from self.megatron_to_hf(name, tensor.detach())

    def hf_plan(
        self, megatron_shapes: Iterable[tuple[str, Sequence[int], torch.dtype]]
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """[(hf_name, shape, dtype)] an export of these Megatron parameters will produce."""
        plan = []
        for name, shape, dtype in megatron_shapes:
            meta = torch.empty(tuple(shape), dtype=dtype, device="meta")
            for hf_name, t in self.megatron_to_hf(name, meta):
                plan.append((hf_name, tuple(t.shape), t.dtype))
        return plan


def iter_hf_weights(
    source: Sequence[torch.nn.Module] | torch.nn.Module | Mapping[str, Any],
    arch: ArchSpec,
    padded_vocab_size: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_name, tensor)`` from a full model (chunk list or module) or full state dict.

    Works one parameter at a time and never copies the model: identity-mapped tensors are
    yielded as views of the parameters (copy them if you keep them past the next step).
    State dict keys may carry wrapper prefixes (``module.``); ``_extra_state`` entries are
    skipped.
    """
    converter = WeightConverter(arch, padded_vocab_size)
    if isinstance(source, Mapping):
        named: Iterable[tuple[str, torch.Tensor]] = (
            (_strip_wrappers(k), v)
            for k, v in source.items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
        )
    else:
        chunks = [source] if isinstance(source, torch.nn.Module) else list(source)
        named = named_global_parameters(chunks)
    return converter.iter_hf_weights(named)


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name
