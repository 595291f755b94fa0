"""Weight sync from a TP=2 / PP=2 (and virtual PP) Megatron model into the HF engine on rank 0
(gloo, 2 processes), after an update that changed every weight.

Two spawned runs share the work (each spawn costs ~5 s of imports per rank). Each run builds
the model from an HF folder, perturbs every parameter with layout-independent noise
(``tests.helpers.updates``), syncs with full fingerprints + the probe, and returns the trainer's and
the engine's logits and the engine's tensors; it then rebuilds the model at TP=1/PP=1 in the
same processes, applies the same noise and exports it with ``iter_hf_weights`` as the
single-process reference. The TP=2 run also checks that a bucket is freed before the next is
gathered, that a corrupted bucket fails on every rank, and that an engine crash mid-stream
neither hangs the peers nor goes unreported.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from megatron_rpt.conversion.hf_io import HFWeights
from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

LOGITS_TOL = 1e-4


def _setup(tp, pp, vpp=None):
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel

    groups = initialize_model_parallel(tp, pp, vpp)
    seed_model_parallel(0, groups)
    return groups


def _built(hf_dir, groups, dtype="fp32"):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    parallel = ParallelConfig(
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        virtual_pipeline_model_parallel_size=groups.vpp_size,
    )
    return build_pretrained(ModelConfig(hf_path=hf_dir, dtype=dtype), parallel, groups)


def _perturb(built, groups):
    from tests.helpers.updates import perturb_parameters

    perturb_parameters(built.chunks, built.arch, built.vocab.padded, groups.tp_rank, groups.tp_size)


def _hf_engine(hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.rollout.hf_engine import HFEngine

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return HFEngine(model, AutoTokenizer.from_pretrained(smollm2_dir()))


def _cfg(**kw):
    from megatron_rpt.weight_sync import WeightSyncConfig

    return WeightSyncConfig(
        **({"bucket_bytes": 50_000, "verify": "full", "probe_tolerance": 1e-3} | kw)
    )


def _sync_and_compare(rank, hf_dir, groups, tokens, link=None):
    """Perturb, sync, and collect what the parent compares (engine parts on rank 0 only);
    ``link``: the sync's bucket filter (tests.helpers.faults.FaultyLink)."""
    from megatron_rpt.model.logits import forward_logits
    from megatron_rpt.weight_sync import WeightSync

    built = _built(hf_dir, groups)
    engine = _hf_engine(hf_dir) if rank == 0 else None
    before = (
        None if engine is None else {n: p.clone() for n, p in engine.model.state_dict().items()}
    )
    _perturb(built, groups)
    sync = WeightSync(built, groups, engine, _cfg(), bucket_filter=link)
    metrics = sync(version=1)
    out = {
        "metrics": metrics,
        "plan": [(o.name, o.shape) for o in sync.plan.hf_tensors()],
        "skipped": sync.plan.skipped,
        "trainer_logits": forward_logits(built, torch.from_numpy(tokens), groups),
    }
    if engine is not None:
        out.update(_engine_outputs(engine, before, tokens))
    return out, built, sync


def _engine_outputs(engine, before, tokens):
    """The engine's tensors, those equal to ``before`` (none after a full sync), its logits."""
    state = {n: p.clone() for n, p in engine.model.state_dict().items()}
    with torch.no_grad():
        logits = engine.model(torch.from_numpy(tokens)).logits.float()
    unchanged = [n for n in state if torch.equal(state[n], before[n])]
    return {"unchanged": unchanged, "engine_state": state, "engine_logits": logits}


def _tp1_export(hf_dir, dtype="fp32"):
    """The single-process reference: TP=1/PP=1, same noise, ``iter_hf_weights``."""
    from megatron_rpt.conversion.converter import iter_hf_weights

    groups = _setup(1, 1)
    built = _built(hf_dir, groups, dtype)
    _perturb(built, groups)
    return {n: t.clone() for n, t in iter_hf_weights(built.chunks, built.arch, built.vocab.padded)}


def _freed_before_next(plan, built, groups):
    """True when no storage of bucket i is alive once bucket i + 1 has been gathered.

    Replicated tensors (norms) are views of the parameters themselves and are left out.
    """
    from megatron_rpt.weight_sync.gather import iter_hf_buckets

    params = {p.untyped_storage().data_ptr() for c in built.chunks for p in c.parameters()}
    alive_after_next = tracked = 0
    previous: list[weakref.ref] = []
    for bucket in iter_hf_buckets(plan, built.chunks, groups, built.arch, built.vocab.padded):
        alive_after_next += sum(ref() is not None for ref in previous)
        storages = [t.untyped_storage() for _, t in bucket.tensors]
        previous = [weakref.ref(s) for s in storages if s.data_ptr() not in params]
        tracked += len(previous)
        del bucket, storages
    return alive_after_next == 0 and tracked > 10 and len(plan.buckets) > 3


class _CrashingEngine:
    """Delegates to an engine but dies after reading a few tensors of the stream (or a few
    buckets of per-rank payloads)."""

    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def update_weights(self, named_tensors, *, version, flush_cache=True):
        for i, _ in enumerate(named_tensors):
            if i == self.after:
                raise RuntimeError("simulated engine crash")

    update_weights_from_ranks = update_weights

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _expect_sync_error(fn):
    from megatron_rpt.weight_sync import WeightSyncError

    try:
        fn()
    except WeightSyncError as exc:
        return str(exc)
    return None


def _tp2_run(rank, world_size, dirs, tokens):
    from megatron_rpt.weight_sync import WeightSync
    from tests.helpers.faults import FaultyLink

    groups = _setup(2, 1)
    res = {}
    link = FaultyLink()
    for kind, hf_dir in dirs.items():
        res[kind], built, sync = _sync_and_compare(rank, hf_dir, groups, tokens, link)
    res["freed"] = _freed_before_next(sync.plan, built, groups)
    with link.corrupting(3):
        res["corrupt"] = _expect_sync_error(lambda: sync(version=2))
    crashing = None if sync.engine is None else _CrashingEngine(sync.engine, after=5)
    crash = WeightSync(built, groups, crashing, _cfg(verify="probe"))
    res["crash"] = _expect_sync_error(lambda: crash(version=3))
    res["after_crash"] = sync(version=4).probe_max_abs_diff  # still in lockstep afterwards
    res["bf16"] = _bf16_sync(rank, dirs["qwen2"], groups)
    for kind, hf_dir in dirs.items():  # collective (group creation): every rank takes part
        reference = _tp1_export(hf_dir)
        res[kind]["reference"] = reference if rank == 0 else None
    reference = _tp1_export(dirs["qwen2"], "bf16")
    res["bf16"]["reference"] = reference if rank == 0 else None
    return res


def _bf16_sync(rank, hf_dir, groups):
    """The training dtype: a bf16 (Float16Module) model at TP=2 into an fp32 engine."""
    from megatron_rpt.weight_sync import WeightSync

    built = _built(hf_dir, groups, "bf16")
    _perturb(built, groups)
    engine = _hf_engine(hf_dir) if rank == 0 else None
    metrics = WeightSync(built, groups, engine, _cfg(probe_tolerance=0.05))(version=1)
    state = None if engine is None else {n: p.clone() for n, p in engine.model.state_dict().items()}
    return {"metrics": metrics, "engine_state": state}


def _pp2_run(rank, world_size, dirs, deep_dir, tokens):
    groups = _setup(1, 2)
    res = {}
    for kind, hf_dir in dirs.items():
        res[kind] = _sync_and_compare(rank, hf_dir, groups, tokens)[0]
    groups = _setup(1, 2, 2)  # virtual pipeline: two chunks per rank, layers interleaved
    res["vpp"] = _sync_and_compare(rank, deep_dir, groups, np.concatenate([tokens, tokens]))[0]
    for kind, hf_dir in {**dirs, "vpp": deep_dir}.items():
        reference = _tp1_export(hf_dir)
        res[kind]["reference"] = reference if rank == 0 else None
    res["dp2"] = _dp2_sync(rank, deep_dir)
    return res


def _dp2_sync(rank, hf_dir):
    """TP=1 PP=1 DP=2, engine on rank 0: the other replica has nothing to gather."""
    from megatron_rpt.weight_sync import WeightSync

    groups = _setup(1, 1)
    built = _built(hf_dir, groups)
    _perturb(built, groups)
    engine = _hf_engine(hf_dir) if rank == 0 else None
    return WeightSync(built, groups, engine, _cfg())(version=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {k: str(save_tiny_model(k, root / k)) for k in ("qwen2", "llama_tied", "qwen3")}
    deep = str(save_tiny_model("llama", root / "deep", num_layers=4))
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(11))
    return dirs, deep, tokens.numpy()


def _check_sync(kind, kind_res_0, kind_res_last, hf_dir):
    """Engine == trainer (logits) == single-process export (tensors), every tensor updated."""
    m = kind_res_0["metrics"]
    assert m.pushed and m.buckets > 1 and m.checked_tensors == len(kind_res_0["plan"])
    assert m.probe_max_abs_diff is not None and m.probe_max_abs_diff < 1e-4
    assert kind_res_0["unchanged"] == []
    weights = HFWeights(hf_dir)
    want = {n: weights.shape(n) for n in weights.names()}
    if kind.endswith("_tied"):
        want.pop("lm_head.weight", None)
    assert dict(kind_res_0["plan"]) == want
    diff = (kind_res_0["engine_logits"] - kind_res_last["trainer_logits"]).abs().max().item()
    assert diff <= LOGITS_TOL
    ref, state = kind_res_0["reference"], kind_res_0["engine_state"]
    for name, tensor in ref.items():
        assert torch.equal(state[name], tensor), name  # bit-exact
    assert set(state) - set(ref) <= {"lm_head.weight"}  # only the tied alias is not streamed


def test_tp2_sync_into_hf_engine(models):
    dirs, _, tokens = models
    dirs = {k: dirs[k] for k in ("qwen2", "llama_tied")}
    r0, r1 = run_distributed(_tp2_run, 2, args=(dirs, tokens), timeout=300)
    for kind in dirs:
        _check_sync(kind, r0[kind], r1[kind], dirs[kind])
        assert not r1[kind]["metrics"].pushed and r1[kind]["metrics"].bytes == 0
        assert torch.equal(r0[kind]["trainer_logits"], r1[kind]["trainer_logits"])
    assert r0["freed"] and r1["freed"]  # extra memory: one bucket at a time
    for r in (r0, r1):  # every rank raises, naming the rank that saw the mismatch
        assert r["corrupt"] and "rank 0: 1 of" in r["corrupt"] and "differ" in r["corrupt"]
        assert r["crash"] and "simulated engine crash" in r["crash"]
    assert r0["after_crash"] < 1e-4
    bf16 = r0["bf16"]
    assert bf16["metrics"].checked_tensors == len(bf16["reference"]) and bf16["metrics"].buckets
    for name, tensor in bf16["reference"].items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(bf16["engine_state"][name], tensor.float()), name


def test_pp2_and_virtual_pp_sync_into_hf_engine(models):
    dirs, deep, tokens = models
    dirs = {k: dirs[k] for k in ("llama_tied", "qwen3")}
    r0, r1 = run_distributed(_pp2_run, 2, args=(dirs, deep, tokens), timeout=300)
    for kind in (*dirs, "vpp"):
        hf_dir = dirs.get(kind, deep)
        assert r0[kind]["trainer_logits"] is None  # logits live on the last stage
        _check_sync(kind, r0[kind], r1[kind], hf_dir)
    # The last stage's copy of the tied embedding is never pushed (nor gathered).
    assert r0["llama_tied"]["skipped"] == ("output_layer.weight",)
    assert r0["qwen3"]["skipped"] == ()
    assert r0["dp2"].pushed and r0["dp2"].probe_max_abs_diff < 1e-4 and r0["dp2"].checked_tensors
    assert not r1["dp2"].pushed and r1["dp2"].buckets == 0 and r1["dp2"].gather_seconds == 0
