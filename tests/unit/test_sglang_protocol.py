"""SGLang payloads built from sglang's own classes, response parsing, and the client's flows.

Needs sglang importable (CI installs it --no-deps, see the Makefile); skipped only when sglang
is not installed at all. Request bodies are validated exactly as sglang's HTTP routes validate
them: pydantic ``TypeAdapter`` over the route's declared class.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_rpt.rollout.types import SamplingParams
from tests._stubs.rollout_helpers import require_sglang_protocol, smollm2_tokenizer, tiny_llama


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
    args = proto.check_server_argv(argv)
    assert args.host == "127.0.0.1" and args.port == 31001 and args.tp_size == 2
    assert args.enable_memory_saver and args.enable_weights_cpu_backup
    assert args.attention_backend == "triton" and not args.disable_radix_cache
    with pytest.raises(SystemExit):
        proto.check_server_argv(argv + ["--no-such-flag"])


def _client(server, **overrides):  # noqa: ANN001, ANN202
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.launch_timeout_s = 20
    for k, v in overrides.items():
        setattr(cfg.sglang, k, v)
    return SGLangEngine.connect(server.url, cfg)


def test_colocated_flow_order_buckets_and_fences():
    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests._stubs.fake_sglang_server import FakeSGLangServer

    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    state = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    with FakeSGLangServer(HFEngine(model, tok), tp_size=2) as server:
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
        assert paths[0] == "/resume_memory_occupation" and server.calls[0][1]["tags"] == ["weights"]
        # the release zeroed the served model; equality below proves the push loaded it
        resume = "/resume_memory_occupation"
        assert paths[-4:] == ["/update_weight_version", resume, resume, "/flush_cache"]
        assert [c[1]["tags"] for c in server.calls[-3:-1]] == [["kv_cache"], ["cuda_graph"]]
        assert not server.released
        # never more than max_unfenced_buckets pushes without a fence, and a fence after the last
        run = 0
        for p in paths:
            run = run + 1 if p == "/update_weights_from_tensor" else (0 if p == "/get_weights_by_name" else run)
            assert run <= 2
        assert paths[paths.index("/update_weight_version") - 1] == "/get_weights_by_name"
        assert server.version == "9" and engine.weight_version == 9
        for name, t in state:
            assert torch.equal(dict(model.named_parameters())[name], t), name
        out = engine.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=3, seed=0))
        assert out[0][0].meta["weight_version"] == "9"
        engine.shutdown()


def test_per_rank_payloads_reach_each_tp_rank_with_a_fence_per_bucket():
    """update_weights_from_ranks: every TP rank's own serialized buckets in one request per
    dtype group (built separately, as on two GPUs), a fence after each bucket, then the
    resume of the KV cache and CUDA graphs."""
    from megatron_rpt.rollout import sglang_protocol as proto
    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests._stubs.fake_sglang_server import FakeSGLangServer

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
    with FakeSGLangServer(HFEngine(model, tok), tp_size=2) as server:
        engine = _client(server, tp_size=2)
        engine.release_memory()
        server.calls.clear()
        engine.update_weights_from_ranks(
            ([payloads(b), payloads(b)] for b in halves), version=5
        )
        paths = server.paths()
        assert server.rank_entries and set(server.rank_entries) == {2}  # a distinct entry per rank
        fences = [i for i, p in enumerate(paths) if p == "/get_weights_by_name"]
        assert len(fences) == 2 and paths[fences[0] + 1] == "/update_weights_from_tensor"
        assert not server.released and engine.weight_version == 5
        for name, t in state:
            assert torch.equal(dict(model.named_parameters())[name], t), name
        with pytest.raises(ValueError, match="3 payloads for 2"):
            engine.update_weights_from_ranks([[payloads(halves[0])] * 3], version=6)
        bad = [(n, t * 2) for n, t in halves[0]]
        with pytest.raises(RuntimeError, match="different tensors"):
            engine.update_weights_from_ranks([[payloads(halves[0]), payloads(bad)]], version=7)
        engine.shutdown()


def test_failed_push_blocks_generation_until_repaired():
    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests._stubs.fake_sglang_server import FakeSGLangServer

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


def test_hf_manifest_reads_safetensors_headers(tmp_path):
    from megatron_rpt.rollout.sglang_engine import hf_manifest

    tok = smollm2_tokenizer()
    model = tiny_llama(tok, tied=True)
    model.save_pretrained(tmp_path)
    manifest = hf_manifest(tmp_path)
    assert manifest["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert manifest["lm_head.weight"] == manifest["model.embed_tokens.weight"] == (len(tok), 64)
