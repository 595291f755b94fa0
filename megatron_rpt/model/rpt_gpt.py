"""``RPTGPTModel``: Megatron's ``GPTModel`` that can stop before the output layer.

The RPT loss needs log-probs of the *response* tokens only, and computes them with the fused,
chunked, vocab-parallel ``loss.logprobs_from_hidden`` (which applies the output layer itself,
a chunk of tokens at a time, and recomputes the logits in backward). Running Megatron's output
layer over every packed position first would build the ``[T, V/tp]`` logits that this avoids
(context tokens, the bulk of an RPT sequence, carry no loss).

With ``output_hidden_states = True`` (what ``build_model(..., output="hidden")`` sets) the last
pipeline stage returns the decoder's final hidden states ``[S, B, H]`` (``[T, 1, H]`` for packed
sequences), already through the final RMSNorm: in Megatron-Core the final norm belongs to the
``TransformerBlock``, not to ``_postprocess``. Everything else (embedding, decoder, pipeline
stages, checkpoint keys, the output layer's parameters and its tying to the embedding) is the
stock ``GPTModel``: ``output_weight()`` hands the loss the weight Megatron itself would use.
Switch ``output_hidden_states`` off to get ordinary logits (e.g. ``model/logits.py``).

Shared-prefix layout (model/shared_prefix.py): with ``SharedPrefixParams`` the rotary
embedding follows the explicit ``position_ids`` (each response of a group continues from the
context length although it does not follow the context in the packed row): ``_preprocess``
swaps Megatron's rotary table ``[M, 1, 1, d]`` (``M = max_seqlen_kv``, the longest piece's
keys, i.e. one past the largest position) for its rows at ``position_ids``, ``[T, 1, 1, d]``,
which Megatron's attention applies row by row in the params' sbhd format.

Sequence parallelism: the returned hidden states are this TP rank's 1/TP of the rows
(``[S/tp, B, H]``); the loss gathers them (trainer/forward.py), as Megatron's output layer
gathers its input. Not supported with hidden output: multi-token prediction (its heads live in
``_postprocess``; refused here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from megatron.core.models.gpt import GPTModel

from megatron_rpt.errors import ConfigError
from megatron_rpt.model.shared_prefix import SharedPrefixParams, rotary_rows_at

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


class RPTGPTModel(GPTModel):
    """``GPTModel`` whose last stage can return final hidden states instead of logits."""

    def __init__(
        self,
        config: TransformerConfig,
        *args: Any,
        output_hidden_states: bool = True,
        **kwargs: Any,
    ) -> None:
        if output_hidden_states:
            _check_hidden_output_supported(config)
        super().__init__(config, *args, **kwargs)
        self.output_hidden_states = output_hidden_states

    def _preprocess(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._preprocess(*args, **kwargs)
        params = kwargs.get("packed_seq_params")
        if isinstance(params, SharedPrefixParams):
            out = self._rotary_per_token(out, kwargs.get("position_ids"), params)
        return out

    def _rotary_per_token(
        self, preproc: tuple, position_ids: torch.Tensor | None, params: SharedPrefixParams
    ) -> tuple:
        """Replace the rotary table (preproc[1]) by its rows at ``position_ids``."""
        if self.position_embedding_type in ("learned_absolute", "none"):
            params.rotary_per_token = True  # positions enter through the embedding only
            return preproc
        table = preproc[1]
        if (
            self.position_embedding_type != "rope"
            or self.config.multi_latent_attention
            or table is None
            or position_ids is None
        ):
            raise ConfigError(
                "train.micro_batch_layout=shared_prefix supports RoPE (or learned/no position "
                f"embeddings) without multi-latent attention, not {self.position_embedding_type!r}"
            )
        params.rotary_per_token = True
        return (preproc[0], rotary_rows_at(table, position_ids), *preproc[2:])

    def _postprocess(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.output_hidden_states and self.post_process:
            return hidden_states  # [S, B, H], final-normed by the TransformerBlock
        return super()._postprocess(hidden_states, *args, **kwargs)

    def output_weight(self) -> torch.Tensor:
        """This TP rank's output-layer rows ``[V/tp, H]`` (the embedding when tied)."""
        assert self.post_process, "output_weight() exists on the last pipeline stage only"
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def _check_hidden_output_supported(config: TransformerConfig) -> None:
    if config.mtp_num_layers is not None:
        raise ConfigError(
            "model.transformer_overrides: mtp_num_layers is not supported by the RPT trainer "
            "(RPTGPTModel's hidden-state output)"
        )


__all__ = ["RPTGPTModel"]
