"""ContextSampler: one epoch is a permutation, epochs differ, and a restored state continues
exactly where the uninterrupted sampler would (the data order is part of the checkpoint)."""

import pytest

from megatron_rpt.trainer.sampler import ContextSampler, derive_seed, feistel_permute


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 1025])
def test_feistel_is_a_bijection(n):
    assert sorted(feistel_permute(i, n, b"key") for i in range(n)) == list(range(n))


def test_epochs_are_permutations_and_differ():
    s = ContextSampler(50, seed=7)
    first, second = s.take(50), s.take(50)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second  # a new order each epoch
    assert first != list(range(50))  # shuffled
    assert (s.epoch, s.cursor, s.consumed) == (2, 0, 100)


def test_seed_changes_the_order():
    assert ContextSampler(100, seed=1).take(10) != ContextSampler(100, seed=2).take(10)


@pytest.mark.parametrize("split", [0, 3, 17, 29, 30, 31])
def test_resume_equals_uninterrupted(split):
    straight = ContextSampler(30, seed=3).take(70)
    a = ContextSampler(30, seed=3)
    head = a.take(split)
    b = ContextSampler(30, seed=3)
    b.load_state_dict(a.state_dict())
    assert head + b.take(70 - split) == straight


def test_state_of_another_run_is_refused():
    state = ContextSampler(30, seed=3).state_dict()
    with pytest.raises(ValueError, match="prepared again or run.seed changed"):
        ContextSampler(31, seed=3).load_state_dict(state)


def test_derive_seed_is_stable():
    # A fixed value: the seed must not depend on the process (no hash randomisation).
    assert derive_seed(1234, "rollout", 0) == derive_seed(1234, "rollout", 0)
    assert len({derive_seed(1, "rollout", i) for i in range(100)}) == 100
    assert 0 <= derive_seed(1, 2) < 2**63
