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

When to remove: when ``upstream_fails()`` returns False, i.e. all three bugs are gone (the
test in tests/unit/test_patches.py also reports each bug separately).
"""

from __future__ import annotations

import contextlib
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


# ----------------------------------------------------------------------------- probes


def upstream_bugs(*, patched: bool = False) -> dict[str, bool]:
    """Run each of the three code paths on a tiny model; True = the bug shows.

    Unpatched by default (does upstream still need the fix?); ``patched=True`` checks that the
    patch fixes all three.

    Creates a 1-rank gloo group when none exists and (re)initialises Megatron's model-parallel
    state at TP=PP=1: call it only where no other model-parallel state is in use (tests).
    """
    from megatron_rpt.distributed import single_process_group

    if not needed():
        return {"fresh_load_asserts": False, "step_overwritten": False, "step_shared": False}
    with single_process_group():
        return _probe(patched)


def upstream_fails() -> bool:
    """True while all three bugs are present (see ``upstream_bugs``)."""
    return all(upstream_bugs().values())


def _probe(patched: bool) -> dict[str, bool]:
    from megatron_rpt import patches
    from megatron_rpt.distributed import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)  # applies the enabled patches
    if patched:
        if not is_applied():
            apply()
        return _run_checks(groups)
    with patches.reverted("optckpt"):
        return _run_checks(groups)


def _run_checks(groups: Any) -> dict[str, bool]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rpt import patches

    chunk = _tiny_ddp_model(groups)
    config = OptimizerConfig(optimizer="adam", lr=0.1, use_distributed_optimizer=True)
    with patches.optimizer_mode():
        opt = get_megatron_optimizer(
            config, [chunk], use_gloo_process_groups=False, pg_collection=groups.pg_collection
        ).chained_optimizers[0]
    bugs = {}
    model_sd = chunk.module.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    try:
        opt.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
        bugs["fresh_load_asserts"] = False
    except AssertionError:
        bugs["fresh_load_asserts"] = True
    opt._init_optimizer_states_with_dummy_values()
    param = next(iter(opt.model_param_group_index_map))
    source = {  # what a fully_reshardable checkpoint provides: everything but 'step'
        k: v.detach().clone()
        for k, v in opt._get_main_param_and_optimizer_states(param).items()
        if k != "step"
    }
    try:
        with torch.no_grad():
            opt._set_main_param_and_optimizer_states(param, source)
        bugs["step_overwritten"] = False
    except KeyError:
        bugs["step_overwritten"] = True
    with torch.no_grad(), contextlib.suppress(Exception):
        opt.load_state_dict(opt.state_dict())
    steps = [s["step"] for s in opt.optimizer.state.values()]
    bugs["step_shared"] = len(steps) > 1 and steps[0] is steps[1]
    return bugs


def _tiny_ddp_model(groups: Any) -> Any:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=16,
        max_sequence_length=8,
        pg_collection=groups.pg_collection,
    )
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True)
    return DistributedDataParallel(config, ddp_config, model, pg_collection=groups.pg_collection)
