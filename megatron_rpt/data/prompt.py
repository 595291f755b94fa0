r"""The paper's seven next-token-reasoning prompt templates and how a context becomes a prompt.

Templates (RPT paper, Appendix D, Table 10; ``{prompt_content}`` is the context text x<t):

* **v0** (used for all of the paper's RPT training; the default) is the paper's text
  (docs/METHOD.md §2), as one instruction paragraph, a blank line, ``### Context`` and the context.
* **v1-v6** are transcribed from the text of Table 10 (two independent text extractions of the
  arXiv PDF agreed on the wording). Typesetting is not recoverable from a PDF, so these
  choices are ours: the instruction is one paragraph followed by a blank line; ``### Context``
  is on its own line; a fenced context is written ``` ```{prompt_content}``` ``` with no
  newline inside the fence (so the model sees exactly where the context ends, trailing spaces
  included); v4's ``\n`` are newlines, its ``\\n`` a literal backslash-n as printed; v4's
  abbreviated few-shot snippets keep the table's visible text, with "...(some omitted)..."
  written as "..."; v1/v2's "``\\boxed{}``" is rendered ``\boxed{}`` like everywhere else.
  v2's first sentence ("You are a helpful assistant, ...") is its **system** message.

**rlp** is not RPT's: the thought prompt of ``train.objective=rlp`` (RLP_SYSTEM as the system
message, the bare context as the user turn).

Chat wrapper and the ``<think>`` opener (the paper does not specify the wrapper; see
docs/METHOD.md §2):

1. With ``PromptConfig.chat_template`` (default) the filled template is the **user** turn of
   ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``. A system message is
   added only when the template defines one (v2) or ``PromptConfig.system_prompt`` is set
   (v2's own line wins; a configured one is then ignored with a warning). A chat template that
   rejects system turns (Gemma's) gets the system text prepended to the user turn. The tokenizer's
   chat template may add its own default system turn (SmolLM2's does); that is left as is.
   Without ``chat_template`` the prompt is the raw text (system line, blank line, user text).
2. With ``PromptConfig.open_think`` (default) the response must start inside the reasoning
   block, because the reward only reads the ``\boxed{}`` after ``</think>``. If the rendered
   prompt already ends with the opener (R1-Distill-style templates end with ``<think>\n``;
   compared ignoring trailing whitespace) nothing is added; otherwise ``think_opener`` is
   appended after the generation prompt (in a raw prompt, on a new line). With ``open_think`` off the model must write its own
   ``<think>`` (reasoning models whose template does not open it) or the run must set
   ``reward.require_think_close=false``.
3. Prompt ids are the tokenisation of the final text (``add_special_tokens=False`` after a
   chat template, which renders BOS itself). Known limitation: a context that literally
   contains a special-token string (e.g. ``<|im_end|>``) is tokenised as that special token.

Completion mode (``PromptConfig.mode="completion"``): the prompt is the context's own document
token ids, unchanged (no template, no chat wrapper, no text round-trip), and the response is
the next token(s). ``context_prompt`` is the one function training, evaluation and the data
tools call for either mode.

>>> TEMPLATES["v0"].user.splitlines()[-2:]
['### Context', '{prompt_content}']
>>> fill("v6", "1 + 1 =")[1].splitlines()[-1]
'The context is: ```1 + 1 =```, now please predict the next token.'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_rpt.data.config import PromptConfig
from megatron_rpt.errors import ConfigError

logger = logging.getLogger(__name__)

PLACEHOLDER = "{prompt_content}"

_NOTE = (
    r"(note: the token may begin with a space, e.g., \boxed{ para} or \boxed{ =}; "
    r"do not use \text{})."
)


@dataclass(frozen=True)
class Template:
    """One prompt template: an optional system message and the user text with the placeholder."""

    user: str
    system: str | None = None


V0 = (
    r"Complete the given text under '### Context' by predicting the next token, and wrap it in "
    r"'\boxed{}'. Please reason step by step to find the most probable next token as the final "
    r"answer, and enclose it in \boxed{} " + _NOTE + "\n\n### Context\n" + PLACEHOLDER
)
V1 = (
    r"Complete the given text under ### Context by predicting the next token, and wrap it in "
    r"\boxed{}. Please reason step by step to find the most probable next token as the final "
    r"prediction, and enclose it in \boxed{} "
    + _NOTE
    + "\n\n### Context\n```"
    + PLACEHOLDER
    + "```."
)
V2_SYSTEM = "You are a helpful assistant, good at predicting the next token for a given context."
V2 = (
    r"Now, please complete the given text under ### Context by predicting the next token, and "
    r"wrap it in \boxed{}. Please reason step by step to find the most probable next token, and "
    r"enclose it in \boxed{} (note: the token may begin with a space, e.g., \boxed{ para} or "
    r"\boxed{ +=}; do not use \text{})." + "\n\n### Context\n```" + PLACEHOLDER + "```."
)
V3 = (
    r"Complete the given text under ### Context by predicting the next token, list multiple "
    r"potential tokens and select the most probable one as the final answer. Wrap your final "
    r"answer in \boxed{} " + _NOTE + "\n\n### Context\n```" + PLACEHOLDER + "```"
)
V4 = (
    r"Complete the given text under ### Context by predicting the next token, and wrap it in "
    r"\boxed{}. Please reason step by step to find the most probable next token as the final "
    r"answer, and enclose it in \boxed{}. Some examples:"
    "\n### Context\n\n```..."
    r"Matching calculations with 1990 valid combinations indicates the minimum value of \( b \) "
    r"that fits all pre-requisites and restrictions for triangle formation and symmetry "
    r"generates the efficient outcome:"
    "\n\n\\[\n\\boxed{1991^2}\n\\]\n\nIn```\nThe next token is \\boxed{ this}"
    "\n### Context\n\n```..."
    r"Thus $2^{A}=\left(2^{a}\right)^{2}\left(2^{3} \right)="
    "```\nThe next token is \\boxed{9}"
    "\n### Context\n\n```..., numerical exploration shows```\nThe next token is \\boxed{:\\n}"
    "\nNow, the context is:\n### Context\n\n```" + PLACEHOLDER + "```."
)
V5 = (
    r"Complete the given text under ### Context by predicting the next token, and wrap it in "
    r"\boxed{}. Please reason step by step to find the most probable next token as the final "
    r"answer, and enclose it in \boxed{} " + _NOTE + "\n\n### Context\n```" + PLACEHOLDER + "```."
)
V6 = (
    r"Complete the given text wrapped in ``` and ``` by predicting the next token, list multiple "
    r"potential tokens and select the most probable one as the final prediction. Wrap your "
    r"final prediction in \boxed{} "
    + _NOTE
    + "\n\nThe context is: ```"
    + PLACEHOLDER
    + "```, now please predict the next token."
)

RLP_SYSTEM = (
    "You are a continuation-and-reasoning assistant. You are given the beginning of a text. "
    "First think briefly about how the text continues, between <think> and </think>; then "
    "continue the text in the same style."
)
"""System message of RLP's thought prompt (arXiv 2510.01265 describes, without printing it, a
continuation-and-reasoning assistant that thinks briefly between <think> and </think> and then
continues the text in the same style; this wording is ours)."""

TEMPLATES: dict[str, Template] = {
    "v0": Template(V0),
    "v1": Template(V1),
    "v2": Template(V2, system=V2_SYSTEM),
    "v3": Template(V3),
    "v4": Template(V4),
    "v5": Template(V5),
    "v6": Template(V6),
    "rlp": Template(PLACEHOLDER, system=RLP_SYSTEM),  # the context itself is the user turn
}


@dataclass(frozen=True)
class PromptResult:
    """A rendered prompt: its text (what the policy sees) and token ids."""

    text: str
    ids: list[int]
    system: str | None = None
    opener: str = ""
    """The start of the assistant turn the prompt already holds (``think_opener`` when it was
    appended or the chat template ends with it); the reward reads ``opener + response``."""


def fill(template: str, context_text: str) -> tuple[str | None, str]:
    """(system, user) of ``template`` with the context inserted (inserted once, verbatim)."""
    if template not in TEMPLATES:
        raise ConfigError(
            f"prompt.template: unknown template {template!r}; known: {sorted(TEMPLATES)}"
        )
    t = TEMPLATES[template]
    before, after = t.user.split(PLACEHOLDER)
    return t.system, before + context_text + after


def _apply_chat_template(tokenizer: Any, system: str | None, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    if system:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, *messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja raises TemplateError for "system role not supported"
            logger.warning(
                "chat template rejects a system turn (%s); prepending the system text to the "
                "user turn instead",
                exc,
            )
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(context_text: str, tokenizer: Any, cfg: PromptConfig) -> PromptResult:
    """Render ``context_text`` into the policy's prompt (see the module docstring)."""
    system, user = fill(cfg.template, context_text)
    if cfg.system_prompt is not None:
        if system is None:
            system = cfg.system_prompt
        else:
            logger.warning(
                "prompt.system_prompt is ignored: template %s defines its own", cfg.template
            )
    if cfg.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"prompt.chat_template=true but tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '?')} has no chat template "
                "(set prompt.chat_template=false for a raw prompt)"
            )
        text = _apply_chat_template(tokenizer, system, user)
    else:
        text = (system + "\n\n" if system else "") + user
    if cfg.open_think and not text.rstrip().endswith(cfg.think_opener.strip()):
        if not cfg.chat_template and not text.endswith("\n"):
            text += "\n"  # raw prompt: the opener starts the response on its own line
        text += cfg.think_opener
    ids = tokenizer(text, add_special_tokens=not cfg.chat_template)["input_ids"]
    opener = cfg.think_opener if cfg.open_think and text.endswith(cfg.think_opener) else ""
    return PromptResult(text=text, ids=list(ids), system=system, opener=opener)


def context_prompt(
    context_ids: Sequence[int], context_text: Callable[[], str], tokenizer: Any, cfg: PromptConfig
) -> PromptResult:
    """The policy's prompt for one context in ``cfg.mode`` (module docstring).

    Args:
        context_ids: int [C] the context's document token ids (the last C before x_t).
        context_text: returns the context's text (called in reasoning mode only).

    >>> r = context_prompt([5, 6, 7], lambda: "unused", None, PromptConfig(mode="completion"))
    >>> r.ids, r.opener
    ([5, 6, 7], '')
    """
    if cfg.mode == "completion":
        return PromptResult(text="", ids=[int(t) for t in context_ids])
    return build_prompt(context_text(), tokenizer, cfg)


__all__ = [
    "PLACEHOLDER",
    "TEMPLATES",
    "PromptResult",
    "Template",
    "build_prompt",
    "context_prompt",
    "fill",
]
