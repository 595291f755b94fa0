"""Collect what tools/gpu_check.sh wrote into DIR/results.json (and print a summary).

    python tools/gpu_check_report.py DIR --dry-run 0|1 --mcore-pin WHEEL --mcore-new WHEEL

One JSON: the date, the git commit, versions (Python, torch, CUDA, device, megatron-core of
the GPU steps and of the CPU suite), every step's status / seconds / time box, the pytest
counts and failing test ids of each test step (from its JUnit XML), and every benchmark JSON.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rpt.cli import FlagParser  # noqa: E402


def junit(path: Path) -> dict | None:
    """Counts and failing test ids of a JUnit XML (None when pytest did not finish)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    errors, failures = int(suite.get("errors", 0)), int(suite.get("failures", 0))
    return {"tests": total, "passed": total - skipped - errors - failures, "failed": failures,
            "errors": errors, "skipped": skipped, "failing": failed[:50]}  # fmt: skip


def main() -> int:
    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", default="0")
    p.add_argument("--mcore-pin", default="none")
    p.add_argument("--mcore-new", default="none")
    args = p.parse_args()
    out = args.out
    steps = [json.loads(line) for line in (out / "steps/steps.jsonl").read_text().splitlines() if line]
    for s in steps:
        tests = junit(out / "steps" / f"{s['name']}.xml")
        if tests is not None:
            s["tests"] = tests
    versions_file = out / "steps/versions.json"
    versions = json.loads(versions_file.read_text() or "{}") if versions_file.is_file() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()  # fmt: skip
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or None,
        "dry_run": args.dry_run == "1",
        "versions": versions | {"megatron_core_wheels": {"gpu_steps": args.mcore_pin, "cpu_suite": args.mcore_new}},
        "steps": steps,
        "bench": {f.stem: json.loads(f.read_text()) for f in sorted((out / "bench").glob("*.json"))},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for s in steps:
        counts = s.get("tests")
        extra = f" {counts['passed']} passed, {counts['failed'] + counts['errors']} failed, {counts['skipped']} skipped" if counts else ""
        print(f"{s['name']:20s} {s['status']:10s} {s['seconds']:4d}s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
