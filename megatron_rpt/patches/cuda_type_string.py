"""Patch 'typestr': inside ``CudaTypeStringMode()``, CPU tensors report CUDA type strings.

What it changes: nothing globally. ``CudaTypeStringMode`` is a
``torch.overrides.TorchFunctionMode`` that megatron_rpt enters only around the Megatron
optimizer (construction, ``step()``, state-dict calls; see ``patches.optimizer_mode()``);
inside it, the argument-less ``Tensor.type()`` of a CPU tensor returns the CUDA name
(``'torch.FloatTensor'`` -> ``'torch.cuda.FloatTensor'``). ``Tensor.type(dtype)`` (a cast) and
CUDA tensors are untouched. Torch function modes are thread-local and end with the block.

Why it is safe: Megatron-Core 0.16.1 calls ``param.type()`` only in the optimizer, to pick the
main-parameter path by dtype (``DistributedOptimizer._build_model_and_main_param_groups``,
``Float16OptimizerWithFloat16Params.__init__``, ``clip_grads.count_zeros_fp32``); anything
else raises "Wrapped parameters must be one of torch.cuda.FloatTensor, ...". On a CPU-only
machine the CPU tensor is exactly what the CUDA branch expects to handle (same dtype, same
arithmetic); only the device name in the string differs. A global variant
would change the answer for every caller; this one is scoped to the optimizer calls (docs/CPU.md).

When to remove: when ``upstream_fails()`` returns False (the optimizer accepts CPU parameters).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

GLOBAL = False


class CudaTypeStringMode(TorchFunctionMode):
    """Answer ``Tensor.type()`` of CPU tensors with the CUDA type name (see the docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch.") :]
            return name
        return func(*args, **kwargs)


def is_applied() -> bool:
    """Never applied globally (it is a context manager)."""
    return False


def upstream_fails() -> bool:
    """Build Megatron's Float16 optimizer over a CPU bf16 parameter (device requests patched).

    True when it refuses the CPU parameter by its type string.
    """
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    from megatron_rpt.patches.cuda_to_cpu_mode import CudaToCpuMode

    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    inner = torch.optim.SGD([param], lr=0.1)
    config = OptimizerConfig(optimizer="sgd", lr=0.1, bf16=True, params_dtype=torch.bfloat16)
    try:
        with CudaToCpuMode():
            Float16OptimizerWithFloat16Params(inner, config, None, lambda: None)
    except TypeError as exc:
        if "torch.cuda" in str(exc):
            return True
        raise
    return False
