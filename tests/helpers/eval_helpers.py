"""Shared helpers of the evaluation tests: a tiny prepared split."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path


def fit_tiny(model_dir: Path, texts: Sequence[str], *, steps: int = 60, seed: int = 0) -> Path:
    """Train the tiny model briefly on ``texts`` (in place) so its argmax is often right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = [torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:256]]) for t in texts]
    model.train()
    for step in range(steps):
        ids = rows[step % len(rows)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def prepare_tiny(
    root: Path,
    *,
    documents: int = 6,
    validation_fraction: float = 0.5,
    split_seed: int = 8,
    model_dir: Path | None = None,
) -> tuple[Path, Path]:
    """(tiny model dir with the real SmolLM2 tokenizer, prepared data dir) under ``root``.

    The model is trained for a few steps on the documents (``fit_tiny``) and scores them as the
    entropy proxy; split_seed 8 holds out 3 of the first 6 CHAMP documents.
    """
    from megatron_rpt.assets import champ_documents, smollm2_dir
    from megatron_rpt.data.config import DataConfig
    from megatron_rpt.data.pipeline import prepare_data
    from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

    texts = [d.text for d in champ_documents()[:documents]]
    if model_dir is None:
        model_dir = fit_tiny(save_tiny_causal_lm(root / "tiny", smollm2_dir()), texts)
    model = model_dir
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(
        corpus=str(corpus),
        tokenizer=str(model),
        entropy_device="cpu",
        entropy_threshold=0.0,
        validation_fraction=validation_fraction,
        split_seed=split_seed,
        entropy_window_tokens=512,
        entropy_window_overlap=64,
        entropy_batch_tokens=2048,
        min_context_tokens=4,
    )
    out = root / f"prepared-{validation_fraction}"
    prepare_data(cfg, out, progress=False)
    return model, out


@functools.cache
def shared_tiny() -> tuple[Path, Path]:
    """``prepare_tiny`` once per test process (several test files read the same split)."""
    root = Path(tempfile.mkdtemp(prefix="rpt-eval-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return prepare_tiny(root)
