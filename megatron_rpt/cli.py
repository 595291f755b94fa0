"""Shared plumbing for the thin CLIs in tools/ and the training entry point.

``run_cli(main)`` turns ``InputError`` into a one-line ``error: ...`` on stderr with exit status
2 (no traceback for a user mistake), and sets up logging once. ``doc_parser``,
``add_config_options`` and ``config_option_overrides`` give a tool one ``--FIELD`` option per
field of a config dataclass (type, default and docstring in ``--help``), turned back into
``section.FIELD=VALUE`` overrides so the config tree validates them in one place.

Flag spelling: every command line of the project (tools/, bench/, the training entry point)
is parsed by ``FlagParser``. Long options are spelled with hyphens, as torchrun's and
Megatron-LM's are (``--corpus-format``, ``--no-progress``); the underscore spelling
(``--corpus_format``) is read as the same option. Config keys inside values keep their field
names (``--set data.corpus_format=jsonl``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from megatron_rpt.config_utils import describe
from megatron_rpt.errors import InputError


def setup_logging(level: str | int | None = None) -> None:
    """Configure the ``megatron_rpt`` logger for a CLI (rank-prefixed under torchrun)."""
    level = level or os.environ.get("MEGATRON_RPT_LOG_LEVEL", "INFO")
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main(argv)`` and exit with its status; user errors print one line, exit 2."""
    setup_logging()
    try:
        status = main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # noqa: T201
        sys.exit(130)
    sys.exit(status or 0)


def hyphenate_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` with underscores in long-option names turned into hyphens (values untouched).

    >>> hyphenate_flags(["--corpus_format", "jsonl", "--set=data.corpus_format=x", "-n", "--", "--a_b"])
    ['--corpus-format', 'jsonl', '--set=data.corpus_format=x', '-n', '--', '--a_b']
    """
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--":  # everything after it is positional
            break
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            out[i] = name.replace("_", "-") + eq + value
    return out


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that also accepts ``--a_b`` for every ``--a-b`` option.

    Declare options with hyphens only; sub-parsers made by ``add_subparsers`` are FlagParsers
    too (argparse builds them with the parent's class).
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = sys.argv[1:] if args is None else args
        return super().parse_known_args(hyphenate_flags(argv), namespace)


def doc_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is ``doc``'s first paragraph and epilog the rest, verbatim."""
    head, _, tail = (doc or "").partition("\n\n")
    return FlagParser(
        prog=prog, description=head, epilog=tail or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


def _metavar(type_name: str) -> str:
    """'int | NoneType' -> 'INT|none'; 'tuple[float, float, float]' -> 'FLOAT,FLOAT,FLOAT'.

    >>> _metavar("int | NoneType"), _metavar("tuple[float, float]")
    ('INT|none', 'FLOAT,FLOAT')
    """
    if type_name.startswith("tuple["):
        return ",".join(a.strip().upper() for a in type_name[6:-1].split(","))
    if type_name.startswith("{"):
        return type_name.split(" | ")[0] + ("|none" if "NoneType" in type_name else "")
    return "|".join("none" if p == "NoneType" else p.upper() for p in type_name.split(" | "))


def add_config_options(parser: argparse.ArgumentParser, cfg: object, title: str) -> None:
    """One ``--KEY`` option per leaf field of the dataclass ``cfg`` (``--entropy-top-k`` for
    ``entropy_top_k``), in its own help group."""
    group = parser.add_argument_group(title)
    for key, tp, value, doc in describe(cfg):
        group.add_argument(
            f"--{key.replace('_', '-')}", dest=f"field_{key}", metavar=_metavar(tp), default=None,
            help=f"{doc} (default: {value})".replace("%", "%%"),
        )  # fmt: skip


def config_option_overrides(args: argparse.Namespace, section: str) -> list[str]:
    """The ``--KEY`` options the user gave, as ``section.KEY=VALUE`` overrides."""
    return [
        f"{section}.{k[len('field_') :]}={v}"
        for k, v in vars(args).items()
        if k.startswith("field_") and v is not None
    ]
