r"""Training and rollout FLOPs of an RPT run, counted separately (for scaling curves).

The RPT paper plots next-token accuracy against training compute (Fig. 5, about 1e20-1e21
FLOPs) without giving its formula. Ours, for a dense decoder (``model/arch.ArchSpec``: L layers,
hidden H, n_q query / n_kv key-value heads of size d, MLP width I, vocabulary V):

Parameters that do matrix multiplies::

    N_layer = H*d*(2*n_q + 2*n_kv)     q, k, v, o projections
            + 3*H*I                    gated MLP (gate, up, down)
    N_body  = L * N_layer
    N_head  = H * V                    output layer (a matmul whether or not it is tied)

Forward pass over one sequence of S tokens, with the output layer applied at m positions::

    F(S, m) = 2*N_body*S + 2*N_head*m + A(S)
    A(S)    = 2*L*n_q*d*S*(S+1)        causal attention: query i attends to i keys;
                                       QK^T and PV cost 2*d FLOPs each per (query, key, head)

A multiply-add is 2 FLOPs. Not counted: norms, softmax, activations, RoPE, residual adds and the
embedding lookup (each O(S*H), under 1 % for models of interest). ``A`` counts the causal half
that FlashAttention-style kernels compute; the Kaplan/Chinchilla convention counts the full
S^2 (twice ours). For S << 6*H the total is close to the familiar 2*N per token forward.

**Training** (``training_flops``) for a sequence of P prompt + R response tokens::

    T = (3 + r + e) * F(P+R, m)      with m = R (default: the loss, and so the output layer,
                                     only covers response tokens), or m = P+R

The forward runs over the whole prompt + response (response tokens attend to the prompt), the
backward costs 2 forwards (gradients w.r.t. activations and weights), ``r`` = 1 with full
activation recomputation, ``e`` = extra forward-only passes per step (recomputed old-policy
log-probs, a reference model for a KL term; 0 in the paper's exactly on-policy, KL-free setup).
This is the 6*N*tokens rule (6 = 3 passes x 2 FLOPs per multiply-add) plus the attention and
output-layer terms.

**Rollout** (``rollout_flops``) for one prompt of P tokens with n responses of R_1..R_n tokens::

    prefill = 2*N_body*P + 2*N_head + A(P)      once per group (the n samples share the prompt's
                                                KV cache: SGLang's n>1 sampling, HF engine);
                                                n times with prefix_shared=False
    decode(R) = sum_{j=1}^{R-1} [ 2*(N_body + N_head) + 4*L*n_q*d*(P + j) ]

The prefill's last logits give the first response token; each of the other R-1 tokens is one
decode step that feeds the previous token and attends to the P + j cached keys. Cross-context
prefix-cache hits (contexts of one document sharing a prefix) are not subtracted: the count is
what an engine without cross-request reuse computes.

**Scoring** (``scoring_flops``): forward-only passes the trainer runs besides training, with
the output layer at the last position only (RLP's two reward passes: the policy scoring the
observed token after each thought, the EMA teacher scoring it without one)::

    score(S) = F(S, 1)

``FlopsCounter`` accumulates them per step for the trainer and writes the ``metrics.jsonl``
fields ``flops/train_step``, ``flops/rollout_step``, ``flops/train_cumulative``,
``flops/rollout_cumulative`` and ``flops/total_cumulative`` (what ``scaling.py`` reads; it
includes the scoring passes, which also get ``flops/score_step`` / ``flops/score_cumulative``).

>>> from megatron_rpt.model.arch import arch_from_dict
>>> arch = arch_from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
...     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
...     "intermediate_size": 16, "vocab_size": 10})
>>> m = ModelFlops.from_arch(arch)
>>> m.n_body, m.n_head             # 8*4*(4+2) + 3*8*16 ; 8*10
(576, 80)
>>> m.forward(3, 3)               # 2*576*3 + 2*80*3 + 2*1*2*4*3*4
4128
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_rpt.model.arch import ArchSpec


@dataclass(frozen=True)
class ModelFlops:
    """The per-model constants of the formulas in the module docstring."""

    n_body: int
    """Matmul parameters of the transformer layers (N_body)."""
    n_head: int
    """Matmul parameters of the output layer (N_head = H * V)."""
    attn_width: int
    """L * n_q * d: attention FLOPs per (query, key) pair are 4 * attn_width."""

    @classmethod
    def from_arch(cls, arch: ArchSpec) -> ModelFlops:
        """Constants of an HF architecture."""
        h, d = arch.hidden_size, arch.head_dim
        per_layer = h * d * (2 * arch.num_attention_heads + 2 * arch.num_kv_heads)
        per_layer += 3 * h * arch.intermediate_size
        return cls(
            n_body=arch.num_layers * per_layer,
            n_head=h * arch.vocab_size,
            attn_width=arch.num_layers * arch.num_attention_heads * d,
        )

    def attention(self, s: int) -> int:
        """A(S): causal attention FLOPs of a forward over S tokens."""
        return 2 * self.attn_width * s * (s + 1)

    def forward(self, s: int, m: int) -> int:
        """F(S, m): forward over S tokens, output layer at m positions."""
        return 2 * self.n_body * s + 2 * self.n_head * m + self.attention(s)

    def training(
        self,
        prompt_len: int,
        response_len: int,
        *,
        head_on_all_tokens: bool = False,
        recompute: bool = False,
        extra_forward_passes: int = 0,
    ) -> int:
        """T: forward + backward (+ recompute + extra forwards) of one trained sequence."""
        s = prompt_len + response_len
        m = s if head_on_all_tokens else response_len
        return (3 + int(recompute) + extra_forward_passes) * self.forward(s, m)

    def prefill(self, prompt_len: int) -> int:
        """Prompt prefill with logits at the last position only."""
        return 2 * self.n_body * prompt_len + 2 * self.n_head + self.attention(prompt_len)

    def decode(self, prompt_len: int, response_len: int) -> int:
        """The R-1 decode steps of one response of R tokens after a P-token prompt."""
        steps = max(response_len - 1, 0)
        keys = steps * prompt_len + steps * (steps + 1) // 2  # sum_{j=1}^{R-1} (P + j)
        return 2 * (self.n_body + self.n_head) * steps + 4 * self.attn_width * keys

    def rollout(
        self, prompt_len: int, response_lens: Sequence[int], *, prefix_shared: bool = True
    ) -> int:
        """Prefill(s) + decode of one group (a prompt and its n responses)."""
        prefills = 1 if prefix_shared else len(response_lens)
        return prefills * self.prefill(prompt_len) + sum(
            self.decode(prompt_len, r) for r in response_lens
        )


def training_flops(
    arch: ArchSpec,
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    **kwargs: bool | int,
) -> int:
    """Total training FLOPs of the trained sequences (``prompt_lens[i]`` + ``response_lens[i]``)."""
    m = ModelFlops.from_arch(arch)
    return sum(m.training(p, r, **kwargs) for p, r in zip(prompt_lens, response_lens, strict=True))  # type: ignore[arg-type]


def rollout_flops(
    arch: ArchSpec,
    prompt_lens: Sequence[int],
    response_lens: Sequence[Sequence[int]],
    *,
    prefix_shared: bool = True,
) -> int:
    """Total rollout FLOPs of groups (``prompt_lens[g]`` with responses ``response_lens[g]``)."""
    m = ModelFlops.from_arch(arch)
    return sum(
        m.rollout(p, rs, prefix_shared=prefix_shared)
        for p, rs in zip(prompt_lens, response_lens, strict=True)
    )


@dataclass
class FlopsCounter:
    """Per-step and cumulative training / rollout FLOPs for the trainer's metrics.

    Per step the trainer calls ``add_rollout`` for every group it generated (including groups
    dynamic sampling later drops), ``add_training`` for the sequences it trained on, then
    ``end_step()``, whose dict goes into ``metrics.jsonl``. ``state_dict`` / ``load_state_dict``
    carry the cumulative counts across a checkpoint resume.
    """

    model: ModelFlops
    head_on_all_tokens: bool = False
    """Output layer on every position in training (False: response positions only)."""
    recompute: bool = False
    """Full activation recomputation (one more forward in training)."""
    extra_forward_passes: int = 0
    """Forward-only passes per trained sequence (old log-probs, reference model)."""
    prefix_shared: bool = True
    """The n samples of a prompt share one prefill."""
    train_cumulative: int = 0
    rollout_cumulative: int = 0
    score_cumulative: int = 0
    _train_step: int = field(default=0, repr=False)
    _rollout_step: int = field(default=0, repr=False)
    _score_step: int = field(default=0, repr=False)

    @classmethod
    def for_arch(cls, arch: ArchSpec, **kwargs: bool | int) -> FlopsCounter:
        """A counter for an HF architecture (options as the fields)."""
        return cls(ModelFlops.from_arch(arch), **kwargs)  # type: ignore[arg-type]

    def add_rollout(
        self, prompt_lens: Sequence[int], response_lens: Sequence[Sequence[int]]
    ) -> int:
        """Count generated groups; returns their FLOPs."""
        flops = sum(
            self.model.rollout(p, rs, prefix_shared=self.prefix_shared)
            for p, rs in zip(prompt_lens, response_lens, strict=True)
        )
        self._rollout_step += flops
        return flops

    def add_training(self, prompt_lens: Sequence[int], response_lens: Sequence[int]) -> int:
        """Count trained sequences; returns their FLOPs."""
        flops = sum(
            self.model.training(
                p,
                r,
                head_on_all_tokens=self.head_on_all_tokens,
                recompute=self.recompute,
                extra_forward_passes=self.extra_forward_passes,
            )
            for p, r in zip(prompt_lens, response_lens, strict=True)
        )
        self._train_step += flops
        return flops

    def add_scoring(self, seq_lens: Sequence[int]) -> int:
        """Count forward-only scoring passes (output layer at one position); their FLOPs."""
        flops = sum(self.model.forward(s, 1) for s in seq_lens)
        self._score_step += flops
        return flops

    def end_step(self) -> dict[str, float]:
        """Close the step: its metrics (``flops/...``) and the new cumulative totals."""
        self.train_cumulative += self._train_step
        self.rollout_cumulative += self._rollout_step
        self.score_cumulative += self._score_step
        total = self.train_cumulative + self.rollout_cumulative + self.score_cumulative
        out = {
            "flops/train_step": float(self._train_step),
            "flops/rollout_step": float(self._rollout_step),
            "flops/train_cumulative": float(self.train_cumulative),
            "flops/rollout_cumulative": float(self.rollout_cumulative),
            "flops/total_cumulative": float(total),
        }
        if self.score_cumulative:
            out["flops/score_step"] = float(self._score_step)
            out["flops/score_cumulative"] = float(self.score_cumulative)
        self._train_step = self._rollout_step = self._score_step = 0
        return out

    def state_dict(self) -> dict[str, int]:
        """Cumulative counts (exact integers) for a checkpoint."""
        return {
            "train_cumulative": self.train_cumulative,
            "rollout_cumulative": self.rollout_cumulative,
            "score_cumulative": self.score_cumulative,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the cumulative counts."""
        self.train_cumulative = int(state["train_cumulative"])
        self.rollout_cumulative = int(state["rollout_cumulative"])
        self.score_cumulative = int(state.get("score_cumulative", 0))


__all__ = ["FlopsCounter", "ModelFlops", "rollout_flops", "training_flops"]
