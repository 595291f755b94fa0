"""Shared plumbing for the thin CLIs in tools/ and the training entry point.

``run_cli(main)`` turns ``InputError`` into a one-line ``error: ...`` on stderr with exit status
2 (no traceback for a user mistake), and sets up logging once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


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
    from megatron_rpt.errors import InputError

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
