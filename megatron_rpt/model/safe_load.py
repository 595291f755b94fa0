"""Reading pickled checkpoint files without running code from them.

A ``torch_dist`` checkpoint stores its index (``.metadata``) as a plain pickle, and
torch.distributed.checkpoint loads its "byte" entries (Megatron's ``ShardedObject``s: layer
``_extra_state``, optimizer param groups) with ``torch.load(weights_only=False)``. Either runs
arbitrary code from a crafted file. Checkpoints are shared between teams and downloaded, so
every such file is read here first:

* ``check_dcp_metadata(dir)`` unpickles ``<dir>/.metadata`` with an ``Unpickler`` that builds
  only torch.distributed.checkpoint's metadata types (and the two placeholder classes
  megatron-core adds); anything else is refused with a ``CheckpointError`` naming the file and
  the class, before dist_checkpointing opens the directory.
* ``safe_byte_entries()`` is a context in which torch.distributed.checkpoint first decodes each
  byte entry with ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings,
  dtypes, ``io.BytesIO``), refusing anything else, and only then hands it on.
* ``load_tensor_file(path)`` is ``torch.load(weights_only=True)`` whose failure is one line
  naming the file (never torch's advice to retry with ``weights_only=False``).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rpt.errors import CheckpointError

DCP_METADATA = ".metadata"
LOAD_ERRORS = (Exception, CheckpointException)
"""What a failed dist_checkpointing load raises (torch's CheckpointException is no Exception)."""

_DCP = "torch.distributed.checkpoint"
_ALLOWED: dict[str, set[str]] = {
    f"{_DCP}.metadata": {
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex",
        "StorageMeta", "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    f"{_DCP}.planner": {
        "SavePlan", "LoadPlan", "TensorWriteData", "WriteItem", "WriteItemType", "ReadItem",
        "LoadItemType",
    },
    f"{_DCP}.filesystem": {"_StorageInfo"},
    # Placeholders megatron-core keeps so that older checkpoints' metadata unpickles.
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
    "torch": {"Size", "device"},
    "torch.serialization": {"_get_layout"},
    "builtins": {"set", "frozenset", "slice"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}  # fmt: skip

# torch's text when a weights_only load fails advises retrying with weights_only=False, which
# is exactly what must not be done with an untrusted file: such sentences are dropped.
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])|\n+")
_ADVICE_WORDS = ("weights_only", "trusted source", "documentation of torch.load")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path}: refusing to load class {module}.{name} (checkpoint metadata may "
            "only hold torch.distributed.checkpoint metadata types; the file may be malicious)"
        )


def check_dcp_metadata(directory: str | Path) -> Any:
    """Unpickle ``<directory>/.metadata`` with the allow-list; return the Metadata object."""
    path = Path(directory) / DCP_METADATA
    try:
        with open(path, "rb") as fh:
            metadata = _RestrictedUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure of a corrupt file
        raise CheckpointError(
            f"{path}: not a readable dist checkpoint index: {clean_message(exc)}"
        ) from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{path}: holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata"
        )
    return metadata


def clean_message(exc: BaseException) -> str:
    """``exc``'s message on one line, without torch's advice to load with weights_only=False.

    >>> clean_message(ValueError("Load failed. Re-running with weights_only=False works."))
    'Load failed.'
    """
    kept = [
        s.strip()
        for s in _SENTENCE.split(str(exc))
        if s.strip() and not any(w in s for w in _ADVICE_WORDS)
    ]
    return " ".join(" ".join(kept).split()) or type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The first underlying error of a torch.distributed.checkpoint failure (it wraps per rank)."""
    for _ in range(8):
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
            exc = inner[0] if isinstance(inner, tuple) else inner
        elif isinstance(exc.__cause__, BaseException) and not isinstance(exc, CheckpointError):
            exc = exc.__cause__
        else:
            break
    return exc


def failure_message(exc: BaseException, limit: int = 400) -> str:
    """One line for a failed dist_checkpointing load: the underlying cause, no unsafe advice."""
    cause = root_cause(exc)
    text = str(cause) if isinstance(cause, CheckpointError) else clean_message(cause)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_tensor_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``; a corrupt or unsafe file is one CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or hostile file
        raise CheckpointError(f"{path}: cannot read: {clean_message(exc)}") from None


def _safe_bytes(value: io.BytesIO, fqn: str) -> None:
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            torch.load(value, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint entry '{fqn}' is not plain data, refusing to load it: {clean_message(exc)}"
        ) from None
    value.seek(0)


@contextlib.contextmanager
def safe_byte_entries() -> Iterator[None]:
    """torch.distributed.checkpoint byte entries are checked as weights-only data first."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    original = DefaultLoadPlanner.load_bytes

    def load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
        _safe_bytes(value, read_item.dest_index.fqn)
        original(self, read_item, value)

    DefaultLoadPlanner.load_bytes = load_bytes  # type: ignore[method-assign]
    try:
        yield
    finally:
        DefaultLoadPlanner.load_bytes = original  # type: ignore[method-assign]


__all__ = [
    "LOAD_ERRORS",
    "check_dcp_metadata",
    "clean_message",
    "failure_message",
    "load_tensor_file",
    "safe_byte_entries",
]
