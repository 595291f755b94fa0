r"""A tiny RPT task whose next tokens are learnable: for end-to-end tests and the tiny recipe.

The corpus is made of six "words" (`` ka``, `` lo``, ...) that always follow each other in a
fixed cycle (a successor map drawn from the seed), so the next token after any context is
determined by its last word. ``build_synthetic_task(out_dir)`` writes:

* ``corpus.jsonl``: documents of such word sequences;
* ``model/``: a byte-level BPE tokenizer trained on the corpus and the prompt/response format
  (so the v0 instruction takes a few tokens), and a tiny random Llama with a short supervised
  warm-up (plain torch cross-entropy) that mixes two things, like a pretrained model meeting
  the RPT prompt: language modelling on the documents (it "knows the language": which word
  follows which, in plain text), and the answer **format**: after the raw v0 prompt and
  ``<think>\n`` it answers ``</think>\boxed{<w>}`` with a word ``w`` drawn uniformly at
  random, independently of the context. So the warmed-up policy always answers in format but
  its reward is about 1/6 (chance): nothing taught it to put the *next* word in the box.
  RPT has to learn that through its reward (measured: 0.1-0.2 at the start, 0.6-1.0 after 30
  steps of the tiny recipe, depending on the seed).

Everything is seeded and single-threaded, so two builds give identical files; a finished
build is reused (written atomically: a crash never leaves a half-built directory).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

WORDS = ("ka", "lo", "mi", "nu", "pe", "ro")
EOS = "<|endoftext|>"
ANSWER = "</think>\\boxed{%s}"


@dataclass(frozen=True)
class SyntheticTask:
    """Paths of a built task."""

    root: Path
    model_dir: Path
    corpus: Path
    successor: dict[str, str]
    """The true next word after each word."""


def successor_map(seed: int, period: int = 6) -> dict[str, str]:
    """Random cycles of ``period`` words (each word has exactly one successor).

    >>> m = successor_map(0); sorted(m) == sorted(m.values()) == sorted(WORDS)
    True
    >>> all(k == v for k, v in successor_map(0, period=1).items())
    True
    """
    order = list(WORDS)
    random.Random(seed).shuffle(order)
    out = {}
    for start in range(0, len(order), period):
        cycle = order[start : start + period]
        out.update({w: cycle[(i + 1) % len(cycle)] for i, w in enumerate(cycle)})
    return out


def synthetic_documents(n_docs: int, words_per_doc: int, seed: int, period: int = 6) -> list[str]:
    """Documents ``" w1 w2 ..."`` following ``successor_map(seed)`` from random starts."""
    succ, rng = successor_map(seed, period), random.Random(seed + 1)
    docs = []
    for _ in range(n_docs):
        word, words = rng.choice(WORDS), []
        for _ in range(words_per_doc):
            words.append(word)
            word = succ[word]
        docs.append("".join(" " + w for w in words))
    return docs


def _format_texts() -> list[str]:
    from megatron_rpt.data.config import PromptConfig
    from megatron_rpt.data.prompt import fill

    _, user = fill(PromptConfig().template, "")
    answers = [ANSWER % (" " + w) for w in WORDS]
    return [user + "\n" + PromptConfig().think_opener + a for a in answers]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 640):  # noqa: ANN201
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=EOS)
    tok.save_pretrained(out_dir)
    return tok


def build_synthetic_task(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_docs: int = 24,
    words_per_doc: int = 40,
    warmup_steps: int = 80,
    context_words: int = 8,
    period: int = 6,
    lm_warmup: bool = True,
) -> SyntheticTask:
    """Write (or reuse) the task under ``out_dir`` (see the module docstring)."""
    from megatron_rpt.fileio import atomic_output_dir

    root = Path(out_dir)
    task = SyntheticTask(root, root / "model", root / "corpus.jsonl", successor_map(seed, period))
    if (root / "task.json").is_file():
        return task
    docs = synthetic_documents(n_docs, words_per_doc, seed, period)
    try:
        with atomic_output_dir(root, overwrite=False) as tmp:
            (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            tok = train_tokenizer(docs + _format_texts() * 4, tmp / "tokenizer")
            _save_warm_model(tmp, tok, docs, seed, warmup_steps, context_words, lm_warmup)
            shutil.rmtree(tmp / "tokenizer")
            (tmp / "task.json").write_text(json.dumps({"seed": seed, "successor": task.successor}))
    except FileExistsError:
        if not (root / "task.json").is_file():  # another process is still building it
            raise
    return task


def _save_warm_model(
    root: Path,
    tok,
    docs: list[str],
    seed: int,
    steps: int,
    context_words: int,  # noqa: ANN001
    lm_warmup: bool,
) -> None:
    """Tiny Llama + the format warm-up (plain torch cross-entropy on the answer tokens)."""
    import torch

    from megatron_rpt.data.config import PromptConfig
    from megatron_rpt.data.prompt import build_prompt
    from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

    model_dir = save_tiny_causal_lm(
        root / "model", root / "tokenizer", vocab_size=len(tok), hidden_size=64, layers=2,
        initializer_range=0.02, seed=seed,
    )  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt_cfg = PromptConfig(chat_template=False)
    rng = random.Random(seed + 2)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    words = [d.split() for d in docs]
    model.train()
    for _ in range(steps):
        rows, targets = [], []
        for _ in range(16):
            doc = rng.choice(words)
            end = rng.randrange(1, len(doc))
            context = "".join(" " + w for w in doc[max(0, end - context_words) : end])
            prompt = build_prompt(context, tok, prompt_cfg).ids
            answer = tok(ANSWER % (" " + rng.choice(WORDS)), add_special_tokens=False)["input_ids"]
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        if lm_warmup:  # plain LM loss on whole documents: the model "knows the language"
            for doc in rng.sample(docs, 4):
                ids = tok(doc, add_special_tokens=False)["input_ids"]
                rows.append(ids)
                targets.append(ids)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(model_dir, safe_serialization=True)


__all__ = ["SyntheticTask", "build_synthetic_task", "successor_map", "synthetic_documents"]
