"""A model's modules and parameters without their wrappers, under global names.

``unwrap_model`` strips DDP / Float16Module wrappers; ``named_global_parameters(chunks)`` names
the parameters of model chunks (any wrappers, any PP stage) canonically: no wrapper prefix and
global layer indices, the names the conversion table and checkpoints use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def named_global_parameters(
    chunks: Sequence[torch.nn.Module],
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of model chunks: no wrapper prefix, global layer indices."""
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers = getattr(getattr(model, "decoder", None), "layers", [])
        offsets = [layer.layer_number - 1 for layer in layers]  # layer_number is global, 1-based
        for name, param in model.named_parameters():
            yield _globalize(name, offsets), param


def _globalize(name: str, global_index: list[int]) -> str:
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    local, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{global_index[int(local)]}.{rest}"
