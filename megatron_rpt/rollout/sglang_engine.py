r"""SGLang rollout engine: a ``RolloutEngine`` over an SGLang HTTP server (GPU only).

Launch: ``python -m sglang.launch_server`` as a child process in its own process group, bound to
127.0.0.1 unless ``rollout.sglang.host`` says otherwise (the server has no authentication and
its weight endpoints unpickle tensors), then ``/health`` polled under a hard timeout.
``shutdown`` terminates the whole process group (TERM, then KILL) and is also registered with
``atexit``, so no server outlives the trainer. ``connect`` attaches to a running server (an
external deployment, or the fake server of the CPU tests).

Colocated weight sync (engine on the trainer's GPUs)::

    release_memory()                      # before training: flush, release weights, kv_cache
                                          # and cuda_graph
    ... train ...
    update_weights(stream, version=v)     # resume "weights" -> push buckets -> ipc_collect
                                          # -> set version -> resume "kv_cache", "cuda_graph"
                                          # -> flush_cache

Each bucket is a fresh single-dtype ``FlattenedTensorBucket`` serialized (CUDA IPC handles on
GPU) once per engine TP rank and POSTed to ``/update_weights_from_tensor`` with
``load_format="flattened_bucket"``. ``update_weights_from_ranks`` instead takes one payload
per engine TP rank, each built by the trainer rank on that rank's GPU (weight_sync/per_engine.py).

Bucket lifetime (the race behind "garbled output after sync"): SGLang answers the HTTP request
once it has *enqueued* the copies from our buffer into its parameters, not when the GPU has
executed them. The buffer must not be reused before then. That is what torch's CUDA-IPC
reference counting guarantees, for every model alike: sharing a CUDA tensor registers it in a
shared-memory counter; when the producer drops its last reference while the counter is still
held, the block goes to a limbo list instead of back to the caching allocator; the consumer
(SGLang's TP worker) synchronizes its stream before it releases the handle and decrements the
counter. So each bucket is kept until the server has answered (it has then opened and used the
handle), dropped, and every ``max_unfenced_buckets`` buckets (and at the end)
``torch.cuda.ipc_collect()`` returns the blocks whose counters reached zero. The same scheme as
slime's colocated sync. No HTTP fence: ``/get_weights_by_name`` exists only for some SGLang
models (Llama yes, Qwen2/Qwen3 answer 400) and copies the whole tensor to the host.

Producer reductions: the bucket is serialized after SGLang's ``monkey_patch_torch_reductions``,
so the IPC handle names the GPU by UUID, not by index; SGLang's TP worker maps the UUID to its
own device index, which keeps working when the trainer and the server see different
``CUDA_VISIBLE_DEVICES`` (per-rank launchers).

Disaggregated weight sync (engine on other GPUs): ``init_weight_group`` creates an NCCL group
(trainer = rank 0, engine TP ranks 1..tp) through ``/init_weights_update_group``; then per
bucket the trainer POSTs the names/dtypes/shapes to ``/update_weights_from_distributed`` from a
helper thread while broadcasting the tensors, in the same order, from the calling thread.

Releasing weights without ``enable_weights_cpu_backup`` discards them: until the next
``update_weights`` the engine refuses to ``generate`` instead of returning garbage.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.errors import ConfigError, InputError
from megatron_rpt.rollout import sglang_contract
from megatron_rpt.rollout import sglang_protocol as proto
from megatron_rpt.rollout.config import RolloutConfig
from megatron_rpt.rollout.stopping import final_box_stop_regex
from megatron_rpt.rollout.types import (
    Completion,
    PrefixCacheStats,
    SamplingParams,
    tensor_fingerprint,
    validate_prompts,
)

logger = logging.getLogger(__name__)


class SGLangEngine:
    """Client of one SGLang server (see the module docstring for the flows)."""

    def __init__(
        self,
        base_url: str,
        cfg: RolloutConfig,
        *,
        process: subprocess.Popen | None = None,
        argv: Sequence[str] = (),
        manifest: dict[str, tuple[int, ...]] | None = None,
        architecture: str | None = None,
    ) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.cfg = cfg
        self.process = process
        self._argv = list(argv)
        self._http = requests.Session()
        self._version = 0
        self._released: set[str] = set()
        self._weights_valid = True
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._group = None
        self.manifest = manifest
        self.architecture = architecture
        """HF class of the served model (config.json ``architectures[0]``), None if unknown."""
        s = cfg.sglang
        self._box_regex = final_box_stop_regex(s.box_max_gap_chars, s.box_max_chars)
        if process is not None:
            atexit.register(self.shutdown)

    # ------------------------------------------------------------------ construction

    @classmethod
    def launch(cls, cfg: RolloutConfig, model_path: str, *, seed: int = 1234) -> SGLangEngine:
        """Start a server for ``model_path`` and wait until it is healthy."""
        from megatron_rpt.capabilities import have_cuda

        if not have_cuda():
            raise RuntimeError(
                "rollout.engine=sglang needs a CUDA GPU (SGLang cannot serve on CPU from PyPI "
                "builds); use rollout.engine=hf on this machine"
            )
        proto.require_sglang()

        s = cfg.sglang
        model_dir = resolve_model_path(model_path)
        architecture = sglang_contract.architecture_of(model_dir)
        check_fp8_servable(model_dir, architecture)
        port = s.port or _free_port(s.host)
        argv = proto.server_argv(
            str(model_dir), host=s.host, port=port, tp_size=s.tp_size,
            mem_fraction_static=s.mem_fraction_static, dtype=s.dtype,
            colocated=cfg.mode == "colocated", enable_weights_cpu_backup=s.enable_weights_cpu_backup,
            deterministic_inference=s.deterministic_inference, seed=seed, extra_args=s.extra_args,
            base_gpu_id=s.base_gpu_id,
        )  # fmt: skip
        proto.check_server_argv(argv)
        if cfg.mode == "disaggregated" and s.base_gpu_id is None and "--base-gpu-id" not in argv:
            logger.warning(
                "rollout.mode=disaggregated without rollout.sglang.base_gpu_id: the server "
                "starts on GPU 0.. of this node, next to the trainer, unless CUDA_VISIBLE_DEVICES "
                "says otherwise"
            )
        if not s.deterministic_inference:
            logger.warning(
                "SGLang without deterministic inference ignores sampling seeds: rollouts are not "
                "reproducible on resume or retry (rollout.sglang.deterministic_inference=true "
                "makes them so, at some speed cost)"
            )
        # a weightless start folder (load-format dummy) has no safetensors to read names from:
        # the server then reports unknown names itself
        manifest = hf_manifest(model_dir) if any(model_dir.glob("*.safetensors")) else None
        url = f"http://{_url_host(s.host)}:{port}"
        engine = cls(url, cfg, process=_spawn(argv), argv=argv, manifest=manifest,
                     architecture=architecture)  # fmt: skip
        try:
            engine.wait_healthy(s.launch_timeout_s)
        except BaseException:
            engine.shutdown()
            raise
        return engine

    @classmethod
    def connect(
        cls,
        base_url: str,
        cfg: RolloutConfig,
        *,
        manifest: dict[str, tuple[int, ...]] | None = None,
        architecture: str | None = None,
    ) -> SGLangEngine:
        """Attach to a running server (not owned: ``shutdown`` leaves it running).

        ``manifest`` (HF name -> shape, e.g. ``hf_manifest(model_dir)``) enables the client-side
        name/shape check of weight updates; without it a wrong name is only caught by the server,
        and SGLang's ``load_weights`` skips some unknown names silently. ``architecture`` (the
        HF class, e.g. 'Qwen2ForCausalLM') lets ``weight_checksums`` refuse models whose SGLang
        class cannot read weights back.
        """
        engine = cls(base_url, cfg, manifest=manifest, architecture=architecture)
        engine.wait_healthy(cfg.sglang.launch_timeout_s)
        return engine

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll ``/health`` until it answers 200; raise if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"SGLang server exited with status {self.process.returncode} during startup")
            if self.health():
                return
            time.sleep(0.5)
        raise TimeoutError(f"SGLang server at {self.base_url} not healthy after {timeout_s:.0f} s")

    def restart(self) -> None:
        """Relaunch an owned server that died (weights return to the launch checkpoint: v0)."""
        if not self._argv:
            raise RuntimeError("restart() only works for servers started with launch()")
        self._terminate()
        self.process = _spawn(self._argv)
        self._version, self._released, self._weights_valid = 0, set(), True
        self.wait_healthy(self.cfg.sglang.launch_timeout_s)

    # ------------------------------------------------------------------ HTTP

    def _call(self, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        resp = self._http.post(
            self.base_url + path, json=body if body is not None else {},
            timeout=timeout or self.cfg.sglang.control_timeout_s,
        )  # fmt: skip
        try:
            payload = resp.json()
        except ValueError:
            payload = resp.text
        if resp.status_code != 200 or (isinstance(payload, dict) and payload.get("success") is False):
            raise RuntimeError(f"SGLang {path} failed ({resp.status_code}): {str(payload)[:500]}")
        return payload

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order (one /generate call)."""
        self._check_can_generate()
        validate_prompts(prompts)
        if not prompts:
            return []
        body = proto.generate_request(prompts, params, box_regex=self._box_regex)
        items = self._call("/generate", body, timeout=self.cfg.sglang.request_timeout_s)
        groups = proto.parse_generate_response(items, len(prompts), params.n, box_regex=self._box_regex)
        for group in groups:
            for c in group:
                if c.cached_tokens is not None and c.meta.get("prompt_tokens") is not None:
                    self._prompt_tokens += int(c.meta["prompt_tokens"])
                    self._cached_tokens += int(c.cached_tokens)
        return groups

    def _check_can_generate(self) -> None:
        if self._released:
            raise RuntimeError(f"SGLang memory released ({sorted(self._released)}); resume first")
        if not self._weights_valid:
            raise RuntimeError(
                "SGLang weights were released without a CPU backup (or a push failed); "
                "call update_weights before generate"
            )

    # ------------------------------------------------------------------ weights

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        flush_cache: bool = True,
    ) -> None:
        """Push an HF-named weight stream (colocated: CUDA IPC buckets; disaggregated: NCCL)."""
        self._begin_update()
        stream = self._checked(named_tensors)
        if self.cfg.mode == "colocated":
            self._push_tensor_buckets(stream)
        else:
            self._push_distributed(stream)
        self._finish_update(version, flush_cache)

    def update_weights_from_ranks(
        self, buckets: Iterable[Sequence[Sequence[str]]], *, version: int, flush_cache: bool = True
    ) -> None:
        """Colocated, one payload per engine TP rank (weight_sync/per_engine.py).

        Per bucket, ``per_rank[i]`` is TP rank i's list of serialized flattened buckets
        (``proto.rank_bucket_payload``, built on rank i's own GPU); one request per dtype
        group (answered once the server has loaded it), then IPC memory is reclaimed.
        """
        if self.cfg.mode != "colocated":
            raise RuntimeError("per-rank payloads are CUDA-IPC handles: colocated mode only")
        self._begin_update()
        for per_rank in buckets:
            if len(per_rank) != self.cfg.sglang.tp_size:
                raise ValueError(f"{len(per_rank)} payloads for {self.cfg.sglang.tp_size} engine TP ranks")
            for serialized in zip(*per_rank, strict=True):
                body = proto.per_rank_tensor_request(serialized, flush_cache=False, weight_version=None)
                self._call("/update_weights_from_tensor", body)
            self._fence()
        self._finish_update(version, flush_cache)

    def _begin_update(self) -> None:
        if "weights" in self._released:
            self._resume(["weights"])
        self._weights_valid = False

    def _finish_update(self, version: int, flush_cache: bool) -> None:
        """Record the version, then resume the KV cache and CUDA graphs (weights are in)."""
        self._call("/update_weight_version", proto.weight_version_request(version))
        self._version = version
        self._weights_valid = True
        self.resume_memory()
        if flush_cache:
            self.flush_cache()

    def _checked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):  # noqa: ANN202
        scales_checked = False
        for name, tensor in named_tensors:
            if not scales_checked and name.endswith(".weight_scale_inv"):
                _refuse_block_fp8(self.architecture, "the weight sync pushes blockwise FP8 weights")
                scales_checked = True
            if self.manifest is not None:
                shape = self.manifest.get(name)
                if shape is None:
                    raise InputError(f"update_weights: unknown tensor {name!r} (not in the served model)")
                if tuple(tensor.shape) != tuple(shape):
                    raise InputError(
                        f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"the served model expects {tuple(shape)}"
                    )
            yield name, tensor

    def _push_tensor_buckets(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        s = self.cfg.sglang
        nbuckets = ntensors = 0
        t0 = time.perf_counter()
        for group in proto.iter_dtype_buckets(named_tensors, s.bucket_bytes):
            bucket = proto.flatten_bucket(group)
            body = proto.tensor_bucket_request(bucket, tp_size=s.tp_size, flush_cache=False, weight_version=None)
            self._call("/update_weights_from_tensor", body)
            # Dropped only after the reply: the server has opened the handle by then, and torch's
            # IPC counter keeps the block out of the allocator until it is done (docstring).
            del bucket, body
            nbuckets, ntensors = nbuckets + 1, ntensors + len(group)
            if nbuckets % s.max_unfenced_buckets == 0:
                self._fence()
        self._fence()
        logger.info(
            "SGLang: pushed %d tensors in %d buckets in %.2f s", ntensors, nbuckets, time.perf_counter() - t0
        )

    def _fence(self) -> None:
        """Return bucket memory SGLang has finished reading to the allocator.

        Model-independent: no request (``/get_weights_by_name`` does not exist for every
        model). Correctness never waits on this: torch's CUDA-IPC counter keeps a shared block
        out of the allocator until the server released it (module docstring); this only bounds
        how much released memory waits in torch's limbo list.
        """
        proto.reclaim_ipc_memory()

    def init_weight_group(self) -> None:
        """Disaggregated mode: join the NCCL group the engine will receive weights on."""
        from sglang.srt.utils.common import init_custom_process_group

        s = self.cfg.sglang
        world = 1 + s.tp_size
        body = proto.init_group_request(
            master_address=s.nccl_master_address, master_port=s.nccl_master_port,
            rank_offset=1, world_size=world, group_name=s.weight_group_name,
        )  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._call, "/init_weights_update_group", body)
            self._group = init_custom_process_group(
                backend="nccl", init_method=f"tcp://{s.nccl_master_address}:{s.nccl_master_port}",
                world_size=world, rank=0, group_name=s.weight_group_name,
            )  # fmt: skip
            pending.result()

    def _push_distributed(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        import torch.distributed as dist

        if self._group is None:
            self.init_weight_group()
        s = self.cfg.sglang
        with ThreadPoolExecutor(1) as pool:
            for group in proto.iter_dtype_buckets(named_tensors, s.bucket_bytes):
                tensors = [(n, t.detach().contiguous()) for n, t in group]
                body = proto.distributed_update_request(
                    tensors, group_name=s.weight_group_name, flush_cache=False, weight_version=None
                )
                pending = pool.submit(self._call, "/update_weights_from_distributed", body)
                works = [dist.broadcast(t, src=0, group=self._group, async_op=True) for _, t in tensors]
                for work in works:
                    work.wait()
                pending.result()  # the server has loaded this bucket; tensors may be freed

    def weight_checksums(
        self, names: Sequence[str] | None = None, *, max_rows: int | None = 64
    ) -> dict[str, str]:
        """``tensor_fingerprint`` of named weights read back with ``/get_weights_by_name``.

        Exact for ``tp_size == 1``. With engine TP the server returns its rank-0 shard, which
        matches the full tensor's first rows only for column-parallel (dim-0 sharded) weights.
        """
        if names is None:
            raise ValueError("SGLangEngine.weight_checksums needs explicit HF names")
        arch = self.architecture
        if arch is not None and proto.have_sglang() and not sglang_contract.serves_weights_by_name(arch):
            raise NotImplementedError(
                f"SGLang's {arch} has no get_weights_by_name (sglang {proto.sglang_version()}): "
                "weight fingerprints cannot be read back from this model; use "
                "weight_sync.verify=probe"
            )
        rows = max_rows if max_rows is not None else 2**31 - 1
        out = {}
        for name in names:
            values = self._call("/get_weights_by_name", proto.get_weights_request(name, rows))
            out[name] = tensor_fingerprint(torch.tensor(values, dtype=torch.float32), None)
        return out

    # ------------------------------------------------------------------ memory and cache

    def release_memory(self) -> None:
        """Flush, then release every memory tag: weights, KV cache, CUDA graphs
        (torch_memory_saver; colocated only)."""
        if self._released:
            return
        self.flush_cache()
        self._call("/release_memory_occupation", proto.memory_request(list(proto.RELEASE_TAGS), resume=False))
        self._released = set(proto.RELEASE_TAGS)
        if not self.cfg.sglang.enable_weights_cpu_backup:
            self._weights_valid = False

    def resume_memory(self) -> None:
        """Re-acquire released memory: weights, then KV cache, then CUDA graphs."""
        self._resume([t for t in proto.RELEASE_TAGS if t in self._released])

    def _resume(self, tags: list[str]) -> None:
        for tag in tags:
            self._call("/resume_memory_occupation", proto.memory_request([tag], resume=True))
            self._released.discard(tag)

    def flush_cache(self) -> None:
        """Flush the radix cache; SGLang refuses while requests run, so retry until timeout."""
        deadline = time.monotonic() + self.cfg.sglang.control_timeout_s
        while True:
            resp = self._http.post(self.base_url + "/flush_cache", timeout=self.cfg.sglang.control_timeout_s)
            if resp.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"SGLang /flush_cache kept failing: {resp.text[:300]}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ status

    def health(self) -> bool:
        """Server answers ``/health`` (and, when owned, its process is alive)."""
        import requests

        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            return self._http.get(self.base_url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Hit rate from the ``cached_tokens`` SGLang reports per request."""
        if self._prompt_tokens == 0:
            return None
        return PrefixCacheStats(prompt_tokens=self._prompt_tokens, cached_tokens=self._cached_tokens)

    def reset_prefix_cache_stats(self) -> None:
        """Start counting anew (e.g. once per RL step)."""
        self._prompt_tokens = self._cached_tokens = 0

    @property
    def weight_version(self) -> int:
        """Version of the last completed ``update_weights`` (0 = launch checkpoint)."""
        return self._version

    def shutdown(self) -> None:
        """Terminate an owned server's whole process group; close the HTTP session."""
        self._terminate()
        self._http.close()

    def _terminate(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
        logger.error("SGLang server pid %d did not exit", proc.pid)


def check_fp8_servable(model_dir, architecture: str | None) -> None:  # noqa: ANN001
    """Refuse to serve a blockwise FP8 folder (``quantization_config.weight_block_size``) with
    an SGLang model class whose loader drops the block scales (read from the installed source:
    ``sglang_contract.SGLangSource.drops_block_fp8_scales``)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "config.json"
    quant = json.loads(path.read_text()).get("quantization_config") or {} if path.is_file() else {}
    if quant.get("quant_method") == "fp8" and quant.get("weight_block_size"):
        _refuse_block_fp8(architecture, f"{model_dir} holds blockwise FP8 weights")


def _refuse_block_fp8(architecture: str | None, what: str) -> None:
    if architecture is None or not proto.have_sglang():
        return
    if sglang_contract.installed_source().drops_block_fp8_scales(architecture):
        raise ConfigError(
            f"{what}, but SGLang {proto.sglang_version()}'s {architecture} loader renames "
            "'.weight_scale_inv' to '.weight_scale' and silently drops every block scale "
            f"(upstream {sglang_contract.FP8_SCALE_ISSUE}): the engine would serve garbage. "
            "Serve this model family in bf16 (precision.rollout_fp8=false) or use a "
            "Qwen2/Qwen3 model for FP8 rollout"
        )


def hf_manifest(model_dir) -> dict[str, tuple[int, ...]]:  # noqa: ANN001
    """HF name -> shape of every tensor in a model folder's safetensors files (headers only).

    A tied ``lm_head.weight`` absent from the files is added with the embedding's shape, since
    trainers commonly export it.
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    model_dir = Path(model_dir)
    manifest: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                manifest[name] = tuple(fh.get_slice(name).get_shape())
    if not manifest:
        raise InputError(f"{model_dir}: no *.safetensors files to read the weight manifest from")
    config = json.loads((model_dir / "config.json").read_text())
    embed = manifest.get("model.embed_tokens.weight")
    if config.get("tie_word_embeddings") and embed and "lm_head.weight" not in manifest:
        manifest["lm_head.weight"] = embed
    return manifest


def _spawn(argv: Sequence[str]) -> subprocess.Popen:
    # start_new_session: the server and its scheduler/detokenizer children share one process
    # group that _terminate() can signal as a whole.
    return subprocess.Popen([sys.executable, "-m", "sglang.launch_server", *argv], start_new_session=True)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host

