"""Every document the repository cites ships with it.

Users only have the checkout: a file may cite docs/*.md, tests/* and package-module paths that
exist, and no reference document kept outside the repository (the development notes the project was built
from). The names are assembled from pieces so that this file does not cite them itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Reference documents that never ship (their bare names, as code comments used to cite them).
_OUTSIDE_STEMS = ("RPT_" + "PAPER", "MEGATRON_" + "ON_CPU", "ANCHORS", "STYLE", "DEPENDENCIES",
                  "GPU_" + "PATH_AUDIT", "CODE_" + "REVIEW", "FIDELITY_" + "REVIEW",
                  "RELIABILITY_" + "REVIEW")  # fmt: skip
_OUTSIDE = re.compile(
    r"\b(?:" + "|".join(_OUTSIDE_STEMS) + r")\.md\b|\b(?:RPT_" + r"PAPER|MEGATRON_" + r"ON_CPU|"
    r"GPU_" + r"PATH_AUDIT|CODE_" + r"REVIEW|FIDELITY_" + r"REVIEW|RELIABILITY_" + r"REVIEW)\b"
    r"|shared/" + r"docs"
)
# A repository path: docs/NAME.md or tests/.../name.py|.md|.sh (not preceded by another folder,
# so Megatron-LM's ``tools/...`` or an upstream ``.../docs/x.md`` is not taken for ours).
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:docs|tests)/[\w/.-]*?\.(?:md|py|sh))\b")
# A module of the package, written with or without the leading ``megatron_rpt/``.
_PACKAGES = sorted(p.name for p in (ROOT / "megatron_rpt").iterdir() if (p / "__init__.py").is_file())
_MODULE_PATH = re.compile(r"(?<![\w/.-])(?:megatron_rpt/)?((?:" + "|".join(_PACKAGES) + r")/[\w/]+\.py)\b")
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".sh", ".yaml", ".yml", ".ini", ""}


def tracked_files() -> list[Path]:
    """Text files under version control (every file under the root without git)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()  # fmt: skip
        files = [ROOT / name for name in out]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in _TEXT_SUFFIXES]


def outside_citations(text: str) -> list[str]:
    """The names of outside reference documents that ``text`` cites."""
    return [m.group(0) for m in _OUTSIDE.finditer(text)]


def missing_paths(text: str, root: Path) -> list[str]:
    """docs/, tests/ and package-module paths cited in ``text`` that do not exist under ``root``."""
    missing = {p for p in _REPO_PATH.findall(text) if not (root / p).exists()}
    missing |= {p for p in _MODULE_PATH.findall(text) if not (root / "megatron_rpt" / p).exists()}
    return sorted(missing)


def test_scanners_catch_what_they_must() -> None:
    """Negative cases: the two scanners find an outside citation and a missing doc."""
    assert outside_citations("see " + "RPT_" + "PAPER.md section 2") != []
    assert outside_citations("(" + "ANCHORS" + ".md §3)") != []
    assert outside_citations("../" + "shared/" + "docs/x") != []
    assert outside_citations("docs/METHOD.md §2; a STYLE guide; anchors") == []
    assert missing_paths("see docs/NO_SUCH_PAGE.md", ROOT) == ["docs/NO_SUCH_PAGE.md"]
    assert missing_paths("tests/gpu/no_such_test.py", ROOT) == ["tests/gpu/no_such_test.py"]
    assert missing_paths("docs/METHOD.md, upstream tools/preprocess_data.py", ROOT) == []
    assert missing_paths("see trainer/no_such_module.py", ROOT) == ["trainer/no_such_module.py"]
    assert missing_paths("trainer/step.py, megatron_rpt/model/build.py", ROOT) == []


@pytest.mark.parametrize("check", ["outside", "missing"])
def test_every_cited_document_ships(check: str) -> None:
    bad = []
    for path in tracked_files():
        if path == Path(__file__).resolve():  # its negative cases cite missing pages on purpose
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found = outside_citations(text) if check == "outside" else missing_paths(text, ROOT)
        bad += [f"{path.relative_to(ROOT)}: {item}" for item in found]
    assert not bad, "cited documents that are not in the repository:\n" + "\n".join(bad)


def test_docs_links_resolve() -> None:
    """Relative markdown links between pages of docs/ point to pages that exist."""
    bad = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", page.read_text("utf-8")):
            if not (page.parent / target).exists():
                bad.append(f"{page.name} -> {target}")
    assert not bad, bad
