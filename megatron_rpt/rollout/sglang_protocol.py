r"""SGLang wire protocol: payloads built from sglang's own classes, and response parsing.

Pure functions, no server and no GPU needed (tests/unit/test_sglang_protocol.py runs them on
CPU). Every request body is constructed as the sglang class its HTTP route declares and then
turned into JSON, so a field sglang renames or drops fails here, in a unit test, rather than on
the GPU machine:

================================  ===============================================  ==========
endpoint                          sglang class                                      built by
================================  ===============================================  ==========
``/generate``                     ``io_struct.GenerateReqInput`` (+ ``SamplingParams``)  ``generate_request``
``/update_weights_from_tensor``   ``io_struct.UpdateWeightsFromTensorReqInput`` with one
                                  ``MultiprocessingSerializer`` string per engine TP rank of
                                  ``{"flattened_tensor", "metadata"}`` from
                                  ``weight_sync.tensor_bucket.FlattenedTensorBucket``  ``tensor_bucket_request``
``/init_weights_update_group``    ``io_struct.InitWeightsUpdateGroupReqInput``      ``init_group_request``
``/update_weights_from_distributed`` ``io_struct.UpdateWeightsFromDistributedReqInput`` ``distributed_update_request``
``/release_memory_occupation``    ``io_struct.ReleaseMemoryOccupationReqInput``     ``memory_request``
``/resume_memory_occupation``     ``io_struct.ResumeMemoryOccupationReqInput``      ``memory_request``
``/get_weights_by_name``          ``io_struct.GetWeightsByNameReqInput``            ``get_weights_request``
``/update_weight_version``        ``io_struct.UpdateWeightVersionReqInput``         ``weight_version_request``
================================  ===============================================  ==========

Versions: written against sglang 0.5.17 (the GPU machine's torch 2.11 pin) and 0.5.23 (CI's
``--no-deps`` install); the classes above have the same fields in both.

Sampling: ``n`` samples per prompt use SGLang's parallel sampling (``sampling_params.n``; it
prefills the shared prompt once). With a seed, SGLang can only honour it in
``--enable-deterministic-inference`` mode, where *every* request without a seed gets 42 and the
G samples of a prompt would be identical; so a seeded call expands the G samples into separate
requests with distinct ``sampling_seed`` values instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

from megatron_rpt.rollout.types import Completion, SamplingParams

if TYPE_CHECKING:
    import torch

BOX_FINISH_TAG = "box"
RELEASE_TAGS = ("weights", "kv_cache", "cuda_graph")
"""SGLang memory tags (sglang ``GPU_MEMORY_ALL_TYPES``), in resume order: weights first (to
load into), then the KV cache, then the CUDA-graph pool; all are released for training."""


class SGLangUnavailable(RuntimeError):
    """sglang is not installed (or cannot be imported) in this environment."""


def require_sglang() -> None:
    """Raise ``SGLangUnavailable`` with the install hint when sglang is missing."""
    if importlib.util.find_spec("sglang") is None:
        raise SGLangUnavailable(
            "sglang is not installed: pip install 'megatron_rpt[gpu-rollout]' on a GPU machine "
            "(CPU CI installs it --no-deps for its protocol classes only; see the Makefile)"
        )


def have_sglang() -> bool:
    """sglang is installed (its source can be read; importing may still need CUDA)."""
    return importlib.util.find_spec("sglang") is not None


def sglang_version() -> str:
    """The installed sglang version string."""
    require_sglang()
    from importlib.metadata import version

    return version("sglang")


# ----------------------------------------------------------------------------- generate


def _seed_for(seed: int, prompt_index: int, sample_index: int) -> int:
    # Distinct, reproducible 63-bit seeds per (call seed, prompt, sample).
    return (seed * 1_000_003 + prompt_index * 8_191 + sample_index) % (2**63 - 1)


def sampling_params_dict(
    params: SamplingParams, *, box_regex: str | None, seed: int | None = None, n: int = 1
) -> dict[str, Any]:
    """The ``sampling_params`` object of a /generate request, validated by sglang's class."""
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    sp: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "n": n,
        # keep stop tokens in output_ids so ids and log-probs stay aligned (types.py)
        "no_stop_trim": True,
        "skip_special_tokens": True,
    }
    if params.stop_token_ids:
        sp["stop_token_ids"] = sorted(set(params.stop_token_ids))
    if params.stop_at_final_box:
        assert box_regex is not None
        sp["stop_regex"] = [box_regex]
    if seed is not None:
        sp["sampling_seed"] = seed
    SGLSamplingParams(**sp).verify(vocab_size=2**31 - 1)  # raises ValueError on bad values
    return sp


def generate_request(
    prompts: Sequence[Sequence[int]], params: SamplingParams, *, box_regex: str | None = None
) -> dict[str, Any]:
    """JSON body of one /generate call returning ``len(prompts) * n`` outputs, prompt-major."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    ids = [list(map(int, p)) for p in prompts]
    if params.seed is None:
        input_ids = ids
        sp: Any = sampling_params_dict(params, box_regex=box_regex, n=params.n)
    else:
        input_ids = [p for p in ids for _ in range(params.n)]
        sp = [
            sampling_params_dict(params, box_regex=box_regex, seed=_seed_for(params.seed, i, j))
            for i in range(len(ids))
            for j in range(params.n)
        ]
    req = GenerateReqInput(
        input_ids=input_ids,
        sampling_params=sp,
        return_logprob=params.return_logprobs,
        stream=False,
    )
    return _dataclass_json(req, keep=("input_ids", "sampling_params", "return_logprob", "stream"))


def _dataclass_json(obj: Any, keep: Iterable[str]) -> dict[str, Any]:
    # Send only what we set: sglang fills the rest with its own (version-specific) defaults.
    names = {f.name for f in dataclasses.fields(obj)}
    missing = [k for k in keep if k not in names]
    assert not missing, f"{type(obj).__name__} has no fields {missing}"
    return {k: getattr(obj, k) for k in keep}


def _finish_reason(info: Any, box_regex: str | None) -> str:
    if not isinstance(info, dict):
        return "stop" if info else "abort"
    kind = info.get("type")
    if kind == "stop" and box_regex is not None and info.get("matched") == box_regex:
        return BOX_FINISH_TAG
    if kind in ("stop", "length", "abort"):
        return kind
    raise ValueError(f"unknown SGLang finish_reason {info!r}")


def parse_completion(item: dict[str, Any], *, box_regex: str | None = None) -> Completion:
    """One /generate output dict -> ``Completion``."""
    meta = item.get("meta_info", {})
    token_ids = [int(t) for t in item.get("output_ids") or []]
    entries = meta.get("output_token_logprobs")
    logprobs = None
    if entries is not None:
        logprobs = [float(e[0]) for e in entries]
        lp_ids = [int(e[1]) for e in entries]
        if lp_ids != token_ids:
            # Older servers trim a matched stop token from output_ids only.
            if lp_ids[: len(token_ids)] != token_ids or len(lp_ids) - len(token_ids) > 1:
                raise ValueError(
                    f"SGLang output_ids ({len(token_ids)}) and output_token_logprobs "
                    f"({len(lp_ids)}) disagree"
                )
            token_ids = lp_ids
    return Completion(
        token_ids=token_ids,
        text=item.get("text") or "",
        logprobs=logprobs,
        finish_reason=_finish_reason(meta.get("finish_reason"), box_regex),  # type: ignore[arg-type]
        cached_tokens=meta.get("cached_tokens"),
        meta={
            "prompt_tokens": meta.get("prompt_tokens"),
            "weight_version": meta.get("weight_version"),
        },
    )


def parse_generate_response(
    items: Sequence[dict[str, Any]], num_prompts: int, n: int, *, box_regex: str | None = None
) -> list[list[Completion]]:
    """Prompt-major list of ``num_prompts * n`` outputs -> ``n`` completions per prompt."""
    if isinstance(items, dict):
        items = [items]
    if len(items) != num_prompts * n:
        raise ValueError(f"SGLang returned {len(items)} outputs for {num_prompts} prompts x n={n}")
    flat = [parse_completion(it, box_regex=box_regex) for it in items]
    return [flat[i * n : (i + 1) * n] for i in range(num_prompts)]


# ----------------------------------------------------------------------------- weights


def iter_dtype_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a weight stream into single-dtype buckets of at most ``bucket_bytes``.

    One dtype per bucket because ``FlattenedTensorBucket`` views byte ranges back as their
    dtype, which needs each tensor's offset aligned to its element size. A tensor larger than
    ``bucket_bytes`` travels alone. Order within a dtype is preserved.

    >>> import torch
    >>> ts = [("a", torch.zeros(4)), ("b", torch.zeros(4, dtype=torch.bfloat16)), ("c", torch.zeros(4))]
    >>> [[n for n, _ in b] for b in iter_dtype_buckets(ts, 32)]
    [['a', 'c'], ['b']]
    >>> [[n for n, _ in b] for b in iter_dtype_buckets(ts, 16)]
    [['a'], ['b'], ['c']]
    """
    pending: dict[Any, list[tuple[str, torch.Tensor]]] = {}
    sizes: dict[Any, int] = {}
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        key = tensor.dtype
        if key in pending and sizes[key] + nbytes > bucket_bytes:
            yield pending.pop(key)
            sizes[key] = 0
        pending.setdefault(key, []).append((name, tensor))
        sizes[key] = sizes.get(key, 0) + nbytes
    yield from (bucket for bucket in pending.values() if bucket)


def flatten_bucket(named_tensors: list[tuple[str, torch.Tensor]]):  # noqa: ANN201
    """A fresh ``FlattenedTensorBucket`` (new memory: never a reused send buffer)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    dtypes = {t.dtype for _, t in named_tensors}
    assert len(dtypes) == 1, f"one dtype per bucket, got {dtypes}"
    return FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in named_tensors])


def tensor_bucket_request(
    bucket: Any, *, tp_size: int, flush_cache: bool, weight_version: str | None
) -> dict[str, Any]:
    """JSON body of /update_weights_from_tensor for one flattened bucket.

    On GPU the serializer emits CUDA-IPC handles (same node only); on CPU, shared-memory
    handles. One entry per engine TP rank: each rank deserializes only its own copy, which keeps
    the producer-side IPC reference counts balanced.
    """
    from sglang.srt.utils import MultiprocessingSerializer

    data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    with device_uuid_reductions():
        serialized = [MultiprocessingSerializer.serialize(data, output_str=True) for _ in range(tp_size)]
    return per_rank_tensor_request(serialized, flush_cache=flush_cache, weight_version=weight_version)


def per_rank_tensor_request(
    serialized: Sequence[str], *, flush_cache: bool, weight_version: str | None
) -> dict[str, Any]:
    """JSON body of /update_weights_from_tensor from one serialized flattened bucket per engine
    TP rank (``serialized[i]`` is read by TP rank i only: ``tp_worker.deserialize_own_rank``)."""
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

    req = UpdateWeightsFromTensorReqInput(
        serialized_named_tensors=list(serialized),
        load_format="flattened_bucket",
        flush_cache=flush_cache,
        weight_version=weight_version,
    )
    return _struct_json(req, ("serialized_named_tensors", "load_format", "flush_cache", "weight_version"))


def rank_bucket_payload(
    named_tensors: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int
) -> tuple[list[Any], list[str]]:
    """One engine TP rank's payload of a weight bucket: ``(flattened buckets, serialized)``.

    Run on the trainer rank that shares the engine rank's GPU: the tensors are flattened per
    dtype (``iter_dtype_buckets``) into fresh memory of *this* GPU and serialized as IPC handles
    with the device UUID (``device_uuid_reductions``, what SGLang's own producer does), so the
    engine rank maps memory of its own GPU. The caller keeps the flattened buckets alive
    until the server has read them.
    """
    from sglang.srt.utils import MultiprocessingSerializer

    buckets, serialized = [], []
    for group in iter_dtype_buckets(named_tensors, bucket_bytes):
        bucket = flatten_bucket(group)
        data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
        buckets.append(bucket)
        with device_uuid_reductions():
            serialized.append(MultiprocessingSerializer.serialize(data, output_str=True))
    return buckets, serialized


_DEVICE_ARG = 6
"""Index of the device in the arguments torch's ``reduce_tensor`` returns for a CUDA tensor
(the same constant SGLang's ``patch_torch`` uses)."""


def with_device_uuid(args: tuple, uuid_of: Any) -> tuple:
    """``reduce_tensor`` arguments of a CUDA tensor with the device index replaced by
    ``uuid_of(index)`` (already a UUID string: unchanged).

    >>> with_device_uuid(("cls", (2,), (1,), 0, "st", "f32", 3, b"h"), lambda i: f"GPU-{i}")[6]
    'GPU-3'
    """
    device = args[_DEVICE_ARG]
    if not isinstance(device, int):
        return args
    return (*args[:_DEVICE_ARG], uuid_of(device), *args[_DEVICE_ARG + 1 :])


@contextlib.contextmanager
def device_uuid_reductions() -> Iterator[None]:
    """Within the block, CUDA tensors are pickled (``ForkingPickler``, which
    ``MultiprocessingSerializer`` uses) with their device's UUID instead of its index.

    What SGLang's ``monkey_patch_torch_reductions`` does for its own producers (and slime for
    its colocated sync), scoped: SGLang's TP workers apply the consumer half and map the UUID
    to their own device index, which keeps the handle right when trainer and server see
    different ``CUDA_VISIBLE_DEVICES``. Scoped because SGLang's global patch breaks the
    pickling of CPU tensors (IndexError), which the trainer's other ForkingPickler users need.
    """
    import torch
    from torch.multiprocessing import reductions

    saved = dict(ForkingPickler._extra_reducers)

    def uuid_of(index: int) -> str:
        return str(torch.cuda.get_device_properties(index).uuid)

    def reduce(tensor: torch.Tensor):  # noqa: ANN202
        fn, args = reductions.reduce_tensor(tensor)
        return fn, (with_device_uuid(args, uuid_of) if tensor.is_cuda else args)

    for cls in saved:
        if saved[cls] is reductions.reduce_tensor:
            ForkingPickler.register(cls, reduce)
    try:
        yield
    finally:
        ForkingPickler._extra_reducers.clear()
        ForkingPickler._extra_reducers.update(saved)


def reclaim_ipc_memory() -> None:
    """Return bucket memory that SGLang has released to the caching allocator
    (``torch.cuda.ipc_collect``; a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


def _struct_json(req: Any, keep: Sequence[str]) -> dict[str, Any]:
    import msgspec

    fields = msgspec.structs.asdict(req)
    missing = [k for k in keep if k not in fields]
    assert not missing, f"{type(req).__name__} has no fields {missing}"
    return {k: fields[k] for k in keep}


def decode_tensor_bucket(serialized: str) -> list[tuple[str, torch.Tensor]]:
    """Server side of ``tensor_bucket_request``: what SGLang's scheduler reconstructs."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    data = MultiprocessingSerializer.deserialize(serialized)
    bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
    return bucket.reconstruct_tensors()


def init_group_request(
    *, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str
) -> dict[str, Any]:
    """JSON body of /init_weights_update_group (NCCL; trainer rank 0, engine ranks from 1)."""
    from sglang.srt.managers.io_struct import InitWeightsUpdateGroupReqInput

    req = InitWeightsUpdateGroupReqInput(
        master_address=master_address,
        master_port=master_port,
        rank_offset=rank_offset,
        world_size=world_size,
        group_name=group_name,
        backend="nccl",
    )
    return _struct_json(
        req, ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
    )


def distributed_update_request(
    named_tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    group_name: str,
    flush_cache: bool,
    weight_version: str | None,
) -> dict[str, Any]:
    """JSON body of /update_weights_from_distributed: names, dtypes, shapes of one bucket.

    The server allocates these tensors and joins one broadcast per tensor from rank 0, in this
    order; the trainer must broadcast the same tensors in the same order concurrently.
    """
    from sglang.srt.managers.io_struct import UpdateWeightsFromDistributedReqInput

    req = UpdateWeightsFromDistributedReqInput(
        names=[n for n, _ in named_tensors],
        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in named_tensors],
        shapes=[list(t.shape) for _, t in named_tensors],
        group_name=group_name,
        flush_cache=flush_cache,
        weight_version=weight_version,
    )
    return _struct_json(req, ("names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version"))


def memory_request(tags: Sequence[str] | None, *, resume: bool) -> dict[str, Any]:
    """JSON body of /release_memory_occupation or /resume_memory_occupation."""
    from sglang.srt.managers.io_struct import (
        ReleaseMemoryOccupationReqInput,
        ResumeMemoryOccupationReqInput,
    )

    bad = [t for t in tags or () if t not in RELEASE_TAGS]
    if bad:
        raise ValueError(f"unknown SGLang memory tags {bad}; known: {list(RELEASE_TAGS)}")
    cls = ResumeMemoryOccupationReqInput if resume else ReleaseMemoryOccupationReqInput
    return _struct_json(cls(tags=list(tags) if tags else None), ("tags",))


def weight_version_request(version: int) -> dict[str, Any]:
    """JSON body of /update_weight_version (recorded in every later /generate's meta_info)."""
    from sglang.srt.managers.io_struct import UpdateWeightVersionReqInput

    req = UpdateWeightVersionReqInput(new_version=str(version), abort_all_requests=False)
    return _struct_json(req, ("new_version", "abort_all_requests"))


def get_weights_request(name: str, truncate_size: int) -> dict[str, Any]:
    """JSON body of /get_weights_by_name (the first ``truncate_size`` rows, float32)."""
    from sglang.srt.managers.io_struct import GetWeightsByNameReqInput

    return _struct_json(GetWeightsByNameReqInput(name=name, truncate_size=truncate_size), ("name", "truncate_size"))


# ----------------------------------------------------------------------------- server command


def server_argv(
    model_path: str,
    *,
    host: str,
    port: int,
    tp_size: int,
    mem_fraction_static: float,
    dtype: str,
    colocated: bool,
    enable_weights_cpu_backup: bool,
    deterministic_inference: bool,
    seed: int,
    extra_args: dict[str, Any],
    base_gpu_id: int | None = None,
) -> list[str]:
    """Arguments of ``python -m sglang.launch_server`` (no sglang import; see ``check_server_argv``).

    ``dtype='float32'`` adds ``--attention-backend triton`` unless ``extra_args`` names a
    backend: SGLang's defaults (FA3 on Hopper, flashinfer / trtllm elsewhere) accept only
    16-bit and FP8 inputs, so an fp32 server would die in its warm-up request.
    """
    argv = [
        "--model-path", str(model_path), "--host", host, "--port", str(port),
        "--tp-size", str(tp_size), "--mem-fraction-static", str(mem_fraction_static),
        "--dtype", dtype, "--random-seed", str(seed), "--weight-version", "0",
    ]  # fmt: skip
    if colocated:
        argv.append("--enable-memory-saver")  # release/resume_memory_occupation need it
    if enable_weights_cpu_backup:
        argv.append("--enable-weights-cpu-backup")
    if deterministic_inference:
        argv.append("--enable-deterministic-inference")
    if base_gpu_id is not None:
        argv += ["--base-gpu-id", str(base_gpu_id)]
    flags = {"--" + k.lstrip("-").replace("_", "-") for k in extra_args}
    if dtype in ("float32", "float") and "--attention-backend" not in flags:
        argv += ["--attention-backend", "triton"]
    for key, value in extra_args.items():
        flag = "--" + key.lstrip("-").replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


def check_server_argv(argv: Sequence[str]):  # noqa: ANN201
    """Parse ``argv`` with sglang's own ``prepare_server_args`` (raises on unknown flags).

    ``prepare_server_args`` calls ``logging.basicConfig(force=True)``, which would replace the
    trainer's root handlers (rank prefix, format, level); they are put back afterwards.
    """
    import logging

    from sglang.srt.server_args import prepare_server_args

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return prepare_server_args(list(argv))
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
