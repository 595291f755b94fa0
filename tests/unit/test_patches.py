"""CPU patches: each one is still needed upstream (the test FAILS once Megatron fixes the call
site, so the patch can be deleted), is switchable, and is applied only without a GPU."""

import pytest
import torch

from megatron_rpt import capabilities, patches

pytestmark = pytest.mark.skipif(capabilities.have_cuda(), reason="CPU-only patches")


@pytest.mark.parametrize("name", sorted(patches.PATCHES))
def test_upstream_still_needs_the_patch(name):
    with patches.reverted(name):
        assert patches.PATCHES[name].upstream_fails(), (
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


@pytest.fixture(scope="module")
def optimizer_checkpoint_bugs():
    from megatron_rpt.patches import dist_optimizer_checkpoint

    with patches.reverted("optckpt"):
        return dist_optimizer_checkpoint.upstream_bugs()


@pytest.mark.parametrize("bug", ["fresh_load_asserts", "step_overwritten", "step_shared"])
def test_each_optimizer_checkpoint_bug_is_still_upstream(optimizer_checkpoint_bugs, bug):
    assert optimizer_checkpoint_bugs[bug], (
        f"DistributedOptimizer bug '{bug}' is fixed upstream: drop its fix from "
        "megatron_rpt/patches/dist_optimizer_checkpoint.py"
    )


def test_optimizer_checkpoint_patch_fixes_all_three_bugs():
    from megatron_rpt.patches import dist_optimizer_checkpoint

    assert dist_optimizer_checkpoint.upstream_bugs(patched=True) == {
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
