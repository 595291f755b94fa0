"""Prepare RPT data: corpus -> tokens -> proxy entropies -> filtered samples, on disk.

Output directory (format version 1; written atomically, ``meta.json`` last):

====================  =====================================================================
``tokens.bin/.idx``   Megatron ``IndexedDataset`` (int32), one sequence per document: the
                      document's own token ids (policy tokenizer, no special tokens added).
``entropy.bin``       float16 [total tokens], aligned with the concatenated documents: the
                      proxy's top-k entropy of x_t given x<t (NaN at each document's t=0).
``vocab_bytes.bin``   exact bytes of every token id, concatenated; ``vocab_bytes.idx`` holds
                      V+1 int64 little-endian offsets.
``documents.jsonl``   one line per document: doc_index, doc_id, source, split, n_tokens,
                      n_kept (samples of this document in its split's sample file).
``samples-train.npy`` structured array (doc_index int32, position int32, entropy float32),
                      sorted by (doc_index, position): kept training positions.
``samples-valid.npy`` the same for **every** eligible position of validation documents (not
                      filtered by the training threshold; evaluation buckets them).
``meta.json``         format version, tokenizer (path, vocab size, byte-table digest), proxy
                      model, the full DataConfig and the summary.
====================  =====================================================================

Which positions are eligible and kept is defined in ``samples.py``.

Tokenisation and scoring run in a hidden work directory next to the output
(``.<name>.work``). An interrupted run resumes there (see ``entropy.score_corpus``) as long
as the inputs and the settings that change tokens or scores are the same; otherwise the work
is discarded. If the threshold keeps no position the run fails without output, and the
scores stay in the work directory, so a rerun with a lower threshold does not rescore.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.config_utils import to_dict
from megatron_rpt.data.config import DataConfig, validate_data_config
from megatron_rpt.data.entropy import EntropyScorer, ScoringStats, score_corpus
from megatron_rpt.data.readers import (
    ReadStats,
    corpus_entries,
    input_files,
    iter_documents,
    split_of,
)
from megatron_rpt.data.samples import (
    SAMPLE_DTYPE,
    Summary,
    build_samples,
    entropy_quantiles,
    new_summary,
)
from megatron_rpt.data.tokens import ByteVocabulary, load_tokenizer, write_vocab_bytes
from megatron_rpt.dir_lock import output_lock
from megatron_rpt.errors import DataError
from megatron_rpt.fileio import (
    atomic_output_dir,
    atomic_write_json,
    check_not_inside,
    check_output_dir,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "megatron_rpt.prepared_data"
FORMAT_VERSION = 1
DEFAULT_TOKENIZER = "embedded:smollm2"
_TOKENIZE_BATCH = 256
# Settings that change tokens or scores; the work directory is reused only if they match.
_WORK_KEYS = (
    "corpus",
    "corpus_format",
    "text_field",
    "id_field",
    "on_invalid_utf8",
    "max_documents",
    "validation_fraction",
    "split_seed",
    "entropy_top_k",
    "entropy_window_tokens",
    "entropy_window_overlap",
    "entropy_dtype",
)


# ----------------------------------------------------------------------------- tokenizers


def _resolve_tokenizer(policy_tokenizer: Any, cfg: DataConfig) -> tuple[Any, str]:
    spec = (
        policy_tokenizer if policy_tokenizer is not None else (cfg.tokenizer or DEFAULT_TOKENIZER)
    )
    if isinstance(spec, str | Path):
        return load_tokenizer(str(spec)), str(spec)
    return spec, str(getattr(spec, "name_or_path", "") or type(spec).__name__)


def _proxy_path(cfg: DataConfig, tokenizer_name: str) -> Path:
    name = cfg.entropy_model or tokenizer_name
    try:
        return resolve_model_path(name)
    except Exception as exc:
        raise DataError(
            f"data.entropy_model: cannot use {name!r} as the proxy model ({exc}); set it to a "
            "HF model directory that shares the policy's tokenizer"
        ) from None


def _check_proxy_tokenizer(proxy: Path, vocab: ByteVocabulary) -> None:
    """The proxy must use the policy's token ids: compare byte tables."""
    try:
        proxy_vocab = ByteVocabulary.from_tokenizer(load_tokenizer(str(proxy)))
    except DataError as exc:
        raise DataError(f"data.entropy_model {proxy}: cannot read its tokenizer ({exc})") from None
    if proxy_vocab.digest() != vocab.digest():
        raise DataError(
            f"data.entropy_model {proxy}: its tokenizer differs from the policy's "
            f"({len(proxy_vocab)} vs {len(vocab)} tokens, byte tables differ); the proxy must "
            "share the policy's tokenizer"
        )


# ----------------------------------------------------------------------------- stages


def _fingerprint(cfg: DataConfig, vocab: ByteVocabulary, proxy: Path) -> dict[str, Any]:
    files = []
    for name in input_files(cfg):
        st = os.stat(name)
        files.append([os.path.abspath(name), st.st_size, st.st_mtime_ns])
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_digest": vocab.digest(),
        "proxy": str(proxy.resolve()),
        "inputs": files,
        "settings": {k: getattr(cfg, k) for k in _WORK_KEYS},
    }


def _open_work_dir(work: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Reuse ``work`` if its fingerprint matches, else start it afresh; returns its state."""
    state_file = work / "work.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError:
            state = {}
        if state.get("fingerprint") == json.loads(json.dumps(fingerprint)):
            return state
        logger.warning(
            "%s: inputs or settings changed since the interrupted run; starting over", work
        )
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    state = {"fingerprint": fingerprint}
    atomic_write_json(state_file, state)
    return state


def _tokenize_corpus(cfg: DataConfig, tokenizer: Any, vocab: ByteVocabulary, work: Path) -> dict:
    """Stage 1: read, tokenise, round-trip check; writes tokens.bin/.idx; returns the state."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stats, records, batch = ReadStats(), [], []
    builder = IndexedDatasetBuilder(str(work / "tokens.bin"), dtype=np.int32)
    limit = cfg.max_documents

    def flush() -> None:
        texts = [d.text for d in batch if d.text is not None]
        encoded = iter(
            tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if texts
            else []
        )
        for doc in batch:
            ids = (
                doc.token_ids if doc.token_ids is not None else np.asarray(next(encoded), np.int64)
            )
            if limit is not None and len(records) >= limit:
                continue
            if len(ids) == 0:
                stats.skip("empty", doc.source)
            elif doc.text is not None and not vocab.roundtrip_ok(ids, doc.text):
                stats.skip("token bytes differ from the text", doc.source)
            else:
                builder.add_document(ids, [len(ids)])
                split = split_of(doc.doc_id, cfg.validation_fraction, cfg.split_seed)
                records.append(
                    {
                        "doc_index": len(records),
                        "doc_id": doc.doc_id,
                        "source": doc.source,
                        "split": split,
                        "n_tokens": len(ids),
                    }
                )
        batch.clear()

    n_read = 0
    for doc in iter_documents(cfg, stats, vocab_size=len(vocab)):
        n_read += 1
        batch.append(doc)
        if len(batch) >= _TOKENIZE_BATCH:
            flush()
            if limit is not None and len(records) >= limit:
                break
    flush()
    builder.finalize(str(work / "tokens.idx"))
    if not records:
        _raise_no_documents(cfg, n_read, stats, tokenizer)
    with open(work / "documents.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return {
        "documents": len(records),
        "read": n_read,
        "skipped": stats.skipped,
        "skipped_examples": stats.examples,
        "utf8_replaced": stats.replaced_utf8,
    }


def _raise_no_documents(cfg: DataConfig, n_read: int, stats: ReadStats, tokenizer: Any) -> None:
    if n_read == 0 and not stats.skipped:
        raise DataError(f"data.corpus {cfg.corpus}: the corpus has no documents")
    if n_read and stats.skipped.get("token bytes differ from the text") == n_read:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: its token bytes reproduce "
            f"none of the {n_read} documents (does its normalizer change the text?)"
        )
    why = ", ".join(f"{k}: {v}" for k, v in stats.skipped.items())
    n_total = n_read + sum(v for k, v in stats.skipped.items() if k == "invalid UTF-8")
    raise DataError(
        f"data.corpus {cfg.corpus}: no usable documents ({n_total} read; skipped {why})"
    )


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- entry point


def prepare_data(
    cfg: DataConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    policy_tokenizer: Any = None,
    progress: bool | None = None,
) -> Summary:
    """Run the whole pipeline into ``out_dir`` and return the summary.

    Args:
        cfg: the data section of the run config.
        out_dir: output directory (see the module docstring); must not exist unless
            ``overwrite``.
        policy_tokenizer: the policy's tokenizer (object, HF directory or ``embedded:`` name);
            default ``cfg.tokenizer``, else the embedded SmolLM2.
        progress: show a tqdm bar while scoring (None: only on a terminal).

    Raises:
        DataError / ConfigError: bad input, with a one-line message; nothing is written to
        ``out_dir`` then. InputError at once when another process is preparing ``out_dir``
        (an exclusive lock on the hidden sibling ``.<name>.lock``).
    """
    with output_lock(out_dir):
        return _prepare_locked(
            cfg, out_dir, overwrite=overwrite, policy_tokenizer=policy_tokenizer, progress=progress
        )


def _prepare_locked(
    cfg: DataConfig,
    out_dir: str | Path,
    *,
    overwrite: bool,
    policy_tokenizer: Any,
    progress: bool | None,
) -> Summary:
    t0 = time.perf_counter()
    validate_data_config(cfg)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite)
    for entry in corpus_entries(cfg):
        if not entry.startswith("embedded:"):
            check_not_inside(out_dir, entry, "data.corpus")
    tokenizer, tokenizer_name = _resolve_tokenizer(policy_tokenizer, cfg)
    vocab = ByteVocabulary.from_tokenizer(tokenizer)
    proxy = _proxy_path(cfg, tokenizer_name)
    work = out_dir.parent / f".{out_dir.name}.work"
    state = _open_work_dir(work, _fingerprint(cfg, vocab, proxy))
    if "tokens" not in state:
        try:
            state["tokens"] = _tokenize_corpus(cfg, tokenizer, vocab, work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming before scoring
            raise
        atomic_write_json(work / "work.json", state)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(work / "tokens"), mmap=True)
    offsets = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    scoring = _score(cfg, proxy, vocab, dataset, offsets, work, progress)
    records = [json.loads(line) for line in open(work / "documents.jsonl", encoding="utf-8")]
    ent_all = np.memmap(work / "entropy.bin", dtype=np.float16, mode="r")
    summary = new_summary(cfg, state["tokens"], records, scoring)
    samples = build_samples(cfg, records, dataset, offsets, ent_all, vocab, summary)
    summary.entropy_quantiles = entropy_quantiles(ent_all)
    if summary.kept_train == 0:
        q = summary.entropy_quantiles
        raise DataError(
            f"data.entropy_threshold={cfg.entropy_threshold:g} keeps 0 of "
            f"{summary.eligible_train_positions} eligible training positions (entropy median "
            f"{q.get('p50', float('nan')):.2f}, p90 {q.get('p90', float('nan')):.2f}); lower it "
            f"(scores are kept in {work} and reused)"
        )
    summary.seconds = round(time.perf_counter() - t0, 2)
    meta = _meta(cfg, tokenizer_name, vocab, proxy, summary)
    _write_output(out_dir, work, overwrite, vocab, records, samples, meta)
    del dataset, ent_all
    shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "prepared %s: %d training samples, %d validation positions",
        out_dir,
        summary.kept_train,
        summary.valid_positions,
    )
    return summary


def _score(
    cfg: DataConfig,
    proxy: Path,
    vocab: ByteVocabulary,
    dataset: Any,
    offsets: np.ndarray,
    work: Path,
    progress: bool | None,
) -> ScoringStats:
    """Stage 2: proxy entropies into work/entropy.bin (resumable)."""
    if cfg.entropy_model is not None:
        _check_proxy_tokenizer(proxy, vocab)
    scorer = EntropyScorer.from_pretrained(
        proxy,
        vocab_size=len(vocab),
        dtype=cfg.entropy_dtype,
        device=cfg.entropy_device,
        top_k=cfg.entropy_top_k,
        window_tokens=cfg.entropy_window_tokens,
        window_overlap=cfg.entropy_window_overlap,
        batch_tokens=cfg.entropy_batch_tokens,
    )
    return score_corpus(
        scorer,
        lambda d: np.asarray(dataset[d]),
        offsets,
        work / "entropy.bin",
        work / "entropy_done.npy",
        progress=progress,
    )


def _write_output(
    out_dir: Path,
    work: Path,
    overwrite: bool,
    vocab: ByteVocabulary,
    records: list[dict],
    samples: dict[str, np.ndarray],
    meta: dict,
) -> None:
    """Stage 3: assemble the output directory atomically, meta.json last."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for name in ("tokens.bin", "tokens.idx", "entropy.bin"):
            _link_or_copy(work / name, tmp / name)
        write_vocab_bytes(vocab.table, tmp)
        with open(tmp / "documents.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        for split, arr in samples.items():
            assert arr.dtype == SAMPLE_DTYPE
            np.save(tmp / f"samples-{split}.npy", arr)
        _write_json(tmp / "meta.json", meta)  # last: its presence marks a complete directory


def _meta(
    cfg: DataConfig, tokenizer_name: str, vocab: ByteVocabulary, proxy: Path, summary: Summary
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "name_or_path": tokenizer_name,
            "vocab_size": len(vocab),
            "kind": vocab.kind,
            "byte_table_blake2b": vocab.digest(),
            "special_token_ids": sorted(vocab.special_ids),
            "dummy_prefix": vocab.dummy_prefix.decode(),
        },
        "proxy_model": {"path": str(proxy), "dtype": cfg.entropy_dtype, "top_k": cfg.entropy_top_k},
        "data_config": to_dict(cfg),
        "summary": summary.to_dict(),
    }


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SAMPLE_DTYPE",
    "Summary",
    "load_tokenizer",
    "prepare_data",
]
