"""The training step on one process (TP=PP=DP=1, fp32, tiny HF models, gloo group of 1).

* log-probs from ``compute_logprobs`` and inside the loss equal a naive full-vocabulary
  reference from the HF model's logits (temperature 0.8, vocabulary padded 250 -> 256);
* the policy-gradient sign test with the plain and the distributed optimizer;
* the loss and the update do not depend on the micro-batch split or the layout (packed or
  padded), and padding micro-batches contribute nothing;
* configuration errors.
"""

import pytest
import torch

from megatron_rpt.errors import ConfigError
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model
from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence
from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
from tests.helpers.training import (
    build_policy_trainer,
    gather_full_parameters,
    random_rollout_batch,
)

TEMPERATURE = 0.8
LOGPROB_TOL = 1e-5  # fp32: Megatron vs HF forward differ by ~1e-6 in log-prob


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_models")
    return {kind: str(save_tiny_model(kind, root / kind)) for kind in ("qwen2", "llama_tied")}


def hf_reference_logprobs(hf_dir, batch, temperature):
    """log_softmax(HF logits / T) at each response token, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in batch.sequences:
            tokens = torch.cat([seq.prompt_ids, seq.response_ids])[None]
            logits = model(tokens).logits[0].float() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            p = seq.prompt_ids.numel()
            out.append(logp[p - 1 : -1].gather(1, seq.response_ids[:, None])[:, 0])
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_logprobs_match_naive_hf_reference(kind, layout, models, process_group):
    batch = random_rollout_batch(VOCAB, seed=1)
    ref = hf_reference_logprobs(models[kind], batch, TEMPERATURE)
    ts = build_policy_trainer(
        models[kind],
        train=TrainConfig(max_tokens_per_microbatch=20, micro_batch_layout=layout),
        temperature=TEMPERATURE,
    )
    assert ts.built.vocab.padded == 256 and ts.built.vocab.true == VOCAB
    got, entropy = ts.compute_logprobs(batch, return_entropy=True)
    for g, r, seq in zip(got, ref, batch.sequences, strict=True):
        assert g.shape == seq.response_ids.shape
        assert (g - r).abs().max().item() <= LOGPROB_TOL
    assert all((e > 0).all() and (e <= torch.log(torch.tensor(VOCAB))).all() for e in entropy)
    # The loss sees the same log-probs: with the reference as "rollout" log-probs, the
    # train/rollout mismatch metric computed inside the loss is ~0 ...
    for seq, r in zip(batch.sequences, ref, strict=True):
        seq.rollout_logprobs = r
    metrics = ts.train_step(batch)
    assert metrics.train["train_rollout_logprob_abs_diff"] <= LOGPROB_TOL
    assert abs(metrics.train["token_mult_prob_error"] - 1.0) <= LOGPROB_TOL
    # ... and is not trivially 0: against -1 everywhere it is large.
    batch2 = random_rollout_batch(VOCAB, seed=1)
    assert ts.train_step(batch2).train["train_rollout_logprob_abs_diff"] > 1.0


def _sign_check(ts, batch):
    before = ts.compute_logprobs(batch)
    metrics = ts.train_step(batch)
    after = ts.compute_logprobs(batch)
    deltas = [float((a - b).sum()) for a, b in zip(after, before, strict=True)]
    return deltas, metrics


@pytest.mark.parametrize("distributed", [False, True])
def test_one_update_raises_positive_and_lowers_negative_logprobs(
    distributed, models, process_group
):
    ts = build_policy_trainer(
        models["qwen2"],
        optimizer=OptimizerConfig(lr=1e-4, use_distributed_optimizer=distributed),
        train=TrainConfig(max_tokens_per_microbatch=24),
        temperature=TEMPERATURE,
    )
    batch = random_rollout_batch(VOCAB, seed=2)
    deltas, metrics = _sign_check(ts, batch)
    assert metrics.update_successful and metrics.grad_norm > 0 and metrics.lr == 1e-4
    for delta, seq in zip(deltas, batch.sequences, strict=True):
        assert (delta > 0) == (seq.advantage > 0), (deltas, [s.advantage for s in batch.sequences])
    assert ts.step == 1 and metrics.step == 1


def _update(ts, batch):
    before = gather_full_parameters(ts.model_modules, ts.groups)
    metrics = ts.train_step(batch)
    after = gather_full_parameters(ts.model_modules, ts.groups)
    return metrics, {k: after[k] - before[k] for k in after}


SGD = OptimizerConfig(
    optimizer="sgd", lr=1.0, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False
)


def test_micro_batch_split_and_layout_do_not_change_loss_or_update(models, process_group):
    batch = random_rollout_batch(VOCAB, seed=3)
    runs = {}
    for name, budget, layout in [
        ("one", 1000, "packed"),
        ("many", 2, "packed"),  # one sequence per micro-batch
        ("padded", 24, "padded"),
        ("mixed", 24, "packed"),
    ]:
        ts = build_policy_trainer(
            models["llama_tied"],
            optimizer=SGD,
            train=TrainConfig(max_tokens_per_microbatch=budget, micro_batch_layout=layout),
        )
        runs[name] = _update(ts, batch)
    ref_metrics, ref_update = runs["one"]
    assert ref_metrics.batch["micro_batches"] == 1 and runs["many"][0].batch["micro_batches"] == 6
    scale = max(u.abs().max().item() for u in ref_update.values())
    assert scale > 1e-2  # the update (= -grad with SGD, lr 1) is not trivially zero
    for name, (metrics, update) in runs.items():
        assert abs(metrics.loss - ref_metrics.loss) <= 1e-6, name
        assert abs(metrics.grad_norm - ref_metrics.grad_norm) <= 1e-5 * ref_metrics.grad_norm, name
        assert abs(metrics.train["entropy"] - ref_metrics.train["entropy"]) <= 1e-5, name
        for key, ref in ref_update.items():
            assert (update[key] - ref).abs().max().item() <= 1e-6 * max(scale, 1.0), (name, key)


def test_loss_equals_token_mean_of_minus_advantage_on_policy(models, process_group):
    # On-policy (ratio 1) the PPO loss value is -sum(A * mask) / N: checks the denominators.
    batch = random_rollout_batch(VOCAB, seed=4, advantages=(1.0, 2.0, -1.0, 0.5, -3.0, 1.5))
    ts = build_policy_trainer(
        models["qwen2"], optimizer=SGD, train=TrainConfig(max_tokens_per_microbatch=16)
    )
    metrics = ts.train_step(batch)
    tokens = sum(s.response_ids.numel() for s in batch.sequences)
    expected = -sum(s.advantage * s.response_ids.numel() for s in batch.sequences) / tokens
    assert metrics.loss == pytest.approx(expected, abs=1e-6)
    assert metrics.train["num_tokens"] == tokens
    assert metrics.batch["sequences"] == 6
    flat = metrics.as_dict()
    assert (
        flat["train/loss"] == metrics.loss
        and flat["time/train_s"] > 0
        and flat["time/tokens_per_s"] > 0
    )


def test_padding_micro_batches_contribute_nothing(models, process_group):
    # One sequence per micro-batch plus forced padding: same update as a single micro-batch.
    batch = RolloutBatch(
        [TrainSequence(torch.arange(1, 6), torch.arange(6, 10), torch.zeros(4), 1.0)]
    )
    ts = build_policy_trainer(
        models["qwen2"], optimizer=SGD, train=TrainConfig(max_tokens_per_microbatch=100)
    )
    ref_metrics, ref_update = _update(ts, batch)
    ts = build_policy_trainer(
        models["qwen2"], optimizer=SGD, train=TrainConfig(max_tokens_per_microbatch=100)
    )
    original = ts._micro_batches

    def with_padding(b):
        from megatron_rpt.trainer.batch import make_micro_batch

        plan, mbs = original(b)
        pad = make_micro_batch(b, [], ts.train_cfg.micro_batch_layout)
        return plan, [pad, *mbs, pad]

    ts._micro_batches = with_padding
    metrics, update = _update(ts, batch)
    assert metrics.batch["micro_batches"] == 3
    assert metrics.loss == pytest.approx(ref_metrics.loss, abs=1e-7)
    assert metrics.train["num_tokens"] == ref_metrics.train["num_tokens"] == 4
    assert all(torch.allclose(update[k], ref_update[k], atol=1e-7) for k in update)


def test_configuration_errors(models, process_group):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel
    from megatron_rpt.loss.config import LossConfig
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.trainer.step import PolicyTrainer

    groups = initialize_model_parallel(1, 1)
    logits_model = build_pretrained(
        ModelConfig(hf_path=models["qwen2"], dtype="fp32"), ParallelConfig(), groups
    )
    kwargs = dict(optimizer=OptimizerConfig(), train=TrainConfig(), loss=LossConfig())
    with pytest.raises(ValueError, match="output='hidden'"):
        PolicyTrainer(logits_model, groups, temperature=1.0, **kwargs)
    with pytest.raises(ConfigError, match="rollout.temperature=0"):
        build_policy_trainer(models["qwen2"], temperature=0.0)
    # Sequence parallelism is a parallel.* setting and needs TP >= 2.
    from megatron_rpt.model.config import check_model_config, check_parallel_config

    with pytest.raises(ConfigError, match="tensor_model_parallel_size >= 2"):
        check_parallel_config(ParallelConfig(sequence_parallel=True))
    for key in ("sequence_parallel", "context_parallel_size"):
        with pytest.raises(ConfigError, match="parallel config"):
            check_model_config(ModelConfig(transformer_overrides={key: True}))


def test_from_run_config(models, process_group):
    from megatron_rpt.config import RPTConfig, resolve, validate
    from megatron_rpt.config_utils import apply_overrides
    from megatron_rpt.distributed import initialize_model_parallel
    from megatron_rpt.trainer.builders import build_policy_trainer as from_run_config
    from megatron_rpt.trainer.step import PolicyTrainer

    overrides = [
        f"model.hf_path={models['qwen2']}",
        "model.dtype=fp32",
        "rollout.temperature=0.8",
        "optimizer.lr=1e-5",
        "train.micro_batch_layout=padded",
    ]
    cfg = validate(apply_overrides(RPTConfig(), overrides))
    groups = initialize_model_parallel(1, 1)
    with pytest.raises(ConfigError, match="loss.tis=None .* resolve the config"):
        PolicyTrainer.from_config(
            groups, model=cfg.model, parallel=cfg.parallel, precision=cfg.precision,
            optimizer=cfg.optimizer, train=cfg.train, loss=cfg.loss, temperature=0.8,
        )  # fmt: skip
    ts = from_run_config(resolve(cfg), groups, resume=None)
    assert ts.temperature == 0.8 and ts.train_cfg.micro_batch_layout == "padded"
    assert ts.train_step(random_rollout_batch(VOCAB)).lr == 1e-5


def test_update_is_minus_the_gradient_of_the_documented_loss(models, process_group):
    """SGD at lr 1 updates by -grad; compare with autograd through the HF model of the loss
    -sum_t A_t * logp_t / N (on-policy PPO, token_mean): checks the scale, not only the sign."""
    from transformers import AutoModelForCausalLM

    from megatron_rpt.conversion.converter import WeightConverter

    batch = random_rollout_batch(VOCAB, seed=5)
    ts = build_policy_trainer(
        models["qwen2"],
        optimizer=SGD,
        train=TrainConfig(max_tokens_per_microbatch=24),
        temperature=TEMPERATURE,
    )
    _, update = _update(ts, batch)
    converter = WeightConverter(ts.built.arch, ts.built.vocab.padded)
    hf_update = {}
    for name, tensor in update.items():
        hf_update.update(dict(converter.megatron_to_hf(name, tensor)))

    model = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.float32)
    num_tokens = sum(s.response_ids.numel() for s in batch.sequences)
    loss = 0.0
    for seq in batch.sequences:
        tokens = torch.cat([seq.prompt_ids, seq.response_ids])[None]
        logp = torch.log_softmax(model(tokens).logits[0] / TEMPERATURE, dim=-1)
        p = seq.prompt_ids.numel()
        token_logp = logp[p - 1 : -1].gather(1, seq.response_ids[:, None])[:, 0]
        loss = loss - seq.advantage * token_logp.sum() / num_tokens
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(hf_update)
    scale = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        assert (hf_update[name] + grad).abs().max().item() <= 1e-5 * scale, name
