r"""What megatron_rpt needs from SGLang, checked statically against an SGLang source tree.

Most of SGLang cannot be imported without CUDA kernels, so the server side is read with
``ast``: the HTTP routes the client calls, the fields of the request classes it fills, the
sampling keys it sends, and, per served architecture (Llama, Qwen2, Qwen3), the model class's
methods, the ``stacked_params_mapping`` of its ``load_weights`` and the module attributes the
HF names land on. ``check_contract`` returns one line per broken promise (empty = all kept), so
a pin moved to a release that renames a route or a field fails a CPU test instead of the first
GPU run (tests/unit/test_sglang_contract.py).

Two facts are also used at run time, from the installed source:

* ``serves_weights_by_name(arch)``: only some SGLang models implement
  ``get_weights_by_name`` (Llama does; Qwen2 and Qwen3 do not, and their
  ``/get_weights_by_name`` answers HTTP 400), so weight fingerprints
  (``weight_sync.verify=checksum|full``) are refused up front for the others;
* ``drops_block_fp8_scales(arch)``: a ``load_weights`` that renames ``.weight_scale_inv`` to
  ``.weight_scale`` loses every blockwise FP8 scale (Llama, until sgl-project/sglang#30234 is
  merged), so FP8 rollout into such a model is refused instead of serving garbage.

Shapes: none (names only).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

from megatron_rpt.conversion.mappings import hf_names, mapping_table
from megatron_rpt.model.arch import arch_from_dict

TESTED_VERSIONS = ("0.5.17", "0.5.23")
"""SGLang releases this contract was checked against: 0.5.17 is the ``gpu-rollout`` pin
(torch 2.11), 0.5.23 the CPU CI's ``--no-deps`` install (requirements/sglang-cpu-nodeps.txt)."""

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
FP8_SCALE_ISSUE = "sgl-project/sglang#30234"

ROUTES = (
    "/generate", "/health", "/flush_cache", "/update_weights_from_tensor",
    "/init_weights_update_group", "/update_weights_from_distributed",
    "/release_memory_occupation", "/resume_memory_occupation", "/update_weight_version",
    "/get_weights_by_name",
)  # fmt: skip
"""Every route sglang_engine.py calls."""

REQUEST_FIELDS: dict[str, tuple[str, ...]] = {
    "GenerateReqInput": ("input_ids", "sampling_params", "return_logprob", "stream"),
    "UpdateWeightsFromTensorReqInput": (
        "serialized_named_tensors", "load_format", "flush_cache", "weight_version",
    ),
    "InitWeightsUpdateGroupReqInput": (
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend",
    ),
    "UpdateWeightsFromDistributedReqInput": (
        "names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version",
    ),
    "ReleaseMemoryOccupationReqInput": ("tags",),
    "ResumeMemoryOccupationReqInput": ("tags",),
    "UpdateWeightVersionReqInput": ("new_version", "abort_all_requests"),
    "GetWeightsByNameReqInput": ("name", "truncate_size"),
}  # fmt: skip
"""io_struct class -> the fields sglang_protocol.py sets."""

SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "max_new_tokens", "n", "no_stop_trim",
    "skip_special_tokens", "stop_token_ids", "stop_regex", "sampling_seed",
)  # fmt: skip
"""Keys of ``sampling_params`` that sglang_protocol.sampling_params_dict sends."""

MODEL_METHODS = ("load_weights",)
"""Methods every served architecture must have (the weight push calls ``load_weights``)."""

STACKED = {("qkv_proj", "q_proj"), ("qkv_proj", "k_proj"), ("qkv_proj", "v_proj"),
           ("gate_up_proj", "gate_proj"), ("gate_up_proj", "up_proj")}  # fmt: skip
"""(fused parameter, HF shard) pairs the planner relies on for q/k/v and gate/up."""

_LEAF_LAYERS = {
    "QKVParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear",
    "ColumnParallelLinear", "ReplicatedLinear", "RMSNorm", "VocabParallelEmbedding",
    "ParallelLMHead",
}  # fmt: skip
_LEAF_PARAMS = ("weight", "bias")


def installed_root() -> Path:
    """The installed ``sglang`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("sglang is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def installed_source() -> SGLangSource:
    """``SGLangSource`` of the installed sglang (parsed once per process)."""
    return SGLangSource(installed_root())


CONTRACT_FILES = (
    "srt/entrypoints/http_server.py", "srt/managers/io_struct.py",
    "srt/sampling/sampling_params.py", "srt/models/",
)  # fmt: skip
"""The parts of an sglang tree the contract reads (what ``from_wheel`` extracts)."""


class SGLangSource:
    """An sglang package folder (``.../sglang``) read with ``ast``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._trees: dict[Path, ast.Module] = {}
        self._classes: dict[str, Path] | None = None

    @classmethod
    def from_wheel(cls, wheel: str | Path, dest: str | Path) -> SGLangSource:
        """Extract the contract's files of an sglang wheel (not installed: its pins may not
        fit this machine) into ``dest`` and read them there."""
        import zipfile

        with zipfile.ZipFile(wheel) as zf:
            wanted = [n for n in zf.namelist() if n.startswith("sglang/")
                      and any(n[len("sglang/"):].startswith(f) for f in CONTRACT_FILES)]  # fmt: skip
            zf.extractall(dest, members=wanted)
        return cls(Path(dest) / "sglang")

    def _tree(self, rel: str | Path) -> ast.Module:
        path = self.root / rel
        if path not in self._trees:
            self._trees[path] = ast.parse(path.read_text(), filename=str(path))
        return self._trees[path]

    # ------------------------------------------------------------------ server surface

    def routes(self) -> set[str]:
        """Paths of every ``@app.get/post/api_route`` in the HTTP server."""
        out = set()
        for node in ast.walk(self._tree("srt/entrypoints/http_server.py")):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and deco.func.attr in ("get", "post", "put", "api_route") and deco.args
                    and isinstance(deco.args[0], ast.Constant)
                ):  # fmt: skip
                    out.add(deco.args[0].value)
        return out

    def class_fields(self, rel: str, name: str) -> set[str]:
        """Annotated fields of class ``name`` in ``rel`` (with its bases in the same file)."""
        classes = {n.name: n for n in self._tree(rel).body if isinstance(n, ast.ClassDef)}
        if name not in classes:
            return set()
        node, out = classes[name], set()
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out.add(stmt.target.id)
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out |= self.class_fields(rel, base.id)
        return out

    # ------------------------------------------------------------------ models

    def _model_classes(self) -> dict[str, Path]:
        """Class name -> the srt/models file defining it (a text scan; files are parsed only
        when one of their classes is looked at)."""
        if self._classes is None:
            self._classes = {}
            for path in sorted((self.root / "srt/models").glob("*.py")):
                for match in re.finditer(r"^class (\w+)\b", path.read_text(), re.M):
                    self._classes.setdefault(match.group(1), path)
        return self._classes

    def _class(self, name: str) -> ast.ClassDef | None:
        path = self._model_classes().get(name)
        if path is None:
            return None
        try:
            tree = self._tree(path.relative_to(self.root))
        except SyntaxError:
            return None
        return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)

    def _lineage(self, name: str) -> list[ast.ClassDef]:
        """``name`` and its base classes that are defined in srt/models (nearest first)."""
        out, todo = [], [name]
        while todo:
            node = self._class(todo.pop(0))
            if node is None or node in out:
                continue
            out.append(node)
            todo += [b.id for b in node.bases if isinstance(b, ast.Name)]
        return out

    def has_model(self, arch: str) -> bool:
        """An SGLang model class named ``arch`` exists."""
        return arch in self._model_classes()

    def methods(self, arch: str) -> set[str]:
        """Methods of ``arch``, inherited ones included."""
        return {
            f.name for c in self._lineage(arch) for f in c.body
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        }  # fmt: skip

    def _load_functions(self, arch: str) -> list[ast.FunctionDef]:
        # the default load path: load_weights, plus the legacy loader it dispatches to
        names = ("load_weights", "_legacy_load_weights")
        return [f for c in self._lineage(arch) for f in c.body
                if isinstance(f, ast.FunctionDef) and f.name in names]  # fmt: skip

    def stacked_params_mapping(self, arch: str) -> set[tuple[str, str]]:
        """(fused parameter, HF shard) pairs of the ``stacked_params_mapping`` list in
        ``load_weights``, dots stripped (``(".qkv_proj", ".q_proj", "q")`` -> qkv_proj, q_proj)."""
        out = set()
        for fn in self._load_functions(arch):
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                    and any(isinstance(t, ast.Name) and t.id == "stacked_params_mapping"
                            for t in node.targets)
                ):  # fmt: skip
                    for elt in node.value.elts:
                        if isinstance(elt, ast.Tuple) and len(elt.elts) >= 2:
                            pair = [e.value for e in elt.elts[:2] if isinstance(e, ast.Constant)]
                            if len(pair) == 2:
                                out.add((pair[0].strip("."), pair[1].strip(".")))
        return out

    def drops_block_fp8_scales(self, arch: str) -> bool:
        """``load_weights`` renames ``.weight_scale_inv`` (the blockwise FP8 scale) to
        ``.weight_scale``, a name block-quantized linear layers do not register."""
        for fn in self._load_functions(arch):
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "replace" and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) for a in node.args)
                    and node.args[0].value == ".weight_scale_inv"
                    and node.args[1].value == ".weight_scale"
                ):  # fmt: skip
                    return True
        return False

    def module_attributes(self, arch: str) -> set[str]:
        """Every ``self.<attr> = ...`` module of ``arch``'s classes, followed through the
        model classes their constructors name (decoder layers, attention, MLP)."""
        classes, seen, attrs = self._model_classes(), set(), set()
        todo = [arch]
        while todo:
            name = todo.pop()
            if name in seen or name not in classes:
                continue
            seen.add(name)
            for node in self._lineage(name):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Assign):
                        targets = [e for t in sub.targets for e in getattr(t, "elts", [t])]
                        attrs |= {t.attr for t in targets if _is_self_attr(t)}
                    elif isinstance(sub, ast.Name) and sub.id in classes and sub.id not in seen:
                        todo.append(sub.id)
        return attrs

    def rejected_names(self, arch: str, hf_names: Iterable[str]) -> list[str]:
        """HF names that ``arch``'s ``load_weights`` would not land on a parameter: after the
        stacked mapping, every module in the name must be an attribute of the model's classes
        and the tensor a weight or bias. Names with ``.weight_scale_inv`` are rejected when the
        loader drops block scales."""
        mapping, attrs = self.stacked_params_mapping(arch), self.module_attributes(arch)
        bad = []
        for name in hf_names:
            if name.endswith(".weight_scale_inv"):
                if self.drops_block_fp8_scales(arch):
                    bad.append(name)
                name = name.removesuffix("_scale_inv")
            for fused, shard in mapping:
                if f".{shard}." in f".{name}":
                    name = name.replace(shard, fused)
                    break
            *modules, leaf = name.split(".")
            ok = leaf in _LEAF_PARAMS and all(m.isdigit() or m in attrs for m in modules)
            if not ok and name not in bad:
                bad.append(name)
        return bad


def _is_self_attr(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def check_contract(src: SGLangSource, archs: Iterable[str] = ARCHITECTURES) -> list[str]:
    """Every way ``src`` breaks what megatron_rpt relies on (empty list: the contract holds)."""
    problems = [f"route {r} missing from srt/entrypoints/http_server.py"
                for r in ROUTES if r not in src.routes()]  # fmt: skip
    for cls, fields in REQUEST_FIELDS.items():
        have = src.class_fields("srt/managers/io_struct.py", cls)
        problems += [f"io_struct.{cls}.{f} missing" for f in fields if f not in have]
    have = src.class_fields("srt/sampling/sampling_params.py", "SamplingParams")
    problems += [f"SamplingParams.{k} missing" for k in SAMPLING_KEYS if k not in have]
    for arch in archs:
        if not src.has_model(arch):
            problems.append(f"model class {arch} missing from srt/models")
            continue
        problems += [f"{arch}.{m} missing" for m in MODEL_METHODS if m not in src.methods(arch)]
        missing = STACKED - src.stacked_params_mapping(arch)
        problems += [f"{arch}.load_weights does not stack {s} into {f}" for f, s in sorted(missing)]
        bad = src.rejected_names(arch, example_hf_names(arch))
        problems += [f"{arch}.load_weights has no parameter for {n}" for n in bad]
    return problems


def example_hf_names(arch: str, layers: int = 2) -> list[str]:
    """The HF names megatron_rpt's planner emits for a small model of ``arch`` (untied head)."""
    spec = arch_from_dict({
        "architectures": [arch], "hidden_size": 8, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_hidden_layers": layers, "intermediate_size": 16,
        "vocab_size": 10, "tie_word_embeddings": False,
    })  # fmt: skip
    out: dict[str, None] = {}
    for row in mapping_table(spec):
        for layer in range(layers) if "*" in row.megatron else [None]:
            out.update(dict.fromkeys(hf_names(row, layer)))
    return list(out)


def serves_weights_by_name(arch: str, src: SGLangSource | None = None) -> bool:
    """``/get_weights_by_name`` works for ``arch`` (its model class implements it)."""
    return "get_weights_by_name" in (src or installed_source()).methods(arch)


def architecture_of(model_dir: str | Path) -> str | None:
    """``architectures[0]`` of a model folder's config.json (None when absent)."""
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    archs = json.loads(path.read_text()).get("architectures") or [None]
    return archs[0]


def version_of(src_root: str | Path) -> str | None:
    """The version of the sglang distribution next to ``src_root`` (its dist-info), if any."""
    for info in Path(src_root).parent.glob("sglang-*.dist-info"):
        match = re.match(r"sglang-(.+)\.dist-info$", info.name)
        if match:
            return match.group(1)
    return None


__all__ = [
    "ARCHITECTURES",
    "FP8_SCALE_ISSUE",
    "TESTED_VERSIONS",
    "CONTRACT_FILES",
    "SGLangSource",
    "architecture_of",
    "check_contract",
    "example_hf_names",
    "installed_root",
    "installed_source",
    "serves_weights_by_name",
    "version_of",
]
