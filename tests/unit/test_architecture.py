"""Architecture rules enforced on the source tree (docs/ARCHITECTURE.md).

* sglang and transformer_engine are imported only in their leaf modules;
* megatron.core.parallel_state only in megatron_rpt/distributed.py;
* the library never calls print();
* every module of the package imports on a CPU-only machine without sglang or TE;
* the package order below: every import between two parts of ``megatron_rpt`` (top-level or
  inside a function) goes to a lower layer, or sideways only where ``SIDEWAYS`` allows it, so
  the parts form no cycle; the test runs its checker on a synthetic package with one upward
  import first, so it is known to catch one;
* no product module imports ``megatron_rpt.testing``.

The layers, lowest first (a part is a sub-package or a top-level module of ``megatron_rpt``)::

     0  errors
     1  fileio, capabilities
     2  config_utils, assets, dir_lock, memory
     3  cli, patches                  argument plumbing of the tools; fixes of upstream bugs
     4  distributed                   process groups (applies the patches)
     5  reward, loss                  pure: the reward, the RPT loss and log-probabilities
     6  data                          corpus -> entropy-filtered samples -> prompts
     7  model                         GPTModel, its specs, parameters, FLOPs
     8  conversion                    HF <-> Megatron names, transforms, TP shards, safetensors
     9  checkpoint, rollout           find/save/load checkpoints, directory converters; engines
    10  weight_sync                   trainer -> engine weights
    11  trainer                       the RL loop and its parts
    12  eval                          next-token accuracy, reports, scaling fits
    13  config                        the aggregate RPTConfig over every part's sub-config
    14  planning                      memory and step-time plan of an RPTConfig
    15  preflight                     the entry point's checks before any heavy work
    16  train, testing                the training entry point; the kit for users' tests

Imports under ``if TYPE_CHECKING:`` are not counted: they name a type and run nothing.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
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
    "megatron_rpt.trainer.builders",
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


# ----------------------------------------------------------------------------- package order

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("dtypes",),
    ("fileio", "capabilities"),
    ("config_utils", "assets", "dir_lock", "memory"),
    ("cli", "patches"),
    ("distributed",),
    ("reward", "loss"),
    ("data",),
    ("model",),
    ("conversion",),
    ("checkpoint", "rollout"),
    ("weight_sync",),
    ("trainer",),
    ("eval",),
    ("config",),
    ("planning",),
    ("preflight",),
    ("train", "testing"),
)
SIDEWAYS: frozenset[tuple[str, str]] = frozenset()
"""(importer, imported) pairs allowed inside one layer."""
PENDING: dict[tuple[str, str], str] = {}
"""Known upward imports (module -> module) being removed; each must still exist."""


@dataclass(frozen=True)
class Edge:
    """``src`` imports ``dst`` (modules of the scanned package) at ``line``."""

    src: str
    dst: str
    line: int
    local: bool
    """Inside a function (a function-local import)."""


def _module_names(pkg_dir: Path) -> dict[str, Path]:
    root = pkg_dir.parent
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _local_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            out.update(id(n) for n in ast.walk(node) if n is not node)
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        anchor = module.split(".") if is_pkg else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    # ``from pkg import sub`` imports the module pkg.sub when it exists
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_edges(pkg_dir: Path) -> list[Edge]:
    """Every import between two modules of the package at ``pkg_dir`` (TYPE_CHECKING excluded)."""
    modules = _module_names(pkg_dir)

    def owner(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skip, local = _type_checking_nodes(tree), _local_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skip:
                continue
            for name in _targets(node, module, path.name == "__init__.py"):
                dst = owner(name)
                if dst is not None and dst != module and dst != pkg_dir.name:
                    edges.add(Edge(module, dst, node.lineno, id(node) in local))
    return sorted(edges, key=lambda e: (e.src, e.line, e.dst))


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def layer_violations(
    edges: list[Edge],
    layers: tuple[tuple[str, ...], ...],
    sideways: frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    """Imports that go up a layer, sideways without leave, or from/to a part not in a layer."""
    rank = {part: i for i, layer in enumerate(layers) for part in layer}
    bad = []
    for e in edges:
        src, dst = _part(e.src), _part(e.dst)
        where = f"{e.src}:{e.line}{' (local)' if e.local else ''} imports {e.dst}"
        if src == dst:
            continue
        if src not in rank or dst not in rank:
            bad.append(f"{where}: {src if src not in rank else dst} is in no layer")
        elif rank[dst] > rank[src]:
            bad.append(f"{where}: layer {rank[dst]} ({dst}) is above layer {rank[src]} ({src})")
        elif rank[dst] == rank[src] and (src, dst) not in sideways:
            bad.append(f"{where}: {src} and {dst} share layer {rank[src]} (not in SIDEWAYS)")
    return bad


def package_cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected sets of two or more parts (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if _part(e.src) != _part(e.dst):
            graph.setdefault(_part(e.src), set()).add(_part(e.dst))
            graph.setdefault(_part(e.dst), set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_reports_an_upward_import_and_the_cycle_it_makes(tmp_path):
    pkg = tmp_path / "toy"
    _write(pkg / "__init__.py", "")
    _write(pkg / "errors.py", "class E(Exception):\n    pass\n")
    _write(pkg / "low" / "__init__.py", "from toy.errors import E\n")
    _write(pkg / "high.py", "from toy.low import E\n")
    _write(pkg / "typed.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toy.high\n")
    layers = (("errors",), ("low", "typed"), ("high",))
    edges = import_edges(pkg)
    assert layer_violations(edges, layers) == [] and package_cycles(edges) == []

    # the deliberate mistake: a function-local import from the low layer up to the high one
    _write(pkg / "low" / "util.py", "def f():\n    from toy import high\n    return high\n")
    edges = import_edges(pkg)
    assert layer_violations(edges, layers) == [
        "toy.low.util:2 (local) imports toy.high: layer 2 (high) is above layer 1 (low)"
    ]
    assert package_cycles(edges) == [["high", "low"]]
    # the same import, allowed sideways, is still a cycle
    assert package_cycles(edges) and not layer_violations(
        edges, (("errors",), ("low", "typed", "high")), frozenset({("low", "high"), ("high", "low")})
    )


def test_every_import_goes_down_the_package_order():
    parts = {_part(m) for m in _module_names(PKG) if m != "megatron_rpt"}
    listed = [part for layer in LAYERS for part in layer]
    assert sorted(listed) == sorted(parts), "every part of megatron_rpt is in exactly one layer"
    edges = import_edges(PKG)
    live = {(e.src, e.dst) for e in edges}
    stale = [f"{k}: {why}" for k, why in PENDING.items() if k not in live]
    assert not stale, "PENDING lists imports that are gone; delete them:\n" + "\n".join(stale)
    edges = [e for e in edges if (e.src, e.dst) not in PENDING]
    bad = layer_violations(edges, LAYERS, SIDEWAYS)
    assert not bad, "\n".join(bad)
    assert package_cycles(edges) == []
