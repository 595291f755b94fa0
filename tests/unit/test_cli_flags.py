"""Command-line flags: hyphens everywhere (torchrun, Megatron-LM), underscores still accepted.

Every CLI builds its parser with ``megatron_rpt.cli.FlagParser`` and declares long options with
hyphens only; ``--a_b`` then parses exactly like ``--a-b``.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from megatron_rpt.cli import FlagParser, hyphenate_flags
from megatron_rpt.train import parse_args

ROOT = Path(__file__).resolve().parents[2]
TOOLS_WITH_PARSER = ("prepare_rpt_data", "eval_next_token", "plan_run", "fit_scaling",
                     "compare_objectives")  # fmt: skip
_RAW_PARSER = re.compile(r"\bArgumentParser\(")
_UNDERSCORE_FLAG = re.compile(r"""add_argument\(\s*(?:"[^"]*",\s*)*["']--[\w-]*_""")


def _load_tool(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_sources() -> list[Path]:
    files = [*ROOT.glob("tools/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("megatron_rpt/**/*.py")]
    return [p for p in files if p.name != "cli.py"]


def violations(source: str) -> list[str]:
    """What breaks the flag rule in one file: a raw ArgumentParser, an underscore option."""
    return [m.group(0) for m in _RAW_PARSER.finditer(source)] + [
        m.group(0) for m in _UNDERSCORE_FLAG.finditer(source)
    ]


def test_rule_scanner_catches_violations() -> None:
    assert violations('p = argparse.ArgumentParser(description="x")') != []
    assert violations('p.add_argument("--corpus_format")') != []
    assert violations('p.add_argument("-c", "--max_len", type=int)') != []
    assert violations('p = FlagParser()\np.add_argument("--corpus-format")') == []


def test_every_cli_uses_flag_parser_and_hyphens() -> None:
    bad = {str(p.relative_to(ROOT)): v for p in _cli_sources() if (v := violations(p.read_text()))}
    assert not bad, bad


def test_hyphenate_flags_touches_only_option_names() -> None:
    argv = ["--set", "data.corpus_format=jsonl", "--text_field=body_text", "-x", "a_b", "--",
            "--keep_me"]  # fmt: skip
    assert hyphenate_flags(argv) == ["--set", "data.corpus_format=jsonl", "--text-field=body_text",
                                     "-x", "a_b", "--", "--keep_me"]  # fmt: skip


def _value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    return ["1"]


def _both_spellings(parser: argparse.ArgumentParser) -> list[tuple[list[str], list[str]]]:
    """(hyphen argv, underscore argv) pairs: each long option with a value, plus positionals."""
    positionals = [v for a in parser._actions if not a.option_strings for v in _value(a)]
    required = [(a.option_strings[0], _value(a)) for a in parser._actions if a.required and a.option_strings]
    pairs = []
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--") and "-" in s[2:]]
        if not longs or isinstance(action, argparse._HelpAction):
            continue
        flag = longs[0]
        extra = [x for opt, val in required if opt != flag for x in (opt, *val)]
        for group in parser._mutually_exclusive_groups:  # one member of each required group
            if group.required and action not in group._group_actions:
                first = group._group_actions[0]
                extra += [first.option_strings[0], *_value(first)]
        value = _value(action)
        pairs.append(([*positionals, *extra, flag, *value],
                      [*positionals, *extra, "--" + flag[2:].replace("-", "_"), *value]))  # fmt: skip
    return pairs


@pytest.mark.parametrize("tool", TOOLS_WITH_PARSER)
def test_tool_flags_parse_identically_in_both_spellings(tool: str) -> None:
    parser = _load_tool(tool).build_parser()
    assert isinstance(parser, FlagParser)
    pairs = _both_spellings(parser)
    assert pairs or tool == "compare_objectives", f"{tool}: no multi-word option to check"
    for hyphen, underscore in pairs:
        assert parser.parse_args(hyphen) == parser.parse_args(underscore), (hyphen, underscore)


def test_generated_config_options_are_hyphenated() -> None:
    parser = _load_tool("prepare_rpt_data").build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    assert "--entropy-top-k" in options and "--entropy_top_k" not in options
    args = parser.parse_args(["--entropy_top_k", "8", "--corpus-format", "jsonl"])
    assert (args.field_entropy_top_k, args.field_corpus_format) == ("8", "jsonl")


def test_entry_point_flags_parse_identically_in_both_spellings() -> None:
    hyphen = parse_args(["--init-from", "x", "--help-config", "--set", "data.corpus_format=text"])
    underscore = parse_args(["--init_from", "x", "--help_config", "--set", "data.corpus_format=text"])
    assert hyphen == underscore
    assert hyphen.init_from == "x" and hyphen.set == ["data.corpus_format=text"]
