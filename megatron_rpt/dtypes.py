"""The one dtype vocabulary: config spellings, torch dtypes and short precision labels.

Config fields that name a dtype (``model.dtype``, ``rollout.dtype``, ``data.entropy_dtype``,
``eval.dtype``, ``weight_sync.push_dtype``) accept torch's names (``float32``, ``bfloat16``,
``float16``, also what HF's ``torch_dtype`` and SGLang's ``--dtype`` use) and Megatron's short
names (``fp32``, ``bf16``, ``fp16``). ``megatron_rpt.config.resolve`` rewrites them to torch's
names; every module that turns a name into a ``torch.dtype`` or a label goes through here.

>>> canonical_dtype("bf16"), canonical_dtype("float32"), short_dtype("bfloat16")
('bfloat16', 'float32', 'bf16')
>>> canonical_dtype("int8", "model.dtype")
Traceback (most recent call last):
...
megatron_rpt.errors.ConfigError: model.dtype: 'int8' is not a dtype (one of float32, bfloat16, float16, fp32, bf16, fp16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from megatron_rpt.errors import ConfigError

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
"""The canonical spelling (torch's attribute names)."""

_SHORT: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_ALIASES: dict[str, str] = {
    **{name: name for name in _SHORT},
    **{short: name for name, short in _SHORT.items()},
    "float": "float32",
    "half": "float16",
}


def canonical_dtype(name: str, field: str = "dtype") -> str:
    """``name`` in torch's spelling; ConfigError naming ``field`` for an unknown name."""
    try:
        return _ALIASES[name]
    except (KeyError, TypeError):
        known = ", ".join([*_SHORT, *_SHORT.values()])
        raise ConfigError(f"{field}: {name!r} is not a dtype (one of {known})") from None


def short_dtype(name: str, field: str = "dtype") -> str:
    """Megatron's short name ('fp32', 'bf16', 'fp16'): checkpoint metadata, precision labels."""
    return _SHORT[canonical_dtype(name, field)]


def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` of a name in either spelling."""
    import torch  # heavy: only the callers that build tensors pay for it

    return getattr(torch, canonical_dtype(name, field))


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a ``torch.dtype`` (ConfigError for one outside the vocabulary)."""
    return canonical_dtype(str(dtype).removeprefix("torch."), "dtype")


__all__ = ["DtypeName", "canonical_dtype", "dtype_name", "short_dtype", "torch_dtype"]
