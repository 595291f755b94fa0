"""Fixtures shared by the single-process unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def groups():  # noqa: ANN201
    """A one-process gloo world with Megatron's parallel state at TP=PP=1, seeded; torn down after the module."""
    from megatron_rpt.distributed import (
        initialize_model_parallel,
        seed_model_parallel,
        single_process_group,
    )

    with single_process_group():
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        yield groups
