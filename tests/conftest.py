"""Fixtures shared by every test tier: a one-process world with Megatron's parallel state.

* ``process_group`` (module): a 1-rank gloo group (on a GPU machine, with device 0 current),
  destroyed with Megatron's state after the module;
* ``groups`` (module): TP=PP=1 ``ParallelGroups`` in that world, seeded, shared by the module;
* ``fresh_groups``: the same, re-initialised for one test (for modules whose tests rebuild the
  layout in between, e.g. through ``tests.helpers.training.build_policy_trainer``).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def process_group():  # noqa: ANN201
    """A one-process gloo world, torn down after the module."""
    import torch

    from megatron_rpt.distributed import single_process_group

    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    with single_process_group():
        yield


def _seeded_groups():  # noqa: ANN202
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel

    groups = initialize_model_parallel(1, 1)
    seed_model_parallel(0, groups)
    return groups


@pytest.fixture(scope="module")
def groups(process_group):  # noqa: ANN001, ANN201
    """Megatron's parallel state at TP=PP=1, seeded once for the module."""
    return _seeded_groups()


@pytest.fixture
def fresh_groups(process_group):  # noqa: ANN001, ANN201
    """Megatron's parallel state at TP=PP=1, re-initialised and seeded for this test."""
    return _seeded_groups()
