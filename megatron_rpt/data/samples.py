"""Which positions become samples, the sample arrays, and the run summary.

A position t of a document is *eligible* when t >= ``min_context_tokens``, it has a score,
and x_t can be a target: not a special token and not starting with a UTF-8 continuation byte
(the context would end inside a character, and no text prediction can match such a token).
Training keeps eligible positions with entropy >= ``entropy_threshold`` whose target can be
read from a ``\\boxed{}`` (``data.drop_unboxable_targets``: a target whose first token closes
more braces than it opens, such as ``}``, can never be rewarded by a brace-counting parser, so
it would cost rollouts and never give signal; these are counted in the summary), then at most
``max_positions_per_document`` per document (a subsample seeded by the split seed and the
document id, so reruns agree). With ``train_positions = "random_per_document"`` (RLP's
protocol) it keeps instead one eligible position per document, drawn uniformly with the same
seeding, whatever its entropy. Validation keeps every eligible position: evaluation buckets
them by entropy later.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.tokens import ByteVocabulary
from megatron_rpt.data.types import BUCKETS
from megatron_rpt.reward.next_token import boxable

if TYPE_CHECKING:
    from megatron_rpt.data.entropy import ScoringStats

SAMPLE_DTYPE = np.dtype([("doc_index", "<i4"), ("position", "<i4"), ("entropy", "<f4")])
"""One sample: its document, the target position t in it, and H_t (float16-rounded)."""


@dataclass
class Summary:
    """What a prepare run produced (also stored in meta.json)."""

    documents: int = 0
    documents_train: int = 0
    documents_valid: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    documents_utf8_replaced: int = 0
    tokens: int = 0
    tokens_train: int = 0
    tokens_valid: int = 0
    scored_positions: int = 0
    eligible_train_positions: int = 0
    unboxable_train_targets: int = 0
    """High-entropy training positions dropped because no box can hold their target."""
    kept_train: int = 0
    kept_per_document: dict[str, float] = field(default_factory=dict)
    train_buckets: dict[str, int] = field(default_factory=dict)
    valid_positions: int = 0
    valid_buckets: dict[str, int] = field(default_factory=dict)
    entropy_quantiles: dict[str, float] = field(default_factory=dict)
    entropy_threshold: float = 0.0
    seconds: float = 0.0
    scoring_seconds: float = 0.0
    tokens_scored: int = 0
    tokens_per_second: float = 0.0
    documents_resumed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def format_table(self, thresholds: tuple[float, ...] = (0.5, 1.0, 1.5)) -> str:
        """Human-readable summary (printed by tools/prepare_rpt_data.py)."""
        skipped = sum(self.documents_skipped.values())
        why = ", ".join(f"{k}: {v}" for k, v in self.documents_skipped.items())
        pct = 100.0 * self.kept_train / max(self.eligible_train_positions, 1)
        kpd = self.kept_per_document
        rows = [
            (
                "documents",
                f"{self.documents:,} (train {self.documents_train:,}, valid "
                f"{self.documents_valid:,}; skipped {skipped:,}{' - ' + why if why else ''})",
            ),
            (
                "tokens",
                f"{self.tokens:,} (train {self.tokens_train:,}, valid {self.tokens_valid:,})",
            ),
            ("scored positions", f"{self.scored_positions:,}"),
            (
                f"kept train (H >= {self.entropy_threshold:g})",
                f"{self.kept_train:,} ({pct:.1f}% of eligible; per document min/median/max "
                f"{kpd.get('min', 0):g}/{kpd.get('median', 0):g}/{kpd.get('max', 0):g})",
            ),
            ("dropped: target not boxable", f"{self.unboxable_train_targets:,}"),
        ]
        for name, t in zip(BUCKETS, thresholds, strict=False):
            rows.append(
                (
                    f"  {name} (H > {t:g})",
                    f"train {self.train_buckets.get(name, 0):,}, "
                    f"valid {self.valid_buckets.get(name, 0):,}",
                )
            )
        rows += [
            ("valid positions (all)", f"{self.valid_positions:,}"),
            (
                "entropy quantiles",
                "  ".join(f"{k} {v:.2f}" for k, v in self.entropy_quantiles.items()),
            ),
            (
                "time",
                f"{self.seconds:.1f} s (scoring {self.scoring_seconds:.1f} s"
                f"{f', resumed after {self.documents_resumed} documents' if self.documents_resumed else ''})",
            ),
            ("scoring throughput", f"{self.tokens_per_second:,.0f} tokens/s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def select_positions(
    cfg: DataConfig,
    rec: dict,
    ids: np.ndarray,
    ent: np.ndarray,
    ok_target: np.ndarray,
    ok_box: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(eligible positions, kept positions) of one document (see the module docstring).

    Args:
        rec: the document's record (``split``, ``doc_id``).
        ids: int64 [n] its tokens; ent: float32 [n] its entropies (NaN where unscored).
        ok_target: bool [V], tokens that may be a target (``ByteVocabulary.target_mask``).
        ok_box: bool [V], tokens a box can hold (``boxable_mask``); None keeps them all.
    """
    pos = np.arange(len(ids))
    eligible = (pos >= cfg.min_context_tokens) & np.isfinite(ent) & ok_target[ids]
    if rec["split"] == "valid":
        return pos[eligible], pos[eligible]
    if cfg.train_positions == "random_per_document":
        kept, cap, salt = pos[eligible], 1, "one"
    else:
        high = eligible & (ent >= cfg.entropy_threshold)
        kept = pos[high if ok_box is None else high & ok_box[ids]]
        cap, salt = cfg.max_positions_per_document, "cap"
    if cap is not None and len(kept) > cap:
        key = f"{cfg.split_seed}\0{salt}\0{rec['doc_id']}".encode()
        rng = np.random.default_rng(
            int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        )
        kept = np.sort(rng.choice(kept, size=cap, replace=False))
    return pos[eligible], kept


def build_samples(
    cfg: DataConfig,
    records: list[dict],
    dataset: Any,
    offsets: np.ndarray,
    ent_all: np.ndarray,
    vocab: ByteVocabulary,
    summary: Summary,
) -> dict[str, np.ndarray]:
    """Sample arrays per split; fills the summary's counts and each record's ``n_kept``."""
    ok_target = vocab.target_mask()
    ok_box = boxable_mask(vocab.table) if cfg.drop_unboxable_targets else None
    parts: dict[str, list[np.ndarray]] = {"train": [], "valid": []}
    per_doc = []
    for rec in records:
        d = rec["doc_index"]
        ids = np.asarray(dataset[d], dtype=np.int64)
        ent = np.asarray(ent_all[offsets[d] : offsets[d + 1]], dtype=np.float32)
        eligible, kept = select_positions(cfg, rec, ids, ent, ok_target, ok_box)
        rec["n_kept"] = int(len(kept))
        arr = np.empty(len(kept), dtype=SAMPLE_DTYPE)
        arr["doc_index"], arr["position"], arr["entropy"] = d, kept, ent[kept]
        parts[rec["split"]].append(arr)
        summary.scored_positions += int(np.isfinite(ent).sum())
        if rec["split"] == "train":
            summary.eligible_train_positions += len(eligible)
            if ok_box is not None:
                high = ent[eligible] >= cfg.entropy_threshold
                summary.unboxable_train_targets += int((high & ~ok_box[ids[eligible]]).sum())
            per_doc.append(len(kept))
    samples = {k: np.concatenate(v) if v else np.empty(0, SAMPLE_DTYPE) for k, v in parts.items()}
    summary.kept_train, summary.valid_positions = len(samples["train"]), len(samples["valid"])
    for split, target in (("train", summary.train_buckets), ("valid", summary.valid_buckets)):
        for name, t in zip(BUCKETS, cfg.difficulty_thresholds, strict=True):
            target[name] = int((samples[split]["entropy"] > t).sum())
    if per_doc:
        summary.kept_per_document = {
            "min": int(np.min(per_doc)),
            "median": float(np.median(per_doc)),
            "max": int(np.max(per_doc)),
            "mean": round(float(np.mean(per_doc)), 2),
        }
    return samples


def boxable_mask(table: list[bytes]) -> np.ndarray:
    """bool [V]: tokens a ``\\boxed{}`` prediction can start with (``reward.next_token.boxable``).

    >>> boxable_mask([b" a", b"}", b" }", b"{"]).tolist()
    [True, False, False, True]
    """
    return np.fromiter((boxable(b) for b in table), dtype=bool, count=len(table))


def entropy_quantiles(ent_all: np.ndarray) -> dict[str, float]:
    values = np.asarray(ent_all, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    out = {
        f"p{int(q * 100)}": round(float(v), 4)
        for q, v in zip(qs, np.quantile(values, qs), strict=True)
    }
    out["mean"] = round(float(values.mean()), 4)
    return out


def new_summary(
    cfg: DataConfig, tok_state: dict, records: list[dict], scoring: ScoringStats
) -> Summary:
    """Summary with the document, token and timing fields filled (samples come later)."""
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    rate = scoring.tokens_scored / scoring.seconds if scoring.seconds > 0 else 0.0
    return Summary(
        documents=len(records),
        documents_train=len(train),
        documents_valid=len(valid),
        documents_skipped=dict(tok_state["skipped"]),
        skipped_examples=list(tok_state["skipped_examples"]),
        documents_utf8_replaced=tok_state["utf8_replaced"],
        tokens=sum(r["n_tokens"] for r in records),
        tokens_train=sum(r["n_tokens"] for r in train),
        tokens_valid=sum(r["n_tokens"] for r in valid),
        entropy_threshold=cfg.entropy_threshold,
        scoring_seconds=round(scoring.seconds, 2),
        tokens_scored=scoring.tokens_scored,
        tokens_per_second=round(rate, 1),
        documents_resumed=scoring.documents_resumed,
    )


__all__ = [
    "SAMPLE_DTYPE",
    "Summary",
    "build_samples",
    "entropy_quantiles",
    "new_summary",
    "select_positions",
]
