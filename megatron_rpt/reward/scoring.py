r"""Score one group of sampled responses: the one path training and evaluation share.

``score_group(completions, target, reader, reward_name=...)`` returns the rewards and a
"formatted" flag (a prediction could be read) per response. How a response is read depends on
the prompt mode (``PromptConfig.mode``), and ``ResponseReader`` holds what that needs:

* **reasoning**: the reward reads the *assistant turn*, i.e. the opener the prompt already
  holds (``PromptResult.opener``, e.g. a prefilled ``</think>\n\boxed{``) followed by the
  response text, and takes the last box after ``</think>`` (``next_token.extract_prediction``).
  When the tokenizer marks ``</think>`` as a special token, the response is re-decoded from its
  ids with special tokens kept, because engines decode with ``skip_special_tokens=True``,
  which would delete it (tokenization spaces are never cleaned up there).
* **completion**: the prediction is the concatenated vocabulary bytes of the sampled tokens
  (a trailing stop token excluded), scored with the same prefix-match rule. Bytes, not
  decoded text: a sampled token can be half of a UTF-8 character, which ``decode`` turns into
  U+FFFD, and it can be ``{`` or ``}``, which no box could hold.

>>> from megatron_rpt.reward.registry import RewardTarget
>>> from megatron_rpt.rollout.types import Completion
>>> t = RewardTarget(continuation_token_bytes=(b" 4", b"}"), continuation_ids=(9, 3))
>>> c = [Completion(token_ids=[9], text=" 4", logprobs=None, finish_reason="length"),
...      Completion(token_ids=[8], text="4", logprobs=None, finish_reason="length")]
>>> score_group(c, t, ResponseReader.completion([b""] * 8 + [b"4", b" 4"]))
([1.0, 0.0], [True, True])
>>> r = [Completion(token_ids=[1], text=" 4}", logprobs=None, finish_reason="stop")]
>>> score_group(r, t, ResponseReader(opener="</think>\\boxed{"))
([1.0], [True])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron_rpt.errors import ConfigError
from megatron_rpt.reward.next_token import THINK_CLOSE, extract_prediction, prefix_match_reward
from megatron_rpt.reward.registry import RewardTarget, get_reward

if TYPE_CHECKING:
    from megatron_rpt.rollout.types import Completion

COMPLETION_REWARDS = ("prefix_match", "first_token")
"""Rewards defined on sampled token bytes (completion mode)."""


@dataclass(frozen=True)
class ResponseReader:
    """How a response becomes what the reward reads (module docstring)."""

    mode: str = "reasoning"
    """'reasoning' or 'completion' (``PromptConfig.mode``)."""
    opener: str = ""
    """Reasoning mode: the assistant-turn prefix the prompt ends with."""
    token_bytes: Sequence[bytes] | None = None
    """Completion mode: exact bytes of every vocabulary id (``data.tokens.token_byte_table``)."""
    decode: Callable[[Sequence[int]], str] | None = None
    """Reasoning mode: re-decodes ids with special tokens kept (None: the engine's text)."""

    @classmethod
    def completion(cls, token_bytes: Sequence[bytes]) -> ResponseReader:
        """A completion-mode reader over the policy's byte table."""
        return cls(mode="completion", token_bytes=token_bytes)

    @classmethod
    def for_prompt(
        cls, mode: str, opener: str, tokenizer: Any, token_bytes: Sequence[bytes] | None = None
    ) -> ResponseReader:
        """The reader for ``mode``; completion mode needs the policy's ``token_bytes``."""
        if mode == "completion":
            if token_bytes is None:
                raise ValueError(
                    "completion mode reads the policy's token bytes: pass token_bytes "
                    "(data.tokens.token_byte_table(tokenizer))"
                )
            return cls.completion(token_bytes)
        return cls(mode="reasoning", opener=opener, decode=_special_think_decoder(tokenizer))

    def assistant_turn(self, completion: Completion) -> str:
        """Reasoning mode: the opener followed by the response text."""
        text = completion.text if self.decode is None else self.decode(completion.token_ids)
        return self.opener + text

    def prediction_bytes(self, completion: Completion) -> bytes:
        """Completion mode: bytes of the sampled tokens, without a trailing stop token."""
        assert self.token_bytes is not None
        ids = completion.token_ids
        if completion.finish_reason == "stop" and ids:
            ids = ids[:-1]
        table = self.token_bytes
        return b"".join(table[t] if 0 <= t < len(table) else b"" for t in ids)


def _special_think_decoder(tokenizer: Any) -> Callable[[Sequence[int]], str] | None:
    """A decoder that keeps special tokens, when ``</think>`` is one (else None)."""
    special = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {str(t) for t in added.values() if getattr(t, "special", False)}
    if THINK_CLOSE not in special:
        return None
    return lambda ids: tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def check_reward_for_mode(reward_name: str, mode: str) -> None:
    """Completion mode supports only rewards defined on token bytes (ConfigError otherwise)."""
    if mode == "completion" and reward_name not in COMPLETION_REWARDS:
        raise ConfigError(
            f"reward.name={reward_name} is not defined for prompt.mode=completion; use one of "
            f"{list(COMPLETION_REWARDS)}"
        )


def score_group(
    completions: Sequence[Completion],
    target: RewardTarget,
    reader: ResponseReader,
    *,
    reward_name: str = "prefix_match",
    require_think_close: bool = True,
) -> tuple[list[float], list[bool]]:
    """(reward, formatted) of each of one context's responses (module docstring)."""
    if reader.mode == "completion":
        check_reward_for_mode(reward_name, reader.mode)
        preds = [reader.prediction_bytes(c) for c in completions]
        if reward_name == "first_token":
            first = int(target.continuation_ids[0]) if target.continuation_ids else None
            rewards = [
                float(bool(c.token_ids) and c.token_ids[0] == first and bool(p))
                for c, p in zip(completions, preds, strict=True)
            ]
        else:
            rewards = [prefix_match_reward(p, target.continuation_token_bytes) for p in preds]
        return rewards, [bool(p) for p in preds]
    texts = [reader.assistant_turn(c) for c in completions]
    reward_fn = get_reward(reward_name)
    rewards = [float(r) for r in reward_fn(texts, target, require_think_close=require_think_close)]
    formatted = [
        extract_prediction(t, require_think_close=require_think_close) is not None for t in texts
    ]
    return rewards, formatted


__all__ = [
    "COMPLETION_REWARDS",
    "ResponseReader",
    "check_reward_for_mode",
    "score_group",
]
