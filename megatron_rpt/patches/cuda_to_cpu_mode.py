"""Patch 'mode': inside ``CudaToCpuMode()``, tensors requested on ``device="cuda"`` go to CPU.

What it changes: nothing globally. ``CudaToCpuMode`` is a ``torch.overrides.TorchFunctionMode``
that megatron_rpt enters only around the Megatron calls that need it (model construction and
the pipeline schedules); inside it, a ``device`` argument naming CUDA becomes ``cpu`` and
``Tensor.cuda()`` returns the tensor unchanged. Torch function modes are thread-local and end
with the ``with`` block.

Why it is safe: on a machine without CUDA such a call can only raise; CPU is the device every
tensor of the run lives on. Call sites in 0.16.1: ``total_num_tokens = torch.zeros([],
dtype=torch.int, device="cuda")`` in all three schedules of
``megatron/core/pipeline_parallel/schedules.py`` (even the no-pipelining one), and
``weight.data.cuda()`` in ``LanguageModule.setup_embeddings_and_output_layer`` when a model
with tied embeddings is split over pipeline stages.

When to remove: when ``upstream_fails()`` returns False (the schedules allocate on the model's
device instead of a literal "cuda").
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

GLOBAL = False


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device requests of torch calls to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def is_applied() -> bool:
    """Never applied globally (it is a context manager)."""
    return False


class _ReachedForwardStep(Exception):
    pass


def upstream_fails() -> bool:
    """Run the unpatched no-pipelining schedule up to its first forward step.

    True when it fails the CPU-only way before reaching the forward step.
    """
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_rpt.patches import is_cuda_failure

    model = torch.nn.Linear(1, 1)
    model.config = ModelParallelConfig()
    model.model_type = None
    pgs = ProcessGroupCollection()
    for name in ("tp", "cp", "embd", "pos_embd", "pp", "dp_cp"):
        setattr(pgs, name, None)

    def forward_step(data_iterator, model):  # noqa: ANN001, ANN202
        raise _ReachedForwardStep

    try:
        forward_backward_no_pipelining(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=1,
            micro_batch_size=1,
            forward_only=True,
            pg_collection=pgs,
        )
    except _ReachedForwardStep:
        return False
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_cuda_failure(exc):
            return True
        raise
    return False
