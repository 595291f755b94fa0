"""RLP under TP=2 and PP=2 gives what TP=1 gives: the two scoring passes (the policy with
the thought, the EMA teacher without it, swapped into the model's parameters), the rewards,
and the loss and gradient norm of the thought-only step that follows.

Each layout: build the tiny model, initialise phi = theta, take one Adam step and update phi
(tau 0.5, so phi differs from theta), then score fixed thought groups and train on them.
Tolerances (fp32): log-probs 1e-5, loss 1e-6, grad norm 1e-5 relative.
"""

import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model


def _groups(seed=3, contexts=3, g=4):
    from megatron_rpt.trainer.rlp import ThoughtGroup

    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=gen).tolist()

    out = []
    for b in range(contexts):
        thoughts = [ids(2 + (b + i) % 4) for i in range(g)]
        out.append(
            ThoughtGroup(
                prompt_ids=ids(5 + b), context_ids=ids(4 + 2 * b), target_id=ids(1)[0],
                opener_ids=ids(1), thoughts=thoughts, logprobs=[[-1.0] * len(t) for t in thoughts],
                scored=[[7, *t] for t in thoughts], closed=[True] * g,
                response_lengths=[len(t) for t in thoughts],
            )  # fmt: skip
        )
    return out


def _rlp_step(rank, world_size, hf_dir, tp, pp):
    from megatron_rpt.loss.config import LossConfig
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from megatron_rpt.trainer.ema import EMATeacher
    from megatron_rpt.trainer.rlp import score_thoughts, thought_batch
    from tests.helpers.training import build_policy_trainer, random_group_batch

    ts = build_policy_trainer(
        hf_dir, tp=tp, pp=pp, temperature=0.7,
        optimizer=OptimizerConfig(lr=1e-2, use_distributed_optimizer=False),
        train=TrainConfig(max_tokens_per_microbatch=32),
        loss=LossConfig(aggregation="seq_mean_token_mean"),
    )  # fmt: skip
    g = ts.groups
    teacher = EMATeacher(ts.model_modules, 0.5, tp_rank=g.tp_rank, pp_rank=g.pp_rank,
                         dp_rank=g.dp_rank)  # fmt: skip
    teacher.initialize()
    ts.train_step(random_group_batch(VOCAB, seed=11))
    teacher.update()
    groups = _groups()
    scored, baseline, _ = score_thoughts(ts, teacher, groups)
    rewards, batch = thought_batch(groups, scored, baseline)
    m = ts.train_step(batch)
    return {"scored": scored, "teacher": baseline, "rewards": rewards, "loss": m.loss,
            "grad_norm": m.grad_norm}  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hf_dir = str(save_tiny_model("qwen2", tmp_path_factory.mktemp("rlp") / "hf"))
    return {
        "tp1": run_distributed(_rlp_step, 1, args=(hf_dir, 1, 1), timeout=600)[0],
        "tp2": run_distributed(_rlp_step, 2, args=(hf_dir, 2, 1), timeout=600),
        "pp2": run_distributed(_rlp_step, 2, args=(hf_dir, 1, 2), timeout=600),
    }


@pytest.mark.timeout(1800)  # three spawned runs on a shared 2-core machine (~1 min idle)
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_rlp_step_matches_tp1(results, layout):
    want = results["tp1"]
    assert want["teacher"].abs().min() > 0 and want["rewards"].abs().max() > 1e-3
    for got in results[layout]:  # every rank returns the same values
        for key in ("scored", "teacher", "rewards"):
            assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), (layout, key)
        assert abs(got["loss"] - want["loss"]) <= 1e-6
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"]
