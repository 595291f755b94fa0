"""Weight sync in one process: the planner (names, shapes, buckets, determinism) for every tiny
architecture at TP=1/2 x PP=1/2, the executor at TP=1 against ``iter_hf_weights``, and full
syncs into the HF engine and through the SGLang adapter (fake server) with their checks.

TP/PP metadata is derived here from a TP=1 model the way Megatron lays it out (partitioned
dimension divided by TP; layers split evenly over stages; the last stage of a tied model owns
an ``output_layer.weight`` copy); tests/distributed/test_weight_sync.py runs the real layouts.
Expected HF names and shapes come from the safetensors headers written by ``transformers``.
"""

from __future__ import annotations

import pickle
import re

import pytest
import torch

from megatron_rpt.conversion.hf_io import HFWeights
from megatron_rpt.errors import CheckpointError, ConfigError
from megatron_rpt.model.arch import read_arch
from megatron_rpt.testing.tiny_models import KINDS, VOCAB, save_tiny_model
from megatron_rpt.weight_sync import WeightSyncConfig, WeightSyncError, make_plan
from megatron_rpt.weight_sync.plan import ParamMeta
from tests.helpers.faults import FaultyLink
from tests.helpers.updates import perturb_parameters

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_model(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def tp1_metas(tiny, groups):
    """TP=1 metadata per kind, from real Megatron models (initialised: TP attributes set)."""
    from megatron_rpt.model.build import build_model
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.weight_sync.gather import local_param_metadata

    out = {}
    for kind, hf_dir in tiny.items():
        arch = read_arch(hf_dir)
        built = build_model(arch, ModelConfig(dtype="fp32"), ParallelConfig(), groups)
        out[kind] = (arch, built.vocab.padded, local_param_metadata(built.chunks, 0))
    return out


def _layout(metas: list[ParamMeta], arch, tp: int, pp: int) -> list[list[ParamMeta]]:
    """Megatron's TP x PP metadata, derived from TP=1 / PP=1 metadata."""
    per_stage = arch.num_layers // pp
    stages: list[list[ParamMeta]] = [[] for _ in range(pp)]
    for m in metas:
        shape = list(m.local_shape)
        if m.partition_dim is not None:
            shape[m.partition_dim] //= tp
        layer = _LAYER.match(m.name)
        if layer:
            stage = int(layer.group(1)) // per_stage
        else:
            stage = 0 if m.name.startswith("embedding.") else pp - 1
        stages[stage].append(
            ParamMeta(m.name, tuple(shape), m.dtype, m.partition_dim, m.partition_stride, stage)
        )
    if arch.tie_word_embeddings and pp > 1:  # Megatron's copy of the embedding on the last stage
        emb = next(m for m in stages[0] if m.name == "embedding.word_embeddings.weight")
        stages[-1].append(
            ParamMeta("output_layer.weight", emb.local_shape, emb.dtype, 0, 1, pp - 1)
        )
    return stages


@pytest.mark.parametrize("kind", KINDS)
def test_plan_names_and_shapes_match_the_hf_checkpoint(kind, tiny, tp1_metas):
    arch, padded, metas = tp1_metas[kind]
    weights = HFWeights(tiny[kind])
    want = {n: weights.shape(n) for n in weights.names()}
    if arch.tie_word_embeddings:  # HF may or may not store the tied alias; it is never pushed
        want.pop("lm_head.weight", None)
    for tp, pp in LAYOUTS:
        plan = make_plan(
            _layout(metas, arch, tp, pp), arch, padded_vocab=padded, tp_size=tp, bucket_bytes=4096
        )
        got = [(o.name, o.shape) for o in plan.hf_tensors()]
        assert len(got) == len(want), (tp, pp)  # every HF tensor exactly once
        assert dict(got) == want, (tp, pp)
        assert all(o.dtype == torch.float32 for o in plan.hf_tensors())
        tied_copy = arch.tie_word_embeddings and pp > 1
        assert plan.skipped == (("output_layer.weight",) if tied_copy else ())
        tasks = [t for b in plan.buckets for t in b.tasks]
        assert all(t.full_shape == m.local_shape for t in tasks for m in metas if m.name == t.name)
        owners = {t.name: t.owner_pp_rank for t in tasks}
        assert owners["embedding.word_embeddings.weight"] == 0
        assert owners["decoder.final_layernorm.weight"] == pp - 1


def test_buckets_respect_the_limit_keep_order_and_are_maximal(tp1_metas):
    arch, padded, metas = tp1_metas["qwen2"]
    stages = _layout(metas, arch, 2, 2)
    order = [m.name for s in stages for m in s]
    sizes = {}
    for limit in (1, 5000, 20_000, 10**9):
        plan = make_plan(stages, arch, padded_vocab=padded, tp_size=2, bucket_bytes=limit)
        tasks = [t for b in plan.buckets for t in b.tasks]
        assert [t.name for t in tasks] == order  # plan order = stage order, model order
        for b, nxt in zip(plan.buckets, plan.buckets[1:] + (None,), strict=True):
            assert b.nbytes == sum(t.nbytes for t in b.tasks)
            assert b.nbytes <= limit or len(b.tasks) == 1  # oversized tensors travel alone
            if nxt is not None:  # greedy: the next task did not fit
                assert b.nbytes + nxt.tasks[0].nbytes > limit
        sizes[limit] = len(plan.buckets)
    assert sizes[1] == len(order) and sizes[10**9] == 1
    assert sizes[1] > sizes[5000] > sizes[20_000] > sizes[10**9]


def test_plan_is_deterministic_and_its_digest_sees_every_decision(tp1_metas):
    arch, padded, metas = tp1_metas["llama_tied"]
    stages = _layout(metas, arch, 2, 2)

    def plan(st=stages, **kw):
        args = dict(padded_vocab=padded, tp_size=2, bucket_bytes=8192) | kw
        return make_plan(st, arch, **args)

    a, b = plan(), plan(pickle.loads(pickle.dumps(stages)))  # as all_gather_object delivers it
    assert a == b and a.digest() == b.digest()
    assert plan(bucket_bytes=8193).digest() != a.digest()
    assert plan(push_dtype=torch.bfloat16).digest() != a.digest()
    assert plan(_layout(metas, arch, 2, 1)).digest() != a.digest()
    assert plan(push_dtype=torch.bfloat16).hf_bytes * 2 == a.hf_bytes


def test_planner_rejects_inconsistent_metadata(tp1_metas):
    arch, padded, metas = tp1_metas["llama"]
    stages = _layout(metas, arch, 1, 2)
    dup = stages[0][1]
    bad = ParamMeta(dup.name, (dup.local_shape[0] + 1, *dup.local_shape[1:]), dup.dtype,
                    dup.partition_dim, dup.partition_stride, 1)  # fmt: skip
    with pytest.raises(ValueError, match="differs between PP stages"):
        make_plan(
            [stages[0], [*stages[1], bad]], arch, padded_vocab=padded, tp_size=1, bucket_bytes=1
        )
    unknown = ParamMeta("decoder.layers.0.mystery.weight", (4,), torch.float32, None, 1, 0)
    with pytest.raises(CheckpointError, match="mystery"):
        make_plan([[unknown]], arch, padded_vocab=padded, tp_size=1, bucket_bytes=1)
    with pytest.raises(ValueError, match="bucket_bytes"):
        make_plan(stages, arch, padded_vocab=padded, tp_size=1, bucket_bytes=0)


def test_config_rules_name_the_field():
    from megatron_rpt.config import RPTConfig, validate
    from megatron_rpt.config_utils import apply_overrides

    assert RPTConfig().weight_sync.bucket_bytes == 512 * 2**20
    for override, field in [
        ("weight_sync.bucket_bytes=0", "bucket_bytes"),
        ("weight_sync.probe_tolerance=0", "probe_tolerance"),
        ("weight_sync.probe_new_tokens=0", "probe_new_tokens"),
    ]:
        with pytest.raises(ConfigError, match=f"weight_sync.{field}"):
            validate(apply_overrides(RPTConfig(), [override]))
    with pytest.raises(ConfigError, match="weight_sync.verify"):
        apply_overrides(RPTConfig(), ["weight_sync.verify=sometimes"])


# ----------------------------------------------------------------------------- execution, TP=1


def _pretrained(hf_dir, groups, dtype="fp32"):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    return build_pretrained(ModelConfig(hf_path=str(hf_dir), dtype=dtype), ParallelConfig(), groups)


@pytest.mark.parametrize("kind,dtype", [("qwen3", "fp32"), ("llama_tied", "bf16")])
def test_executor_at_tp1_equals_iter_hf_weights_bit_exactly(kind, dtype, tiny, groups):
    from megatron_rpt.conversion.converter import iter_hf_weights
    from megatron_rpt.weight_sync import build_plan
    from megatron_rpt.weight_sync.gather import iter_hf_buckets

    built = _pretrained(tiny[kind], groups, dtype)
    plan = build_plan(built, groups, WeightSyncConfig(bucket_bytes=30_000))
    assert len(plan.buckets) > 3
    got = [
        (n, t.clone())
        for b in iter_hf_buckets(plan, built.chunks, groups, built.arch, built.vocab.padded)
        for n, t in b.tensors
    ]
    ref = list(iter_hf_weights(built.chunks, built.arch, built.vocab.padded))
    assert [n for n, _ in got] == [n for n, _ in ref] == [o.name for o in plan.hf_tensors()]
    for (name, a), (_, b) in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def _hf_engine(hf_dir):
    from transformers import AutoModelForCausalLM

    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests.helpers.rollout_helpers import smollm2_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return HFEngine(model, smollm2_tokenizer())


def _engine_logits(engine, tokens):
    with torch.no_grad():
        return engine.model(tokens).logits.float()


FP32_PROBE = dict(probe_tolerance=1e-3)


def test_sync_into_hf_engine_then_logits_match_and_corruption_fails_loudly(tiny, groups):
    from megatron_rpt.model.logits import forward_logits
    from megatron_rpt.weight_sync import WeightSync

    built = _pretrained(tiny["qwen2"], groups)
    engine = _hf_engine(tiny["qwen2"])
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    assert perturb_parameters(built.chunks, built.arch, built.vocab.padded, 0, 1) > 0
    link = FaultyLink()
    sync = WeightSync(
        built, groups, engine, WeightSyncConfig(bucket_bytes=50_000, verify="full", **FP32_PROBE),
        bucket_filter=link,
    )
    m = sync(version=1)
    assert engine.weight_version == 1 and m.pushed and m.buckets == len(sync.plan.buckets) > 1
    assert m.bytes == sync.plan.hf_bytes and m.checked_tensors == len(before)
    assert m.probe_max_abs_diff is not None and m.probe_max_abs_diff < 1e-4
    for n, p in engine.model.named_parameters():
        assert not torch.equal(p, before[n]), n  # the update changed every tensor
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    diff = (_engine_logits(engine, tokens) - forward_logits(built, tokens, groups)).abs().max()
    assert diff <= 1e-4

    # One element one ulp off in bucket 2: invisible to the probe, caught by full fingerprints.
    with link.corrupting(2):
        with pytest.raises(WeightSyncError, match=r"1 of \d+ tensors differ.*'model\.") as err:
            sync(version=2)
    assert "rank 0" in str(err.value)
    sync.cfg = WeightSyncConfig(bucket_bytes=50_000, verify="probe", **FP32_PROBE)
    with link.corrupting(2):
        sync(version=3)  # the probe alone does not see it
    with link.corrupting(1, everything=True):
        with pytest.raises(WeightSyncError, match="probe: engine and trainer log-probs differ"):
            sync(version=4)
    sync(version=5)  # a clean sync repairs the engine
    assert (
        _engine_logits(engine, tokens) - forward_logits(built, tokens, groups)
    ).abs().max() <= 1e-4


def test_engine_failure_and_coverage_gaps_are_sync_errors(tiny, groups):
    from megatron_rpt.weight_sync import WeightSync

    qwen2 = _pretrained(tiny["qwen2"], groups)
    engine = _hf_engine(tiny["llama"])  # no slot for Qwen2's QKV biases
    sync = WeightSync(qwen2, groups, engine, WeightSyncConfig(bucket_bytes=20_000))
    with pytest.raises(WeightSyncError, match=r"update_weights raised InputError.*q_proj\.bias"):
        sync(version=1)
    assert not engine.health()  # half-updated engines refuse to serve
    built = _pretrained(tiny["llama"], groups)
    engine = _hf_engine(tiny["llama"])
    with torch.no_grad():
        engine.model.model.layers[0].register_parameter("extra", torch.nn.Parameter(torch.ones(2)))
    sync = WeightSync(built, groups, engine, WeightSyncConfig(verify="none"))
    with pytest.raises(WeightSyncError, match=r"not in the weight stream.*layers\.0\.extra"):
        sync(version=2)


def test_bf16_push_dtype_rounds_like_the_engine_would(tiny, groups):
    from megatron_rpt.weight_sync import WeightSync

    built = _pretrained(tiny["llama"], groups)
    engine = _hf_engine(tiny["llama"])
    cfg = WeightSyncConfig(dtype="bf16", verify="checksum", checksum_rows=4)
    m = WeightSync(built, groups, engine, cfg)(version=1)
    assert m.bytes * 2 == WeightSync(built, groups, engine).plan.hf_bytes
    emb = dict(engine.model.named_parameters())["model.embed_tokens.weight"]
    ref = built.chunks[0].embedding.word_embeddings.weight[:VOCAB]
    assert torch.equal(emb, ref.bfloat16().float()) and not torch.equal(emb, ref)


def test_sync_through_the_sglang_adapter(tiny, groups):
    from tests.helpers.rollout_helpers import require_sglang_protocol

    require_sglang_protocol()
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine, hf_manifest
    from megatron_rpt.weight_sync import WeightSync
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    built = _pretrained(tiny["qwen3"], groups)
    perturb_parameters(built.chunks, built.arch, built.vocab.padded, 0, 1, seed=7)
    backend = _hf_engine(tiny["qwen3"])
    rollout = RolloutConfig(engine="sglang")
    rollout.sglang.bucket_bytes = 40_000  # <= weight_sync.bucket_bytes (push.py docstring)
    rollout.sglang.launch_timeout_s = 20
    with FakeSGLangServer(backend) as server:
        client = SGLangEngine.connect(server.url, rollout, manifest=hf_manifest(tiny["qwen3"]))
        client.release_memory()  # colocated flow: the server zeroes its weights
        cfg = WeightSyncConfig(bucket_bytes=60_000, verify="full", **FP32_PROBE)
        link = FaultyLink()
        sync = WeightSync(built, groups, client, cfg, bucket_filter=link)
        m = sync(version=4)
        assert server.paths().count("/update_weights_from_tensor") > 1 and m.buckets > 1
        assert server.version == "4" and m.probe_max_abs_diff < 1e-4
        with link.corrupting(0):
            with pytest.raises(WeightSyncError, match="differ between the trainer's stream"):
                sync(version=5)
        client.shutdown()
