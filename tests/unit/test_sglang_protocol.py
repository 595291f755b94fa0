"""SGLang payloads built from sglang's own classes, response parsing, and the client's flows.

Needs sglang importable (CI installs it --no-deps, see the Makefile); skipped only when sglang
is not installed at all. Request bodies are validated exactly as sglang's HTTP routes validate
them: pydantic ``TypeAdapter`` over the route's declared class.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megatron_rpt.rollout.types import SamplingParams
from tests.helpers.rollout_helpers import require_sglang_protocol, smollm2_tokenizer, tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _sglang():
    require_sglang_protocol()


def _validate(cls, body: dict):  # noqa: ANN001, ANN202
    from pydantic import TypeAdapter

    return TypeAdapter(cls).validate_python(json.loads(json.dumps(body)))


def _weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(5, 3, generator=g)),
        ("b.weight", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("c.weight", torch.randn(2, 2, 2, generator=g)),
        ("d.weight", torch.randn(3, generator=g).to(torch.float16)),
        ("e.weight", torch.tensor([float("nan"), -0.0, float("inf")])),
    ]


def test_flattened_buckets_round_trip_bit_exact():
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

    from megatron_rpt.rollout import sglang_protocol as proto

    sent = _weights()
    received = {}
    buckets = list(proto.iter_dtype_buckets(sent, bucket_bytes=64))
    assert all(len({t.dtype for _, t in b}) == 1 for b in buckets)
    for group in buckets:
        bucket = proto.flatten_bucket(group)
        body = proto.tensor_bucket_request(bucket, tp_size=2, flush_cache=False, weight_version="4")
        req = _validate(UpdateWeightsFromTensorReqInput, body)
        assert req.load_format == "flattened_bucket" and req.weight_version == "4"
        assert len(req.serialized_named_tensors) == 2  # one entry per engine TP rank
        assert isinstance(req.serialized_named_tensors[0], bytes)  # base64 decoded by the schema
        received.update(proto.decode_tensor_bucket(req.serialized_named_tensors[1]))
    assert set(received) == {n for n, _ in sent}
    for name, t in sent:
        got = received[name]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8)), name  # bitwise


def test_bucket_never_aliases_the_source_tensor():
    from megatron_rpt.rollout import sglang_protocol as proto

    src = torch.ones(4)
    bucket = proto.flatten_bucket([("x", src)])
    src.add_(1)  # the trainer moving on must not change what was handed to the engine
    assert torch.equal(bucket.get_flattened_tensor().view(torch.float32), torch.ones(4))


def test_generate_request_validates_and_expands_seeded_samples():
    from sglang.srt.managers.io_struct import GenerateReqInput

    from megatron_rpt.rollout import sglang_protocol as proto
    from megatron_rpt.rollout.stopping import final_box_stop_regex

    rx = final_box_stop_regex()
    prompts = [[1, 2, 3], [4, 5]]
    body = proto.generate_request(prompts, SamplingParams(n=8, stop_at_final_box=True, stop_token_ids=(9,)), box_regex=rx)
    req = _validate(GenerateReqInput, body)
    assert req.input_ids == prompts and req.return_logprob is True
    sp = req.sampling_params
    assert sp["n"] == 8 and sp["temperature"] == 0.8 and sp["stop_regex"] == [rx]
    assert sp["no_stop_trim"] is True and sp["stop_token_ids"] == [9]

    seeded = proto.generate_request(prompts, SamplingParams(n=3, seed=11), box_regex=rx)
    req = _validate(GenerateReqInput, seeded)
    assert req.input_ids == [[1, 2, 3]] * 3 + [[4, 5]] * 3
    seeds = [p["sampling_seed"] for p in req.sampling_params]
    assert len(set(seeds)) == 6 and all(p["n"] == 1 for p in req.sampling_params)
    assert seeds == [p["sampling_seed"] for p in proto.generate_request(prompts, SamplingParams(n=3, seed=11))["sampling_params"]]


def test_sglang_sampling_params_reject_bad_values():
    from megatron_rpt.rollout import sglang_protocol as proto

    class Bad:  # bypasses our own validation to reach sglang's verify()
        temperature, top_p, top_k, max_new_tokens = 0.8, 1.0, -5, 4
        stop_token_ids, stop_at_final_box, n, seed = (), False, 1, None

    with pytest.raises(ValueError, match="top_k"):
        proto.sampling_params_dict(Bad, box_regex=None)  # type: ignore[arg-type]


def _item(ids, lps, finish, cached=3):  # noqa: ANN001, ANN202
    return {
        "text": "t",
        "output_ids": ids,
        "meta_info": {
            "finish_reason": finish, "prompt_tokens": 5, "cached_tokens": cached,
            "output_token_logprobs": [[lp, i, None] for lp, i in zip(lps, ids if len(lps) == len(ids) else ids + [2], strict=False)],
        },
    }  # fmt: skip


def test_parse_generate_response():
    from megatron_rpt.rollout import sglang_protocol as proto

    rx = "REGEX"
    items = [
        _item([7, 8], [-0.5, -1.0], {"type": "stop", "matched": 2}),
        _item([7, 9], [-0.5, -2.0], {"type": "length", "length": 2}),
        _item([3], [-0.1], {"type": "stop", "matched": rx}),
        _item([4], [-0.2], {"type": "abort", "message": "x"}),
    ]
    groups = proto.parse_generate_response(items, num_prompts=2, n=2, box_regex=rx)
    assert [[c.finish_reason for c in g] for g in groups] == [["stop", "length"], ["box", "abort"]]
    assert groups[0][0].logprobs == [-0.5, -1.0] and groups[0][0].cached_tokens == 3
    trimmed = _item([7], [-0.5, -0.7], {"type": "stop", "matched": 2})  # stop token trimmed from ids
    c = proto.parse_completion(trimmed)
    assert c.token_ids == [7, 2] and len(c.logprobs) == 2
    with pytest.raises(ValueError, match="disagree"):
        proto.parse_completion(_item([7, 8], [-0.5], {"type": "length"}))
    with pytest.raises(ValueError, match="outputs"):
        proto.parse_generate_response(items, num_prompts=3, n=2)


def test_control_payloads_validate():
    from sglang.srt.managers import io_struct as io

    from megatron_rpt.rollout import sglang_protocol as proto

    req = _validate(io.ReleaseMemoryOccupationReqInput, proto.memory_request(["weights", "kv_cache"], resume=False))
    assert req.tags == ["weights", "kv_cache"]
    assert _validate(io.ResumeMemoryOccupationReqInput, proto.memory_request(["weights"], resume=True)).tags == ["weights"]
    with pytest.raises(ValueError, match="memory tags"):
        proto.memory_request(["activations"], resume=True)
    init = _validate(io.InitWeightsUpdateGroupReqInput, proto.init_group_request(
        master_address="127.0.0.1", master_port=29600, rank_offset=1, world_size=3, group_name="g"))  # fmt: skip
    assert (init.world_size, init.rank_offset, init.backend) == (3, 1, "nccl")
    upd = _validate(io.UpdateWeightsFromDistributedReqInput, proto.distributed_update_request(
        _weights()[:2], group_name="g", flush_cache=False, weight_version="2"))  # fmt: skip
    assert upd.dtypes == ["float32", "bfloat16"] and upd.shapes == [[5, 3], [7]]
    assert all(hasattr(torch, d) for d in upd.dtypes)  # the server does getattr(torch, dtype)
    assert _validate(io.GetWeightsByNameReqInput, proto.get_weights_request("w", 1)).truncate_size == 1
    assert _validate(io.UpdateWeightVersionReqInput, proto.weight_version_request(7)).new_version == "7"


def test_server_argv_parses_with_sglang_and_binds_loopback(tmp_path):
    from megatron_rpt.rollout import sglang_protocol as proto
    from megatron_rpt.rollout.config import SGLangServerConfig

    tok = smollm2_tokenizer()
    tiny_llama(tok).save_pretrained(tmp_path)
    s = SGLangServerConfig(extra_args={"attention_backend": "triton", "disable-radix-cache": False})
    argv = proto.server_argv(
        str(tmp_path), host=s.host, port=31001, tp_size=2, mem_fraction_static=0.5, dtype="float32",
        colocated=True, enable_weights_cpu_backup=True, deterministic_inference=False, seed=3,
        extra_args=s.extra_args,
    )  # fmt: skip
    root = logging.getLogger()
    marker = logging.NullHandler()
    root.addHandler(marker)
    level = root.level
    try:
        args = proto.check_server_argv(argv)
        # sglang's prepare_server_args forces basicConfig; the trainer's handlers survive it
        assert marker in root.handlers and root.level == level
    finally:
        root.removeHandler(marker)
    assert args.host == "127.0.0.1" and args.port == 31001 and args.tp_size == 2
    assert args.enable_memory_saver and args.enable_weights_cpu_backup
    assert args.attention_backend == "triton" and not args.disable_radix_cache
    with pytest.raises(SystemExit):
        proto.check_server_argv(argv + ["--no-such-flag"])


def test_server_argv_fp32_backend_and_base_gpu_id(tmp_path):
    """fp32 servers get an attention backend that accepts fp32 (SGLang's defaults do not);
    an explicit backend wins; --base-gpu-id places a disaggregated server."""
    from megatron_rpt.rollout import sglang_protocol as proto

    tok = smollm2_tokenizer()
    tiny_llama(tok).save_pretrained(tmp_path)

    def argv(dtype: str, extra: dict, base: int | None = None) -> list[str]:
        return proto.server_argv(
            str(tmp_path), host="127.0.0.1", port=31002, tp_size=1, mem_fraction_static=0.5,
            dtype=dtype, colocated=False, enable_weights_cpu_backup=False,
            deterministic_inference=False, seed=0, extra_args=extra, base_gpu_id=base,
        )  # fmt: skip

    assert proto.check_server_argv(argv("float32", {})).attention_backend == "triton"
    assert "--attention-backend" not in argv("bfloat16", {})
    assert proto.check_server_argv(argv("float32", {"attention_backend": "torch_native"})).attention_backend == "torch_native"
    assert proto.check_server_argv(argv("bfloat16", {}, base=4)).base_gpu_id == 4


def _client(server, **overrides):  # noqa: ANN001, ANN202
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.launch_timeout_s = 20
    for k, v in overrides.items():
        setattr(cfg.sglang, k, v)
    return SGLangEngine.connect(server.url, cfg)


def test_colocated_flow_order_buckets_and_ipc_reclaim(monkeypatch):
    """The push never depends on /get_weights_by_name (Qwen2/Qwen3 answer 400 there): the fake
    answers like a Qwen server, and the sync still completes and loads every tensor."""
    from megatron_rpt.rollout import sglang_protocol as proto
    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    state = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    reclaims = []
    monkeypatch.setattr(proto, "reclaim_ipc_memory", lambda: reclaims.append(len(server.calls)))
    with FakeSGLangServer(HFEngine(model, tok), tp_size=2, weights_by_name=False) as server:
        engine = _client(server, tp_size=2, bucket_bytes=2_000_000, max_unfenced_buckets=2)
        engine.release_memory()
        assert server.released == {"weights", "kv_cache", "cuda_graph"}
        with pytest.raises(RuntimeError, match="released"):
            engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2))
        server.calls.clear()
        engine.update_weights(iter(state), version=9)
        paths = server.paths()
        pushes = paths.count("/update_weights_from_tensor")
        assert pushes >= 3  # 2 MB buckets: the 12.6 MB embedding and lm_head travel alone
        assert "/get_weights_by_name" not in paths
        assert paths[0] == "/resume_memory_occupation" and server.calls[0][1]["tags"] == ["weights"]
        # the release zeroed the served model; equality below proves the push loaded it
        resume = "/resume_memory_occupation"
        assert paths[-4:] == ["/update_weight_version", resume, resume, "/flush_cache"]
        assert [c[1]["tags"] for c in server.calls[-3:-1]] == [["kv_cache"], ["cuda_graph"]]
        assert not server.released
        # memory reclaimed every max_unfenced_buckets pushes, and once after the last push
        assert len(reclaims) == pushes // 2 + 1
        assert reclaims[-1] == paths.index("/update_weight_version")
        assert server.version == "9" and engine.weight_version == 9
        for name, t in state:
            assert torch.equal(dict(model.named_parameters())[name], t), name
        out = engine.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=3, seed=0))
        assert out[0][0].meta["weight_version"] == "9"
        engine.shutdown()


def test_per_rank_payloads_reach_each_tp_rank_with_a_fence_per_bucket(monkeypatch):
    """update_weights_from_ranks: every TP rank's own serialized buckets in one request per
    dtype group (built separately, as on two GPUs), a fence after each bucket, then the
    resume of the KV cache and CUDA graphs."""
    from megatron_rpt.rollout import sglang_protocol as proto
    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    state = [(n, p.detach().clone() + 1) for n, p in model.named_parameters()]
    halves = [state[: len(state) // 2], state[len(state) // 2 :]]

    def payloads(bucket):  # noqa: ANN001, ANN202 - one rank's payload from its own copies
        keep, serialized = proto.rank_bucket_payload([(n, t.clone()) for n, t in bucket], 2_000_000)
        kept.append(keep)
        return serialized

    kept: list = []
    from sglang.srt.managers import io_struct as io

    body = proto.per_rank_tensor_request(
        [payloads(halves[0])[0], payloads(halves[0])[0]], flush_cache=False, weight_version=None
    )
    req = _validate(io.UpdateWeightsFromTensorReqInput, body)  # as the HTTP route parses it
    assert len(req.serialized_named_tensors) == 2 and req.load_format == "flattened_bucket"
    reclaims = []
    monkeypatch.setattr(proto, "reclaim_ipc_memory", lambda: reclaims.append(len(server.calls)))
    with FakeSGLangServer(HFEngine(model, tok), tp_size=2, weights_by_name=False) as server:
        engine = _client(server, tp_size=2)
        engine.release_memory()
        server.calls.clear()
        engine.update_weights_from_ranks(
            ([payloads(b), payloads(b)] for b in halves), version=5
        )
        paths = server.paths()
        assert server.rank_entries and set(server.rank_entries) == {2}  # a distinct entry per rank
        assert "/get_weights_by_name" not in paths
        # IPC memory reclaimed after each bucket's request has been answered
        assert len(reclaims) == 2 and paths[reclaims[0] - 1] == "/update_weights_from_tensor"
        assert not server.released and engine.weight_version == 5
        for name, t in state:
            assert torch.equal(dict(model.named_parameters())[name], t), name
        with pytest.raises(ValueError, match="3 payloads for 2"):
            engine.update_weights_from_ranks([[payloads(halves[0])] * 3], version=6)
        bad = [(n, t * 2) for n, t in halves[0]]
        with pytest.raises(RuntimeError, match="different tensors"):
            engine.update_weights_from_ranks([[payloads(halves[0]), payloads(bad)]], version=7)
        engine.shutdown()


def test_weight_checksums_refused_for_models_without_the_route():
    """Qwen2/Qwen3 in SGLang cannot read weights back: a clear error, not an HTTP 400."""
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.sglang_engine import SGLangEngine
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    with FakeSGLangServer(HFEngine(model, tok), weights_by_name=False) as server:
        cfg = RolloutConfig(engine="sglang")
        for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            engine = SGLangEngine.connect(server.url, cfg, architecture=arch)
            with pytest.raises(NotImplementedError, match=f"{arch} has no get_weights_by_name.*verify=probe"):
                engine.weight_checksums(["model.norm.weight"])
        llama = SGLangEngine.connect(server.url, cfg, architecture="LlamaForCausalLM")
        server.weights_by_name = True
        assert set(llama.weight_checksums(["model.norm.weight"])) == {"model.norm.weight"}


def test_device_uuid_reductions_are_scoped():
    """The producer patch applies only while buckets are serialized: CPU tensors still pickle
    through torch's reducer, and the reducers are restored afterwards."""
    from multiprocessing.reduction import ForkingPickler

    from sglang.srt.utils import MultiprocessingSerializer
    from torch.multiprocessing import reductions

    from megatron_rpt.rollout import sglang_protocol as proto

    before = dict(ForkingPickler._extra_reducers)
    assert before.get(torch.Tensor) is reductions.reduce_tensor
    with proto.device_uuid_reductions():
        assert ForkingPickler._extra_reducers[torch.Tensor] is not reductions.reduce_tensor
        blob = MultiprocessingSerializer.serialize({"t": torch.arange(3.0)}, output_str=True)
    assert dict(ForkingPickler._extra_reducers) == before
    assert torch.equal(MultiprocessingSerializer.deserialize(blob)["t"], torch.arange(3.0))


def test_failed_push_blocks_generation_until_repaired():
    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    with FakeSGLangServer(HFEngine(model, tok)) as server:
        engine = _client(server)  # no manifest: the server is the one to reject
        with pytest.raises(RuntimeError, match="unknown tensor"):
            engine.update_weights([("model.bogus.weight", torch.zeros(3))], version=1)
        with pytest.raises(RuntimeError, match="update_weights"):
            engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2))
        engine.update_weights(model.named_parameters(), version=2)
        assert engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2, seed=1))[0][0].token_ids


def test_launch_on_cpu_fails_clearly():
    from megatron_rpt.capabilities import have_cuda
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    if have_cuda():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        SGLangEngine.launch(RolloutConfig(engine="sglang"), "embedded:smollm2")


def test_launch_from_weightless_folder_needs_no_safetensors(tmp_path, monkeypatch):
    """load-format dummy: a folder with only config.json reaches the server launch (no
    manifest), and a blockwise FP8 Llama folder is refused before any server starts."""
    import json
    import subprocess

    from megatron_rpt.errors import ConfigError
    from megatron_rpt.rollout import sglang_engine
    from megatron_rpt.rollout.config import RolloutConfig

    tok = smollm2_tokenizer()
    config = tiny_llama(tok).config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)  # config only: what a Megatron-checkpoint start provides
    launched = {}

    def fake_init(self, url, cfg, *, process=None, argv=(), manifest=None, architecture=None):  # noqa: ANN001
        launched.update(argv=list(argv), manifest=manifest, architecture=architecture)
        raise RuntimeError("stop before spawning")

    monkeypatch.setattr("megatron_rpt.capabilities.have_cuda", lambda: True)
    monkeypatch.setattr(sglang_engine.SGLangEngine, "__init__", fake_init)
    monkeypatch.setattr(sglang_engine, "_spawn", lambda argv: subprocess.Popen(["true"]))
    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.extra_args = {"load-format": "dummy"}
    with pytest.raises(RuntimeError, match="stop before spawning"):
        sglang_engine.SGLangEngine.launch(cfg, str(tmp_path))
    assert launched["manifest"] is None and launched["architecture"] == "LlamaForCausalLM"
    assert "dummy" in launched["argv"]

    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM loader.*sgl-project/sglang#30234"):
        sglang_engine.SGLangEngine.launch(cfg, str(tmp_path))


def test_fp8_stream_into_llama_refused_qwen_allowed():
    """The push refuses weight_scale_inv names for a model whose SGLang loader drops them."""
    from megatron_rpt.errors import ConfigError
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.sglang_engine import _refuse_block_fp8
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        _refuse_block_fp8("LlamaForCausalLM", "x")
    _refuse_block_fp8("Qwen2ForCausalLM", "x")  # Qwen loaders keep weight_scale_inv
    _refuse_block_fp8("Qwen3ForCausalLM", "x")
    tok = smollm2_tokenizer()
    with FakeSGLangServer(HFEngine(tiny_llama(tok), tok)) as server:
        from megatron_rpt.rollout.config import RolloutConfig
        from megatron_rpt.rollout.sglang_engine import SGLangEngine

        engine = SGLangEngine.connect(server.url, RolloutConfig(engine="sglang"), architecture="LlamaForCausalLM")
        stream = [("model.layers.0.self_attn.q_proj.weight_scale_inv", torch.ones(1, 1))]
        with pytest.raises(ConfigError, match="30234"):
            engine.update_weights(stream, version=1)
        assert "/update_weights_from_tensor" not in server.paths()


def test_hf_manifest_reads_safetensors_headers(tmp_path):
    from megatron_rpt.rollout.sglang_engine import hf_manifest

    tok = smollm2_tokenizer()
    model = tiny_llama(tok, tied=True)
    model.save_pretrained(tmp_path)
    manifest = hf_manifest(tmp_path)
    assert manifest["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert manifest["lm_head.weight"] == manifest["model.embed_tokens.weight"] == (len(tok), 64)
