"""Patch 'optckpt': DistributedOptimizer checkpoint load with torch's Adam (docs/CPU.md).

Without Transformer Engine or Apex, Megatron-Core 0.16.1's ``DistributedOptimizer`` wraps
``torch.optim.AdamW``, whose per-parameter ``step`` is a tensor in the optimizer *state* (the
fused optimizers keep it in the param groups). Three bugs on that path make a resumed run
silently different from an uninterrupted one:

1. ``sharded_state_dict(..., is_loading=True)`` on a fresh optimizer (no step taken yet)
   fails an assertion: it calls ``state_dict()``, which reads the (missing) per-param steps.
   **Fix:** initialise the states with Megatron's own
   ``_init_optimizer_states_with_dummy_values()`` first (they are overwritten by the load).
2. ``_set_main_param_and_optimizer_states`` copies *every* key of the destination state, so a
   source without ``step`` (``fully_reshardable``) raises ``KeyError: 'step'``, and with
   ``dp_reshardable`` the saved step is overwritten by the dummy value. **Fix:** copy only the
   keys the source has, never ``step`` (which ``load_state_dict`` restores from the param groups).
3. ``load_state_dict`` sets every parameter's ``step`` to **one shared tensor**; torch's Adam
   increments it in place once per parameter, so after a resume the bias correction uses a step
   count multiplied by the number of parameters. **Fix:** after the load, give each parameter
   its own copy.

What it changes: three methods of ``DistributedOptimizer`` (wrapped, globally), only when
Megatron uses torch's Adam (``distrib_optimizer.HAVE_APEX_OR_TE`` is False), on CPU or GPU.

Why it is safe: each fix restores what the TE/Apex path does (a step count taken from the
param groups, one counter per parameter) and touches nothing else; with the fixes resume is
bit-exact (tests/distributed/test_trainer_resume.py).

When to remove: when all three bugs are gone upstream. The probe that runs the three code
paths needs a GPTModel, DDP and an optimizer, so it lives with the tests
(tests/unit/test_patches.py, which reports each bug separately and fails once one is fixed).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

GLOBAL = True
_ORIGINALS: dict[str, Any] = {}
_METHODS = ("sharded_state_dict", "_set_main_param_and_optimizer_states", "load_state_dict")


def needed() -> bool:
    """Megatron's DistributedOptimizer runs on torch's Adam (no TE/Apex fused optimizer)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _uses_torch_step_state(opt: Any) -> bool:
    return not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8


def _sharded_state_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
    is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
    if is_loading and _uses_torch_step_state(self) and not self.optimizer.state:
        self._init_optimizer_states_with_dummy_values()  # fix 1
    return _ORIGINALS["sharded_state_dict"](self, *args, **kwargs)


def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
    if not _uses_torch_step_state(self):
        return _ORIGINALS["_set_main_param_and_optimizer_states"](self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in dst.items():
        if key != "step" and key in tensors:  # fix 2
            value.copy_(tensors[key])
    return None


def _load_state_dict(self: Any, state_dict: Any) -> None:
    _ORIGINALS["load_state_dict"](self, state_dict)
    if _uses_torch_step_state(self):
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()  # fix 3


def apply() -> None:
    """Install the three wrappers."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    replacements = {
        "sharded_state_dict": _sharded_state_dict,
        "_set_main_param_and_optimizer_states": _set_main_param_and_optimizer_states,
        "load_state_dict": _load_state_dict,
    }
    for name in _METHODS:
        _ORIGINALS.setdefault(name, getattr(DistributedOptimizer, name))
        setattr(DistributedOptimizer, name, functools.wraps(_ORIGINALS[name])(replacements[name]))


def revert() -> None:
    """Restore Megatron's methods."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for name, original in _ORIGINALS.items():
        setattr(DistributedOptimizer, name, original)


def is_applied() -> bool:
    """The wrappers are installed."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return "sharded_state_dict" in _ORIGINALS and (
        DistributedOptimizer.sharded_state_dict is not _ORIGINALS["sharded_state_dict"]
    )
