"""Test-only stand-in for ``torchvision`` so sglang's protocol modules import on CPU CI.

Why: sglang imports torchvision at module level for multimodal preprocessing only
(``transforms``, ``InterpolationMode``, ``io.decode_jpeg``), reached from
``sglang.srt.managers.io_struct`` through its config registry. No CPU build of torchvision is on
PyPI, and the CUDA build fails to import without CUDA libraries (docs/CPU.md).
The request structs, serializer and tensor bucket that megatron_rpt uses never call torchvision.

This module lives under tests/ only and is never shipped: ``install()`` registers a
``sys.meta_path`` finder that serves ``torchvision`` and every ``torchvision.*`` submodule as an
empty module whose attributes are inert placeholders (plus a real Enum for
``InterpolationMode``). It does nothing when a real torchvision can be found, so a GPU machine
with torchvision installed keeps the real one.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_ROOT = "torchvision"


class InterpolationMode(enum.Enum):
    """Same member names as torchvision.transforms.InterpolationMode."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Placeholder:
    """Any attribute of the stand-in: callable, subscriptable, and unusable for real work."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a test stand-in; torchvision is not installed")

    def __getattr__(self, item: str) -> _Placeholder:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self._name}.{item}")

    def __mro_entries__(self, bases):
        return (object,)

    def __getitem__(self, item):
        return self


class _StandInModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        if item == "InterpolationMode":
            return InterpolationMode
        return _Placeholder(f"{self.__name__}.{item}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == _ROOT or fullname.startswith(_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []  # a package, so submodule imports reach this finder
        module.__version__ = "0.0.0+standin"
        module.IS_MEGATRON_RPT_STANDIN = True
        return module

    def exec_module(self, module):
        return None


def install() -> bool:
    """Register the stand-in unless a real torchvision is importable; True if installed."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return True
    if _ROOT not in sys.modules and importlib.util.find_spec(_ROOT) is not None:
        return False
    sys.meta_path.append(_Finder())
    return True
