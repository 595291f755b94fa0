"""Architecture rules enforced on the source tree (the project's layering rules).

* sglang and transformer_engine are imported only in their leaf modules;
* megatron.core.parallel_state only in megatron_rpt/distributed.py;
* the library never calls print();
* every module of the package imports on a CPU-only machine without sglang or TE.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "megatron_rpt"

# module path (relative to the repo) -> the only places allowed to import it
ALLOWED = {
    "sglang": {"megatron_rpt/rollout/sglang_engine.py", "megatron_rpt/rollout/sglang_protocol.py"},
    "sgl_kernel": set(),
    "transformer_engine": {"megatron_rpt/model/specs.py", "megatron_rpt/model/fp8.py"},
    "megatron.core.parallel_state": {"megatron_rpt/distributed.py"},
}
# capabilities.py probes everything, guarded by `except Exception`.
EXEMPT = {"megatron_rpt/capabilities.py"}


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def test_restricted_imports_only_in_leaf_modules():
    bad = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT:
            continue
        for name in set(_imports(ast.parse(path.read_text()))):
            for prefix, allowed in ALLOWED.items():
                if (name == prefix or name.startswith(prefix + ".")) and rel not in allowed:
                    bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(sorted(bad))


def test_no_print_in_library():
    offenders = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "megatron_rpt/cli.py":
            continue  # user-facing console output
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "module",
    [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in _modules()
    ],
)
def test_every_module_imports_without_gpu_extras(module):
    importlib.import_module(module)


# The RL orchestration, lowest layer first: each module may import only modules before it
# (the loop drives the source, the source calls the fleet's generate, the fleet the guarded
# engine: loop -> source -> fleet -> engine).
ORCHESTRATION = [
    "megatron_rpt.rollout.types",
    "megatron_rpt.rollout.placement",
    "megatron_rpt.rollout.routing",
    "megatron_rpt.trainer.engine_guard",
    "megatron_rpt.trainer.fleet",
    "megatron_rpt.trainer.step_batch",
    "megatron_rpt.trainer.rollout_source",
    "megatron_rpt.trainer.ntp",
    "megatron_rpt.trainer.run_state",
    "megatron_rpt.trainer.components",
    "megatron_rpt.trainer.loop",
]


def _module_imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    return set(_imports(ast.parse(path.read_text())))


def test_orchestration_import_order():
    present = [m for m in ORCHESTRATION if (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    bad = []
    for i, module in enumerate(present):
        later = present[i + 1 :]
        for name in _module_imports(module):
            for other in later:
                if name == other or name.startswith(other + "."):
                    bad.append(f"{module} imports {other}, which is above it")
    assert not bad, "\n".join(sorted(bad))


def test_product_code_has_no_test_hooks():
    bad = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("megatron_rpt/testing/"):
            continue
        text = path.read_text()
        if any(n.startswith("megatron_rpt.testing") for n in _imports(ast.parse(text))):
            bad.append(f"{rel} imports megatron_rpt.testing")
        if "MEGATRON_RPT_TEST" in text:
            bad.append(f"{rel} reads a test environment variable")
    assert not bad, "\n".join(sorted(bad))
