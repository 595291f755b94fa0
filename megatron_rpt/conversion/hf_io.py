"""HF checkpoint files: a lazy safetensors reader and a streaming sharded safetensors writer.

Memory is the point of this module (conversion must stay under 2.5x the checkpoint size):

* ``HFWeights`` opens the safetensors file holding a tensor only while reading that tensor
  (``safe_open`` per tensor), so at most one tensor is materialised and no file stays mapped.
* ``SafetensorsShardWriter`` lays out every shard from a plan (names, shapes, dtypes) *before*
  any data arrives, then writes each tensor at its offset as it is produced, in any order. An
  export therefore never accumulates a shard in memory, and a missing, unexpected or
  mis-shaped tensor is an error naming it.

The files are standard safetensors (8-byte little-endian header length, JSON header with
``data_offsets`` relative to the data section, tensors packed back to back) with an HF
``model.safetensors.index.json`` when there is more than one shard.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_rpt.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that hold weights (never copied as "side files" of a model directory).
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
    ".distcp",
)
_DTYPE_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",  # FP8 rollout checkpoints (weight_sync/fp8.py)
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class HFWeights:
    """Lazy read access to the safetensors weights of an HF model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in self._weight_files():
            try:
                with safe_open(str(file), framework="pt") as fh:
                    for name in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        tensor_slice = fh.get_slice(name)
                        self._file_of[name] = file
                        self._meta[name] = (
                            tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                        )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable safetensors index: {exc}") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            outside = sorted(
                {f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")}
            )
            if outside:
                raise CheckpointError(
                    f"{index}: shard file(s) {outside[:3]} are not plain file names inside "
                    f"{self.dir}"
                )
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists missing shard file(s) {missing}")
            return files
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return [single]
        others = sorted(p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {others}: only safetensors weights are read)" if others else ""
        raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._meta)

    def file_of(self, name: str) -> Path:
        """The shard file holding ``name``."""
        self._require(name)
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` from the file header (no data read)."""
        self._require(name)
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of ``name`` from the file header."""
        self._require(name)
        return _CODE_DTYPES[self._meta[name][1]]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; its file is opened for this read only."""
        self._require(name)
        file = self._file_of[name]
        try:
            with safe_open(str(file), framework="pt") as fh:
                return fh.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors
            raise CheckpointError(f"{file}: cannot read tensor '{name}' ({exc})") from None

    def _require(self, name: str) -> None:
        if name not in self._meta:
            where = self.dir / (INDEX_FILE if (self.dir / INDEX_FILE).is_file() else SINGLE_FILE)
            raise CheckpointError(f"{where}: tensor '{name}' is missing")


class SafetensorsShardWriter:
    """Write planned tensors into safetensors shards as they arrive (see module docstring)."""

    def __init__(
        self,
        out_dir: str | Path,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 * 2**30,
    ) -> None:
        self.dir = Path(out_dir)
        self._slot: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype, int]] = {}
        self._written: set[str] = set()
        shards = _split_plan(plan, max_shard_bytes)
        self.files = [
            self.dir
            / (
                SINGLE_FILE
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            for i in range(len(shards))
        ]
        for file, shard in zip(self.files, shards, strict=True):
            self._layout(file, shard)
        self.total_bytes = sum(slot[4] for slot in self._slot.values())

    def _layout(self, file: Path, shard: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        offsets = {}
        for name, shape, dtype in shard:
            nbytes = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offsets[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        data_start = 8 + len(raw)
        with open(file, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            fh.truncate(data_start + offset)
        for name, shape, dtype in shard:
            start, nbytes = offsets[name]
            self._slot[name] = (file, data_start + start, tuple(shape), dtype, nbytes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor at its place."""
        if name not in self._slot:
            raise CheckpointError(f"export produced unexpected tensor '{name}'")
        if name in self._written:
            raise CheckpointError(f"export produced tensor '{name}' twice")
        file, start, shape, dtype, nbytes = self._slot[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(
                f"tensor '{name}' is {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        with open(file, "r+b") as fh:
            fh.seek(start)
            fh.write(memoryview(data))
        self._written.add(name)

    def write_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write every tensor of an iterator."""
        for name, tensor in tensors:
            self.write(name, tensor)

    def finish(self) -> list[Path]:
        """Check completeness, fsync, write the index for several shards; return the files."""
        missing = [name for name in self._slot if name not in self._written]
        if missing:
            raise CheckpointError(
                f"export did not produce planned tensors {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        for file in self.files:
            with open(file, "rb+") as fh:
                os.fsync(fh.fileno())
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: slot[0].name for name, slot in sorted(self._slot.items())},
            }
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _split_plan(
    plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = _nbytes(item[1], item[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def copy_side_files(src: str | Path, dst: str | Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy the non-weight files of an HF model dir (tokenizer, generation config, license...).

    ``config.json`` is copied too unless listed in ``skip``; sub-directories are not copied,
    and a link pointing outside ``src`` is refused (it would copy a foreign file into every
    checkpoint).
    """
    src, dst = Path(src), Path(dst)
    skip = set(skip) | {INDEX_FILE}
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in skip or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.name.startswith("."):
            continue
        if path.is_symlink() and src.resolve() not in path.resolve().parents:
            raise CheckpointError(
                f"{path}: a link to {path.resolve()}, outside the model directory; copy the "
                "file in (links out of a model directory are not followed)"
            )
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied
