"""A fake SGLang HTTP server on 127.0.0.1 for CPU tests of the SGLang client (tests only).

It parses every request body with sglang's own classes, the way sglang's FastAPI routes do
(pydantic ``TypeAdapter`` over ``GenerateReqInput`` / the msgspec request structs, which decodes
the base64 ``serialized_named_tensors``), deserializes weight buckets with sglang's
``MultiprocessingSerializer`` + ``FlattenedTensorBucket``, and answers in sglang's response
format. Generation is delegated to an in-process ``HFEngine`` (a real model), so log-probs and
greedy outputs can be checked against a reference; ``cached_tokens`` comes from a radix-cache
simulation. Releasing the ``weights`` tag zeroes the model, as SGLang discards the memory.

Only the endpoints megatron_rpt uses exist. Each handled call is appended to ``calls``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from megatron_rpt.rollout.hf_engine import HFEngine
from megatron_rpt.rollout.scheduling import RadixCacheSim
from megatron_rpt.rollout.types import SamplingParams


class FakeSGLangServer:
    """``with FakeSGLangServer(engine) as srv: SGLangEngine.connect(srv.url, cfg)``."""

    def __init__(self, engine: HFEngine, *, tp_size: int = 1, weights_by_name: bool = True) -> None:
        from pydantic import TypeAdapter
        from sglang.srt.managers import io_struct as io

        self.engine = engine
        self.tp_size = tp_size
        self.weights_by_name = weights_by_name  # False: answer like SGLang's Qwen2/Qwen3 (400)
        self.calls: list[tuple[str, dict]] = []
        self.released: set[str] = set()
        self.rank_entries: list[int] = []
        """Per /update_weights_from_tensor: distinct serialized entries (1: one copy for all)."""
        self.version = "0"
        self.cache = RadixCacheSim()
        self._lock = threading.Lock()
        self._adapters = {
            "/generate": TypeAdapter(io.GenerateReqInput),
            "/update_weights_from_tensor": TypeAdapter(io.UpdateWeightsFromTensorReqInput),
            "/get_weights_by_name": TypeAdapter(io.GetWeightsByNameReqInput),
            "/release_memory_occupation": TypeAdapter(io.ReleaseMemoryOccupationReqInput),
            "/resume_memory_occupation": TypeAdapter(io.ResumeMemoryOccupationReqInput),
            "/update_weight_version": TypeAdapter(io.UpdateWeightVersionReqInput),
        }
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeSGLangServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def paths(self) -> list[str]:
        """The endpoint of every call so far, in order."""
        return [p for p, _ in self.calls]

    # ------------------------------------------------------------------ handlers

    def handle(self, path: str, body: dict) -> tuple[int, Any]:
        with self._lock:  # one request at a time, like SGLang's single scheduler
            self.calls.append((path, body))
            if path == "/health":
                return 200, {}
            if path == "/flush_cache":
                self.cache = RadixCacheSim()
                return 200, "Cache flushed."
            req = self._adapters[path].validate_python(body)
            return getattr(self, "_" + path.strip("/"))(req)

    def _generate(self, req) -> tuple[int, Any]:  # noqa: ANN001
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

        sps = req.sampling_params if isinstance(req.sampling_params, list) else None
        n = 1 if sps is not None else int(req.sampling_params.get("n", 1))
        out = []
        for i, ids in enumerate(req.input_ids):
            sp = sps[i] if sps is not None else req.sampling_params
            SGLSamplingParams(**sp).verify(vocab_size=self.engine.model.config.vocab_size)
            params = _our_params(sp, n, bool(req.return_logprob))
            for c in self.engine.generate([ids], params)[0]:
                cached = self.cache.match(ids)
                self.cache.insert(ids)
                out.append(self._output(c, sp, len(ids), cached))
        return 200, out

    def _output(self, c, sp: dict, prompt_len: int, cached: int) -> dict:  # noqa: ANN001
        if c.finish_reason == "box":
            reason = {"type": "stop", "matched": sp["stop_regex"][0]}
        elif c.finish_reason == "stop":
            reason = {"type": "stop", "matched": c.token_ids[-1]}
        else:
            reason = {"type": "length", "length": len(c.token_ids)}
        meta = {
            "finish_reason": reason, "prompt_tokens": prompt_len, "cached_tokens": cached,
            "completion_tokens": len(c.token_ids), "weight_version": self.version,
        }  # fmt: skip
        if c.logprobs is not None:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
        return {"text": c.text, "output_ids": c.token_ids, "meta_info": meta}

    def _update_weights_from_tensor(self, req) -> tuple[int, Any]:  # noqa: ANN001
        from megatron_rpt.rollout.sglang_protocol import decode_tensor_bucket

        if req.load_format != "flattened_bucket" or len(req.serialized_named_tensors) != self.tp_size:
            return 400, {"success": False, "message": "bad load_format or tp entries"}
        # Each engine TP rank reads its own entry (SGLang's deserialize_own_rank); they must
        # describe the same tensors. Rank 0's copy is loaded.
        per_rank = [decode_tensor_bucket(s) for s in req.serialized_named_tensors]
        if any([n for n, _ in r] != [n for n, _ in per_rank[0]] or not all(
            torch.equal(a, b) for (_, a), (_, b) in zip(r, per_rank[0], strict=True)
        ) for r in per_rank):
            return 400, {"success": False, "message": "TP ranks were sent different tensors"}
        named = per_rank[0]
        self.rank_entries.append(len(set(req.serialized_named_tensors)))
        try:
            self.engine.update_weights(named, version=self.engine.weight_version)
        except Exception as exc:  # noqa: BLE001 - report like SGLang does
            return 400, {"success": False, "message": str(exc)}
        if req.weight_version is not None:
            self.version = req.weight_version
        return 200, {"success": True, "message": "Success"}

    def _get_weights_by_name(self, req) -> tuple[int, Any]:  # noqa: ANN001
        if not self.weights_by_name:
            return 400, {"error": {"message": "Get parameter by name failed"}}
        table = dict(self.engine.model.named_parameters(remove_duplicate=False))
        if req.name not in table:
            return 400, {"error": {"message": f"unknown parameter {req.name}"}}
        return 200, table[req.name].detach().float()[: req.truncate_size].tolist()

    def _release_memory_occupation(self, req) -> tuple[int, Any]:  # noqa: ANN001
        tags = set(req.tags or ("weights", "kv_cache", "cuda_graph"))
        if "weights" in tags:
            with torch.no_grad():
                for p in self.engine.model.parameters():
                    p.zero_()  # SGLang discards released weight memory (no CPU backup)
        self.released |= tags
        return 200, None

    def _resume_memory_occupation(self, req) -> tuple[int, Any]:  # noqa: ANN001
        self.released -= set(req.tags or ("weights", "kv_cache", "cuda_graph"))
        return 200, None

    def _update_weight_version(self, req) -> tuple[int, Any]:  # noqa: ANN001
        self.version = req.new_version
        return 200, {"success": True, "message": "ok", "new_version": req.new_version}


def _our_params(sp: dict, n: int, logprobs: bool) -> SamplingParams:
    top_k = int(sp.get("top_k", -1))
    return SamplingParams(
        temperature=float(sp.get("temperature", 1.0)),
        top_p=float(sp.get("top_p", 1.0)),
        top_k=-1 if top_k >= 1 << 30 else top_k,
        max_new_tokens=int(sp.get("max_new_tokens", 128)),
        n=n,
        seed=sp.get("sampling_seed"),
        stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
        stop_at_final_box=bool(sp.get("stop_regex")),
        return_logprobs=logprobs,
    )


def _handler(server: FakeSGLangServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: Any) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            try:
                status, payload = server.handle(self.path.split("?")[0], body)
            except Exception as exc:  # noqa: BLE001 - validation errors become 400s
                status, payload = 400, {"error": {"message": f"{type(exc).__name__}: {exc}"}}
            self._reply(status, payload)

        do_GET = do_POST = _dispatch

        def log_message(self, *args: object) -> None:
            return None

    return Handler
