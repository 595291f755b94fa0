"""CPU patches: each one is still needed upstream (the test FAILS once Megatron fixes the call
site, so the patch can be deleted), is switchable, and is applied only without a GPU."""

import contextlib
from typing import Any

import pytest
import torch

from megatron_rpt import capabilities, patches
from megatron_rpt.distributed import initialize_model_parallel, single_process_group
from megatron_rpt.patches import dist_optimizer_checkpoint

pytestmark = pytest.mark.skipif(capabilities.have_cuda(), reason="CPU-only patches")


def _upstream_fails(name: str) -> bool:
    if name == "optckpt":  # its probe builds a model: it lives here, not in the product
        return all(optimizer_checkpoint_bugs_now().values())
    return patches.PATCHES[name].upstream_fails()


@pytest.mark.parametrize("name", sorted(patches.PATCHES))
def test_upstream_still_needs_the_patch(name):
    with patches.reverted(name):
        assert _upstream_fails(name), (
            f"megatron-core no longer needs the '{name}' CPU patch: delete "
            f"megatron_rpt/patches/{patches.PATCHES[name].__name__.rsplit('.', 1)[1]}.py"
        )


def test_global_patches_apply_and_revert(monkeypatch):
    monkeypatch.setenv(patches.ENV_VAR, "all")
    patches.apply_cpu_patches()
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.synchronize() is None
    with patches.reverted("device"):
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()
    assert patches.PATCHES["device"].is_applied()


def test_patches_are_switchable(monkeypatch):
    monkeypatch.setenv(patches.ENV_VAR, "device")
    assert patches.enabled_patches() == ["device"]
    with patches.cuda_device_mode():  # 'mode' switched off: a plain no-op context
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
    monkeypatch.setenv(patches.ENV_VAR, "none")
    assert patches.enabled_patches() == []
    monkeypatch.setenv(patches.ENV_VAR, "device,bogus")
    with pytest.raises(ValueError, match="unknown patch names"):
        patches.enabled_patches()


def test_cuda_device_mode_is_scoped():
    with patches.cuda_device_mode():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu" and t.cuda() is t and t.to("cuda").device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


# ----------------------------------------------------------------------------- 'optckpt' probe


def optimizer_checkpoint_bugs_now(*, patched: bool = False) -> dict[str, bool]:
    """Run each of the three code paths of patch 'optckpt' on a tiny model; True = the bug shows.

    Unpatched by default (does upstream still need the fix?); ``patched=True`` checks that the
    patch fixes all three. Creates a 1-rank gloo group when none exists and (re)initialises
    Megatron's model-parallel state at TP=PP=1.
    """
    if not dist_optimizer_checkpoint.needed():
        return {"fresh_load_asserts": False, "step_overwritten": False, "step_shared": False}
    with single_process_group():
        groups = initialize_model_parallel(1, 1)  # applies the enabled patches
        if patched:
            if not dist_optimizer_checkpoint.is_applied():
                dist_optimizer_checkpoint.apply()
            return _run_optimizer_checks(groups)
        with patches.reverted("optckpt"):
            return _run_optimizer_checks(groups)


def _run_optimizer_checks(groups: Any) -> dict[str, bool]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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


@pytest.fixture(scope="module")
def optimizer_checkpoint_bugs():
    with patches.reverted("optckpt"):
        return optimizer_checkpoint_bugs_now()


@pytest.mark.parametrize("bug", ["fresh_load_asserts", "step_overwritten", "step_shared"])
def test_each_optimizer_checkpoint_bug_is_still_upstream(optimizer_checkpoint_bugs, bug):
    assert optimizer_checkpoint_bugs[bug], (
        f"DistributedOptimizer bug '{bug}' is fixed upstream: drop its fix from "
        "megatron_rpt/patches/dist_optimizer_checkpoint.py"
    )


def test_optimizer_checkpoint_patch_fixes_all_three_bugs():
    assert optimizer_checkpoint_bugs_now(patched=True) == {
        "fresh_load_asserts": False,
        "step_overwritten": False,
        "step_shared": False,
    }
    assert dist_optimizer_checkpoint.is_applied()


def test_type_strings_are_scoped_to_the_optimizer():
    t = torch.zeros(2)
    with patches.optimizer_mode():
        assert t.type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64  # a cast is not touched
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # 'mode' is active too
    assert t.type() == "torch.FloatTensor"
