r"""HF-transformers rollout engine: the CPU default and the numerical reference for tests.

Why a sampling loop of our own on top of ``model(..., past_key_values=cache)`` instead of
``model.generate``:

* exact log-probs: ``generate`` reports scores *after* its logits processors (top-k/top-p set
  the dropped entries to -inf), while the contract is ``log softmax(logits / T)`` over the full
  vocabulary (types.py); computing it from the same fp32 logits we sample from removes any doubt;
* shared prompts: each prompt is prefilled **once** and its KV cache is repeated for the ``n``
  samples (``DynamicCache.batch_repeat_interleave``), the HF-side analogue of SGLang's prefix
  sharing for the G samples of an RPT context;
* per-row stopping (EOS, ``stop_token_ids``, ``stop_at_final_box``) with finished rows pruned
  from the batch and the cache (``batch_select_indices``);
* determinism: one explicit ``torch.Generator`` per call, seeded from ``SamplingParams.seed``.

Shapes: B = rows in the decode batch (prompts x samples), T = padded prompt length,
V = vocabulary size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.dtypes import torch_dtype
from megatron_rpt.errors import InputError
from megatron_rpt.memory import StorageOffload
from megatron_rpt.rollout.rank_shards import ShardPiece, assemble_shards
from megatron_rpt.rollout.stopping import FinalBoxStop, closing_brace_ids
from megatron_rpt.rollout.types import (
    Completion,
    PrefixCacheStats,
    SamplingParams,
    tensor_fingerprint,
    validate_prompts,
)

logger = logging.getLogger(__name__)



@dataclass
class WeightUpdateReport:
    """What one ``update_weights`` call did."""

    version: int
    """The version recorded after the update."""
    updated: list[str] = field(default_factory=list)
    """HF names copied into the model, in stream order."""
    not_updated: list[str] = field(default_factory=list)
    """Model parameters the stream did not mention (tied aliases count as updated)."""


class HFEngine:
    """A ``RolloutEngine`` over a local ``transformers`` causal LM (CPU or GPU)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,  # noqa: ANN001 - any HF tokenizer
        *,
        max_batch_rows: int = 64,
        spill_dir: str | Path | None = None,
    ) -> None:
        """``spill_dir``: on CPU, ``release_memory`` writes the weights to a file there and
        frees them (the colocated hand-off, so the trainer gets the memory back); without it
        a CPU release keeps them in memory."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.device = next(model.parameters()).device
        self._version = 0
        self._consistent = True
        self._released_to: torch.device | None = None
        self._spill = None if spill_dir is None else StorageOffload(spill_dir)
        self._closing_ids: set[int] | None = None
        self._eos_ids = self._collect_eos_ids()
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.last_update: WeightUpdateReport | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "auto",
        max_batch_rows: int = 64,
        load_weights: bool = True,
        spill_dir: str | Path | None = None,
    ) -> HFEngine:
        """Load an HF folder (or ``embedded:smollm2``) with safetensors, no remote code.

        ``load_weights=False`` builds the architecture from ``config.json`` with random
        weights (a folder without weight files; the first weight sync fills them).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        weights_dtype = torch_dtype(dtype, "rollout.dtype")  # ConfigError naming the field
        path = resolve_model_path(str(name_or_path))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(path)
        if load_weights:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=weights_dtype, use_safetensors=True
            )
        else:
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(path), dtype=weights_dtype
            )
        return cls(model.to(device), tokenizer, max_batch_rows=max_batch_rows, spill_dir=spill_dir)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order (see types.py)."""
        self._check_usable()
        validate_prompts(prompts, self.model.config.vocab_size)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(params.seed))
        per_chunk = max(1, self.max_batch_rows // params.n)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = [list(map(int, p)) for p in prompts[start : start + per_chunk]]
            flat = self._generate_chunk(chunk, params, gen)
            out.extend(flat[i * params.n : (i + 1) * params.n] for i in range(len(chunk)))
        return out

    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, gen: torch.Generator | None
    ) -> list[Completion]:
        n = params.n
        ids_BT, mask_BT = self._left_pad(prompts)
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(
            input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        logits_BV = out.logits[:, -1].float().repeat_interleave(n, dim=0)
        cache.batch_repeat_interleave(n)
        mask_BT = mask_BT.repeat_interleave(n, dim=0)
        next_pos_B = pos_BT[:, -1].repeat_interleave(n) + 1

        rows = list(range(len(prompts) * n))  # live row -> flat output index
        toks: list[list[int]] = [[] for _ in rows]
        lps: list[list[float]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * len(rows)
        box = self._box_stop() if params.stop_at_final_box else None
        for _ in range(params.max_new_tokens):
            tok_B, lp_B = sample_tokens(logits_BV, params, gen)
            keep = self._record(rows, tok_B.tolist(), lp_B.tolist(), toks, lps, reasons, params, box)
            if not keep:
                break
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                tok_B, mask_BT, next_pos_B = tok_B[idx], mask_BT[idx], next_pos_B[idx]
                rows = [rows[i] for i in keep]
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(len(rows), 1)], dim=1)
            out = self.model(
                input_ids=tok_B[:, None], attention_mask=mask_BT, position_ids=next_pos_B[:, None],
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            logits_BV = out.logits[:, -1].float()
            next_pos_B = next_pos_B + 1
        return [self._completion(t, lp, r or "length", params) for t, lp, r in zip(toks, lps, reasons, strict=True)]

    def _record(self, rows, tok, lp, toks, lps, reasons, params, box) -> list[int]:  # noqa: ANN001
        """Append this step's token to every live row; return the positions still live."""
        keep = []
        stop_ids = self._eos_ids | set(params.stop_token_ids)
        for pos, (row, t, p) in enumerate(zip(rows, tok, lp, strict=True)):
            toks[row].append(t)
            lps[row].append(p)
            if t in stop_ids:
                reasons[row] = "stop"
            elif box is not None and box.done(toks[row]):
                reasons[row] = "box"
            elif len(toks[row]) >= params.max_new_tokens:
                reasons[row] = "length"
            else:
                keep.append(pos)
        return keep

    def _completion(self, tok: list[int], lp: list[float], reason: str, params: SamplingParams):  # noqa: ANN202
        text = self.tokenizer.decode(tok, skip_special_tokens=True)
        return Completion(
            token_ids=tok,
            text=text,
            logprobs=lp if params.return_logprobs else None,
            finish_reason=reason,  # type: ignore[arg-type]
            meta={"weight_version": self._version},
        )

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(p) for p in prompts)
        ids_BT = torch.full((len(prompts), T), self._pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(prompts), T), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids_BT[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_BT[b, T - len(p) :] = 1
        return ids_BT.to(self.device), mask_BT.to(self.device)

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else list(eos))
        return ids

    def _box_stop(self) -> FinalBoxStop:
        if self._closing_ids is None:
            vocab = len(self.tokenizer)
            pieces = self.tokenizer.batch_decode([[i] for i in range(vocab)])
            self._closing_ids = closing_brace_ids(pieces)
        return FinalBoxStop(
            self._closing_ids, lambda t: self.tokenizer.decode(t, skip_special_tokens=False)
        )

    # ------------------------------------------------------------------ weights

    def _param_table(self) -> dict[str, torch.nn.Parameter]:
        # remove_duplicate=False keeps tied aliases (lm_head.weight -> embed_tokens.weight).
        return dict(self.model.named_parameters(remove_duplicate=False))

    @torch.no_grad()
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        flush_cache: bool = True,
    ) -> WeightUpdateReport:
        """Copy each ``(hf_name, tensor)`` into the matching parameter in place.

        An unknown name or a shape mismatch raises InputError naming the tensor. The stream is
        consumed lazily, so tensors before the bad one are already loaded: the engine then
        reports ``health() == False`` until a later update completes. A released engine is
        resumed first (the colocated flow: release, train, push).
        """
        self.resume_memory()
        self._check_usable(allow_inconsistent=True)
        table = self._param_table()
        report = WeightUpdateReport(version=version)
        touched: set[int] = set()
        self._consistent = False
        for name, tensor in named_tensors:
            param = table.get(name)
            if param is None:
                raise InputError(f"update_weights: unknown tensor {name!r} (not a parameter of the HF model)")
            if tuple(tensor.shape) != tuple(param.shape):
                raise InputError(
                    f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            param.copy_(tensor.detach())
            report.updated.append(name)
            touched.add(id(param))
        report.not_updated = [n for n, p in table.items() if id(p) not in touched]
        self._version = version
        self._consistent = True
        self.last_update = report
        logger.info(
            "HF engine: weights v%d, %d tensors updated, %d parameters not in the stream",
            version, len(report.updated), len(report.not_updated),
        )  # fmt: skip
        return report

    def update_weights_from_ranks(
        self,
        buckets: Iterable[Sequence[Sequence[ShardPiece]]],
        *,
        version: int,
        flush_cache: bool = True,
    ) -> WeightUpdateReport:
        """Load per-engine-rank shards: ``buckets`` yields, per bucket, every engine TP rank's
        ``ShardPiece`` list (rank order). The process stands in for a TP engine: it puts each
        bucket's slices back together (``assemble_shards``) and loads them as ``update_weights``
        does, bucket by bucket, so it holds one assembled bucket at a time."""
        stream = (pair for per_rank in buckets for pair in assemble_shards(per_rank))
        return self.update_weights(stream, version=version, flush_cache=flush_cache)

    def weight_checksums(
        self, names: Sequence[str] | None = None, *, max_rows: int | None = 64
    ) -> dict[str, str]:
        """``tensor_fingerprint`` of parameters by HF name (all parameters when names is None)."""
        table = self._param_table()
        names = list(table) if names is None else list(names)
        unknown = [n for n in names if n not in table]
        if unknown:
            raise InputError(f"weight_checksums: unknown tensors {unknown[:5]}")
        return {n: tensor_fingerprint(table[n], max_rows) for n in names}

    # ------------------------------------------------------------------ lifecycle

    def release_memory(self) -> None:
        """On GPU: move the weights to host memory and empty the CUDA cache. On CPU: write
        them to a file in ``spill_dir`` and free them (bit-exact on resume), or with no
        ``spill_dir`` keep them (no-op)."""
        if self._released_to is not None:
            return
        self._released_to = self.device
        if self.device.type == "cpu":
            if self._spill is not None:
                self._spill.offload(self._resizable_parameters())
            return
        self.model.to("cpu")
        torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Move the weights back to the engine's device (or read them back from the file)."""
        if self._released_to is None:
            return
        if self._released_to.type != "cpu":
            self.model.to(self._released_to)
        elif self._spill is not None:
            self._spill.reload()
        self._released_to = None

    def _resizable_parameters(self) -> list[torch.Tensor]:
        # Weights loaded from safetensors may sit in memory-mapped, fixed-size storage: give
        # those their own memory once so they can be freed in place.
        for param in self.model.parameters():
            if not param.untyped_storage().resizable():
                param.data = param.data.clone()
        return [p.data for p in self.model.parameters()]

    def flush_cache(self) -> None:
        """No persistent prefix cache: every ``generate`` call builds its own KV cache."""

    def health(self) -> bool:
        """Usable: not shut down, not released, and the last weight update completed."""
        return self.model is not None and self._released_to is None and self._consistent

    def shutdown(self) -> None:
        """Drop the model (idempotent)."""
        self.model = None  # type: ignore[assignment]

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The HF engine has no cross-request prefix cache."""
        return None

    @property
    def weight_version(self) -> int:
        """Version of the last completed ``update_weights`` (0 = initial weights)."""
        return self._version

    def _check_usable(self, allow_inconsistent: bool = False) -> None:
        if self.model is None:
            raise RuntimeError("HF engine was shut down")
        if self._released_to is not None:
            raise RuntimeError("HF engine memory is released; call resume_memory() first")
        if not (allow_inconsistent or self._consistent):
            raise RuntimeError("HF engine weights are partially updated; finish an update first")


def sample_tokens(
    logits_BV: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return ``(tokens [B], logprobs [B])``.

    The log-prob is ``log_softmax(logits / T)`` of the sampled token over the full vocabulary
    (``T = 1`` when greedy), before top-k/top-p truncation, as SGLang returns it.
    """
    if params.greedy:
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        tok_B = logits_BV.argmax(dim=-1)
        return tok_B, logp_BV.gather(-1, tok_B[:, None])[:, 0]
    scaled_BV = logits_BV / params.temperature
    logp_BV = torch.log_softmax(scaled_BV, dim=-1)
    filtered_BV = truncate_logits(scaled_BV, params.top_k, params.top_p)
    # Inverse-CDF sampling: one uniform per row (torch.multinomial is ~30x slower on CPU for a
    # 49k vocabulary). With right=True a zero-probability token (flat CDF step) is never hit.
    cdf_BV = torch.softmax(filtered_BV, dim=-1, dtype=torch.float64).cumsum(dim=-1)
    u_B1 = torch.rand((cdf_BV.shape[0], 1), generator=gen, device=cdf_BV.device, dtype=torch.float64)
    tok_B = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True)[:, 0]
    tok_B = tok_B.clamp(max=cdf_BV.shape[-1] - 1)
    return tok_B, logp_BV.gather(-1, tok_B[:, None])[:, 0]


def truncate_logits(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf; the argmax always stays.

    >>> truncate_logits(torch.tensor([[3.0, 2.0, 1.0]]), 2, 1.0).tolist()
    [[3.0, 2.0, -inf]]
    """
    out = logits_BV
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(out, dim=-1, descending=True)
        cum_BV = torch.softmax(sorted_BV, dim=-1).cumsum(dim=-1)
        # drop a token when the mass *before* it already reaches top_p (keeps the top-1)
        drop_BV = (cum_BV - torch.softmax(sorted_BV, dim=-1)) >= top_p
        out = out.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return out
