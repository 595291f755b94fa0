"""The Megatron-Core and Transformer Engine surface model/fp8.py and model/specs.py rely on.

Megatron-Core is read statically (``ast``), so the same check runs on the installed 0.16.1, on
the newest release's wheel when ``make gpu-wheels`` has fetched it (Python 3.12 only: not
installable here), and on a deliberately altered copy, which must fail. Transformer Engine
cannot be installed on CPU: what the project uses of it is compared with the surface of TE
v2.9-v2.11 (the ``gpu-te`` extra's range), pinned below as data read from TE's source.
"""

from __future__ import annotations

import ast
import shutil
import zipfile
from pathlib import Path

import pytest

from megatron_rpt.model.config import PrecisionConfig

ROOT = Path(__file__).resolve().parents[2]

# Transformer Engine v2.9-v2.11: transformer_engine.pytorch exports (pytorch/__init__.py, the
# support checks in pytorch/quantization.py, all with return_reason=), recipe classes
# (common/recipe/__init__.py) and DotProductAttention.forward keywords
# (pytorch/attention/dot_product_attention/dot_product_attention.py).
TE_PYTORCH_EXPORTS = {
    "is_fp8_available", "is_fp8_block_scaling_available", "is_mxfp8_available",
    "DotProductAttention", "fp8_autocast", "autocast",
}  # fmt: skip
TE_RECIPES = {"DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling"}
TE_DPA_FORWARD_KEYWORDS = {
    "attention_mask", "qkv_format", "cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded",
    "cu_seqlens_kv_padded", "max_seqlen_q", "max_seqlen_kv", "attn_mask_type", "window_size",
    "checkpoint_core_attention", "core_attention_bias_type", "core_attention_bias",
    "alibi_slopes", "fast_zero_fill", "inference_params", "pad_between_seqs",
}  # fmt: skip

MEGATRON_FILES = (
    "core/transformer/transformer_config.py", "core/model_parallel_config.py", "core/enums.py",
    "core/models/gpt/gpt_layer_specs.py", "core/extensions/transformer_engine.py",
    "core/utils.py",
)  # fmt: skip


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef)}


def _fields(cls: ast.ClassDef) -> set[str]:
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def _args(fn: ast.FunctionDef, module: ast.Module | None = None) -> set[str]:
    """Parameter names of ``fn``; a ``(*args, **kwargs)`` wrapper (megatron-core >= 0.17's
    layer-spec functions) is followed into the functions of ``module`` it forwards to."""
    a = fn.args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    if module is not None and a.vararg and a.kwarg:
        local = {f.name: f for f in module.body if isinstance(f, ast.FunctionDef)}
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in local:
                names |= _args(local[call.func.id], module)
    return names


def _function(path: Path, name: str, cls: str | None = None) -> ast.FunctionDef | None:
    scope = _classes(path).get(cls).body if cls else _tree(path).body  # type: ignore[union-attr]
    return next((f for f in scope if isinstance(f, ast.FunctionDef) and f.name == name), None)


def megatron_problems(root: Path) -> list[str]:
    """How the ``megatron`` package at ``root`` breaks what the project sets or calls."""
    from megatron_rpt.model.fp8 import TE_RECIPE_CLASS, fp8_transformer_kwargs

    kwargs = fp8_transformer_kwargs(PrecisionConfig(fp8="delayed", first_last_layers_bf16=False), num_layers=4)
    kwargs |= fp8_transformer_kwargs(PrecisionConfig(fp8="tensorwise", first_last_layers_bf16=True), num_layers=4)
    wanted = set(kwargs) | {"qk_clip", "log_max_attention_logit"}  # specs.py reads the last two
    have = _fields(_classes(root / "core/transformer/transformer_config.py")["TransformerConfig"])
    have |= _fields(_classes(root / "core/model_parallel_config.py")["ModelParallelConfig"])
    problems = [f"TransformerConfig.{f} missing" for f in sorted(wanted - have)]
    recipe = _classes(root / "core/enums.py").get("Fp8Recipe")
    values = {s.value.value for s in recipe.body if isinstance(s, ast.Assign)} if recipe else set()
    problems += [f"Fp8Recipe.{r} missing" for r in TE_RECIPE_CLASS if r not in values]
    specs = root / "core/models/gpt/gpt_layer_specs.py"
    for fn, args in (("get_gpt_layer_with_transformer_engine_spec", {"qk_layernorm"}),
                     ("get_gpt_layer_local_spec", {"qk_layernorm", "normalization"})):  # fmt: skip
        node = _function(specs, fn)
        have = _args(node, _tree(specs)) if node else set()
        problems += [f"{fn}({a}=) missing" for a in sorted(args - have)]
    forward = _function(root / "core/extensions/transformer_engine.py", "forward", "TEDotProductAttention")
    need = {"query", "key", "value", "attention_mask", "attn_mask_type", "attention_bias", "packed_seq_params"}
    problems += [f"TEDotProductAttention.forward({a}) missing" for a in sorted(need - (_args(forward) if forward else set()))]
    utils = {f.name for f in _tree(root / "core/utils.py").body if isinstance(f, ast.FunctionDef)}
    problems += [f"megatron.core.utils.{f} missing" for f in ("is_te_min_version", "get_te_version") if f not in utils]
    return problems


def _installed_megatron() -> Path:
    import importlib.util

    return Path(next(iter(importlib.util.find_spec("megatron").submodule_search_locations)))


def test_installed_megatron_core_has_every_field_and_hook():
    assert megatron_problems(_installed_megatron()) == []


def test_newest_megatron_core_wheel_has_every_field_and_hook(tmp_path):
    wheels = sorted((ROOT / ".whl" / "gpu").glob("megatron_core-*.whl"))
    newest = [w for w in wheels if not w.name.startswith("megatron_core-0.16.")]
    if not newest:
        pytest.skip("no newer megatron-core wheel in .whl/gpu (make gpu-wheels downloads it)")
    for wheel in newest:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp_path / wheel.stem, members=[f"megatron/{f}" for f in MEGATRON_FILES])
        assert megatron_problems(tmp_path / wheel.stem / "megatron") == [], wheel.name


def test_altered_megatron_core_fails(tmp_path):
    root = tmp_path / "megatron"
    for rel in MEGATRON_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_installed_megatron() / rel, root / rel)
    path = root / "core/transformer/transformer_config.py"
    path.write_text(path.read_text().replace("    fp8_recipe:", "    fp8_quantization_recipe:"))
    path = root / "core/enums.py"
    path.write_text(path.read_text().replace('    blockwise = "blockwise"\n', ""))
    problems = megatron_problems(root)
    assert "TransformerConfig.fp8_recipe missing" in problems
    assert "Fp8Recipe.blockwise missing" in problems


def _te_names_used() -> tuple[set[str], set[str], set[str]]:
    """(transformer_engine.pytorch attributes, recipe classes, TE DotProductAttention.forward
    keywords) that model/fp8.py and model/specs.py use, read from their source."""
    from megatron_rpt.model import fp8

    exports = set()
    for node in ast.walk(_tree(ROOT / "megatron_rpt/model/fp8.py")):
        if isinstance(node, ast.FunctionDef) and node.name == "recipe_support":
            dicts = [d for d in ast.walk(node) if isinstance(d, ast.Dict)]
            exports |= {v.value for v in dicts[0].values}  # the public support checks
    keywords = set()
    for node in ast.walk(_tree(ROOT / "megatron_rpt/model/specs.py")):
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "forward" and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name) and node.func.value.func.id == "super"
            and node.func.value.args  # super(TEDotProductAttention, self): TE's own forward
        ):  # fmt: skip
            keywords |= {k.arg for k in node.keywords}
    return exports, set(fp8.TE_RECIPE_CLASS.values()), keywords


def test_project_uses_only_the_pinned_transformer_engine_surface():
    exports, recipes, keywords = _te_names_used()
    assert exports == {"is_fp8_available", "is_fp8_block_scaling_available", "is_mxfp8_available"}
    assert keywords >= {"qkv_format", "cu_seqlens_q", "attn_mask_type"}  # the reader found the call
    assert exports <= TE_PYTORCH_EXPORTS
    assert recipes <= TE_RECIPES
    assert keywords <= TE_DPA_FORWARD_KEYWORDS
