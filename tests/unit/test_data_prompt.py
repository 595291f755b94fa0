"""Prompt templates and the chat wrapper / <think> opener handling."""

from __future__ import annotations

import logging

import pytest

from megatron_rpt.assets import smollm2_dir
from megatron_rpt.data.config import PromptConfig
from megatron_rpt.data.prompt import TEMPLATES, build_prompt, fill
from megatron_rpt.errors import ConfigError

# RPT paper, Table 10, v0 (docs/METHOD.md §2), typed in independently of the module.
PAPER_V0 = (
    "Complete the given text under '### Context' by predicting the next token, and wrap it in "
    "'\\boxed{}'. Please reason step by step to find the most probable next token as the final "
    "answer, and enclose it in \\boxed{} (note: the token may begin with a space, e.g., "
    "\\boxed{ para} or \\boxed{ =}; do not use \\text{}).\n\n### Context\n"
)
CONTEXT = "Let $f(x) = 3x + 2$. Then {prompt_content} and } { braces stay: $f(4) ="


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def test_v0_is_the_paper_text():
    assert fill("v0", CONTEXT) == (None, PAPER_V0 + CONTEXT)


def test_every_template_holds_the_context_once_verbatim():
    markers = {
        "v1": ["final prediction", "```" + CONTEXT + "```."],
        "v2": ["Now, please complete", "\\boxed{ +=}", "```" + CONTEXT + "```."],
        "v3": [
            "list multiple potential tokens and select the most probable one as the final answer",
            "```" + CONTEXT + "```",
        ],
        "v4": [
            "\\boxed{ this}",
            "\\boxed{9}",
            "\\boxed{:\\n}",
            "\\boxed{1991^2}",
            "Now, the context is:\n### Context\n\n```" + CONTEXT + "```.",
        ],
        "v5": ["as the final answer, and enclose it", "### Context\n```" + CONTEXT + "```."],
        "v6": [
            "wrapped in ``` and ```",
            "The context is: ```" + CONTEXT + "```, now please predict the next token.",
        ],
    }
    assert sorted(TEMPLATES) == ["rlp"] + [f"v{i}" for i in range(7)]
    for name in [f"v{i}" for i in range(7)]:  # RPT's templates
        system, user = fill(name, CONTEXT)
        assert user.count(CONTEXT) == 1 and "{prompt_content}" not in user.replace(CONTEXT, "")
        assert "\\boxed{}" in user
        for m in markers.get(name, []):
            assert m in user, (name, m)
        assert (system is not None) == (name == "v2")
    assert (
        fill("v2", "x")[0]
        == "You are a helpful assistant, good at predicting the next token for a given context."
    )
    with pytest.raises(ConfigError, match="unknown template 'v9'"):
        fill("v9", "x")


def test_chat_template_user_turn_and_think_opener(tok):
    r = build_prompt(CONTEXT, tok, PromptConfig())
    user = fill("v0", CONTEXT)[1]
    assert f"<|im_start|>user\n{user}<|im_end|>\n" in r.text
    assert r.text.endswith("<|im_start|>assistant\n<think>\n")
    assert r.ids == tok(r.text, add_special_tokens=False)["input_ids"]
    assert tok.decode(r.ids) == r.text
    closed = build_prompt(CONTEXT, tok, PromptConfig(open_think=False))
    assert closed.text.endswith("<|im_start|>assistant\n") and "<think>" not in closed.text


def test_opener_is_not_doubled_when_the_template_opens_it(tok):
    from transformers import AutoTokenizer

    r1 = AutoTokenizer.from_pretrained(smollm2_dir())
    # an R1-Distill-style template whose generation prompt already opens the reasoning block
    r1.chat_template = (
        "{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
    )
    r = build_prompt("ctx", r1, PromptConfig())
    assert r.text.endswith("<|Assistant|><think>\n") and r.text.count("<think>") == 1
    r = build_prompt("ctx", r1, PromptConfig(think_opener="<think>"))
    assert r.text.count("<think>") == 1


def test_system_messages_and_raw_prompts(tok, caplog):
    r = build_prompt("ctx", tok, PromptConfig(template="v2"))
    assert r.text.startswith("<|im_start|>system\nYou are a helpful assistant, good at predicting")
    r = build_prompt("ctx", tok, PromptConfig(system_prompt="Be brief."))
    assert r.text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and r.system == "Be brief."
    with caplog.at_level(logging.WARNING):
        r = build_prompt("ctx", tok, PromptConfig(template="v2", system_prompt="Be brief."))
    assert "Be brief." not in r.text and "system_prompt is ignored" in caplog.text
    raw = build_prompt("ctx", tok, PromptConfig(template="v2", chat_template=False))
    system, user = fill("v2", "ctx")
    assert raw.text == f"{system}\n\n{user}\n<think>\n"
    strict = type(tok).from_pretrained(smollm2_dir())
    strict.chat_template = (  # like Gemma's: no system turns
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    r = build_prompt("ctx", strict, PromptConfig(template="v2"))
    assert r.text == f"<u>{system}\n\n{user}</u><a><think>\n"
    no_template = type(tok).from_pretrained(smollm2_dir())
    no_template.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        build_prompt("ctx", no_template, PromptConfig())


def test_rlp_template_is_the_context_under_rlps_system_message():
    from megatron_rpt.data.prompt import RLP_SYSTEM

    assert fill("rlp", CONTEXT) == (RLP_SYSTEM, CONTEXT)
    assert "<think>" in RLP_SYSTEM and "</think>" in RLP_SYSTEM
