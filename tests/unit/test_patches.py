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
