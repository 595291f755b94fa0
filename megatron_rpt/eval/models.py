"""Which models an evaluation compares: ``NAME=PATH`` specs resolved to HF directories.

A path may be

* an HF model directory (``config.json`` + weights) or ``embedded:smollm2``: used as is;
* a Megatron checkpoint (what ``checkpoint.discovery.find_checkpoint`` accepts: a converter or
  trainer checkpoint, a run's checkpoints directory -> its latest, a Megatron-LM ``torch_dist``
  directory with ``hf_config``): exported once to a temporary HF directory with the existing
  converter (``checkpoint.megatron_to_hf``), deleted when the evaluation ends. One exact path,
  shared with offline conversion, instead of a second loader.

Before anything heavy runs, each model's tokenizer is compared with the data's: equal
id -> bytes tables (``data/tokens.table_digest``) or a one-line error.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.checkpoint.discovery import METADATA_FILE, find_checkpoint
from megatron_rpt.errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class ModelRef:
    """One ``--model NAME=PATH`` argument."""

    name: str
    """Row label in the report."""
    path: str
    """What the user gave (HF directory, embedded:smollm2 or a Megatron checkpoint)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load with transformers."""

    name: str
    path: str
    """As given by the user."""
    hf_dir: Path
    """HF directory to load (a temporary export for Megatron checkpoints)."""
    kind: Literal["hf", "megatron"]
    """What ``path`` was."""


def parse_model_args(items: Sequence[str]) -> list[ModelRef]:
    """``["base=embedded:smollm2", "rpt=runs/x/ckpt"]`` -> ModelRefs (names unique).

    A bare path is named after its last component.

    >>> [m.name for m in parse_model_args(["base=embedded:smollm2", "runs/rpt/ckpts/"])]
    ['base', 'ckpts']
    >>> parse_model_args(["a=x", "a=y"])
    Traceback (most recent call last):
    ...
    megatron_rpt.errors.ConfigError: --model a=y: the name 'a' is used twice
    """
    refs: list[ModelRef] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name.startswith("embedded:") or "/" in name:
            name, path = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(item.rstrip("/")).name), item
        if not path:
            raise ConfigError(f"--model {item}: expected NAME=PATH")
        if not _NAME.match(name):
            raise ConfigError(f"--model {item}: name {name!r} may use letters, digits, _ . + -")
        if any(r.name == name for r in refs):
            raise ConfigError(f"--model {item}: the name {name!r} is used twice")
        refs.append(ModelRef(name, path))
    if not refs:
        raise ConfigError("--model: give at least one model (NAME=PATH)")
    return refs


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / METADATA_FILE).is_file()


def tokenizer_dir(ref: ModelRef, hf_config: str | None = None) -> Path:
    """The directory holding ``ref``'s tokenizer (no weights are read)."""
    if ref.path.startswith("embedded:"):
        return resolve_model_path(ref.path)
    path = Path(ref.path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--model {ref.name}={ref.path}: not found")
    if _is_hf_dir(path):
        return path
    ckpt = find_checkpoint(path)
    if ckpt.hf_dir is not None:
        return ckpt.hf_dir
    if hf_config is None:
        raise CheckpointError(
            f"--model {ref.name}={ref.path}: Megatron-LM checkpoint without hf/; pass "
            "--hf-config DIR (the HF model it was trained from)"
        )
    return resolve_model_path(hf_config)


def check_tokenizer(ref: ModelRef, tokenizer: Any, digest: str, data_source: str) -> None:
    """DataError unless ``tokenizer`` maps ids to exactly the bytes the data was made with."""
    from megatron_rpt.data.tokens import ByteVocabulary

    mine = ByteVocabulary.from_tokenizer(tokenizer)
    if mine.digest() != digest:
        raise DataError(
            f"--model {ref.name}={ref.path}: its tokenizer ({len(mine)} tokens) differs from "
            f"the one {data_source} was prepared with (byte tables differ); evaluate on data "
            "prepared with this model's tokenizer"
        )


def load_tokenizer_of(ref: ModelRef, hf_config: str | None = None) -> Any:
    """AutoTokenizer of ``ref`` (HF dir, or the checkpoint's hf/ or ``hf_config``)."""
    from megatron_rpt.data.tokens import load_tokenizer

    return load_tokenizer(str(tokenizer_dir(ref, hf_config)))


@contextlib.contextmanager
def materialize(
    refs: Sequence[ModelRef], *, hf_config: str | None = None, workdir: str | Path | None = None
) -> Iterator[list[ResolvedModel]]:
    """HF directories for every ref; Megatron exports live until the ``with`` block ends."""
    with contextlib.ExitStack() as stack:
        out = []
        for ref in refs:
            if ref.path.startswith("embedded:") or _is_hf_dir(Path(ref.path).expanduser()):
                out.append(ResolvedModel(ref.name, ref.path, resolve_model_path(ref.path), "hf"))
                continue
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
            out.append(ResolvedModel(ref.name, ref.path, _export(ref, tmp, hf_config), "megatron"))
        yield out


def _export(ref: ModelRef, tmp: Path, hf_config: str | None) -> Path:
    from megatron_rpt.checkpoint.megatron_to_hf import convert_megatron_to_hf

    logger.info("exporting Megatron checkpoint %s to HF for evaluation", ref.path)
    return convert_megatron_to_hf(ref.path, tmp / "hf", hf_config=hf_config)


__all__ = [
    "ModelRef",
    "ResolvedModel",
    "check_tokenizer",
    "load_tokenizer_of",
    "materialize",
    "parse_model_args",
    "tokenizer_dir",
]
