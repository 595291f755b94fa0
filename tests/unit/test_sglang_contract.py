"""The SGLang contract (rollout/sglang_contract.py) against real SGLang sources, on CPU.

* the installed sglang (CI: ``--no-deps``) and, when ``make install`` has fetched it, the wheel
  of the ``gpu-rollout`` pin (read, never installed) keep every promise for Llama, Qwen2, Qwen3;
* both versions are the ones the contract declares it was checked against;
* a deliberately altered copy of the source (a route, a request field, a stacked mapping, a
  module removed) breaks the check: the test can fail when a pin moves;
* every server flag the engine passes parses with the installed ``ServerArgs``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from megatron_rpt.rollout import sglang_contract as contract

ROOT = Path(__file__).resolve().parents[2]
PIN_WHEELS = ROOT / ".whl" / "contract"


def _gpu_pin() -> str:
    match = re.search(r'"gpu-rollout": \["sglang==([\w.]+)"\]', (ROOT / "setup.py").read_text())
    assert match, "setup.py lost its gpu-rollout sglang pin"
    return match.group(1)


@pytest.fixture(scope="module")
def installed() -> contract.SGLangSource:
    try:
        return contract.installed_source()
    except ModuleNotFoundError:
        pytest.skip("sglang not installed (make install installs it --no-deps)")


def test_installed_sglang_keeps_the_contract(installed):
    assert contract.check_contract(installed) == []
    assert contract.version_of(installed.root) in contract.TESTED_VERSIONS


def test_gpu_pin_is_a_tested_version():
    assert _gpu_pin() in contract.TESTED_VERSIONS


def test_gpu_pin_wheel_keeps_the_contract(tmp_path):
    wheels = sorted(PIN_WHEELS.glob(f"sglang-{_gpu_pin()}-*.whl"))
    if not wheels:
        pytest.skip(f"no sglang {_gpu_pin()} wheel in {PIN_WHEELS} (make install downloads it)")
    src = contract.SGLangSource.from_wheel(wheels[0], tmp_path)
    assert contract.check_contract(src) == []
    # the facts the engine decides on at run time, for the version the GPU machine serves
    assert contract.serves_weights_by_name("LlamaForCausalLM", src)
    assert not contract.serves_weights_by_name("Qwen2ForCausalLM", src)
    assert src.drops_block_fp8_scales("LlamaForCausalLM")
    assert not src.drops_block_fp8_scales("Qwen3ForCausalLM")


def test_run_time_facts_of_the_installed_source(installed):
    """What the engine refuses (weight fingerprints, FP8 into Llama) follows the source."""
    assert contract.serves_weights_by_name("LlamaForCausalLM", installed)
    assert not contract.serves_weights_by_name("Qwen2ForCausalLM", installed)
    assert not contract.serves_weights_by_name("Qwen3ForCausalLM", installed)
    assert installed.drops_block_fp8_scales("LlamaForCausalLM")
    assert not installed.drops_block_fp8_scales("Qwen2ForCausalLM")
    assert installed.rejected_names("Qwen2ForCausalLM", ["model.layers.0.self_attn.q_norm.weight"])
    assert not installed.rejected_names("Qwen3ForCausalLM", ["model.layers.0.self_attn.q_norm.weight"])


def _copy(installed: contract.SGLangSource, dest: Path) -> contract.SGLangSource:
    for rel in contract.CONTRACT_FILES:
        src = installed.root / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / rel)
    return contract.SGLangSource(dest)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_altered_source_breaks_the_contract(installed, tmp_path):
    src = _copy(installed, tmp_path / "sglang")
    assert contract.check_contract(src) == []  # the unaltered copy passes
    _edit(src.root / "srt/entrypoints/http_server.py",
          '"/update_weights_from_tensor"', '"/update_weights_from_tensor_v2"')  # fmt: skip
    _edit(src.root / "srt/managers/io_struct.py", "    truncate_size: int", "    truncate_rows: int")
    _edit(src.root / "srt/models/qwen2.py", '("gate_up_proj", "up_proj", 1),', "")
    _edit(src.root / "srt/models/qwen3.py", "self.q_norm = ", "self.query_norm = ")
    problems = contract.check_contract(contract.SGLangSource(src.root))
    assert "route /update_weights_from_tensor missing from srt/entrypoints/http_server.py" in problems
    assert "io_struct.GetWeightsByNameReqInput.truncate_size missing" in problems
    assert "Qwen2ForCausalLM.load_weights does not stack up_proj into gate_up_proj" in problems
    assert any(p.startswith("Qwen3ForCausalLM.load_weights has no parameter for") and "q_norm" in p
               for p in problems)  # fmt: skip
    assert not any(p.startswith("LlamaForCausalLM") for p in problems)


def test_altered_llama_loader_lifts_the_fp8_refusal(installed, tmp_path):
    """When upstream stops renaming weight_scale_inv (the fix of the upstream issue), the
    check sees it: the refusal is derived from the source, not hard-coded."""
    src = _copy(installed, tmp_path / "sglang")
    _edit(src.root / "srt/models/llama.py",
          'name.replace(".weight_scale_inv", ".weight_scale")', "name")  # fmt: skip
    assert not contract.SGLangSource(src.root).drops_block_fp8_scales("LlamaForCausalLM")


def test_every_engine_server_flag_parses(installed, tmp_path):
    """Each flag sglang_engine may pass exists in the installed ServerArgs parser."""
    from tests.helpers.rollout_helpers import require_sglang_protocol, smollm2_tokenizer, tiny_llama

    require_sglang_protocol()
    from megatron_rpt.rollout import sglang_protocol as proto

    tiny_llama(smollm2_tokenizer()).save_pretrained(tmp_path)
    argv = proto.server_argv(
        str(tmp_path), host="127.0.0.1", port=31003, tp_size=1, mem_fraction_static=0.5,
        dtype="float32", colocated=True, enable_weights_cpu_backup=True,
        deterministic_inference=True, seed=1, base_gpu_id=0,
        extra_args={"load-format": "dummy", "disable-cuda-graph": True},
    )  # fmt: skip
    flags = {a for a in argv if a.startswith("--")}
    assert flags >= {"--enable-memory-saver", "--enable-deterministic-inference", "--base-gpu-id",
                     "--attention-backend", "--load-format", "--weight-version"}  # fmt: skip
    args = proto.check_server_argv(argv)
    assert args.load_format == "dummy" and args.enable_deterministic_inference
    assert args.attention_backend == "triton" and args.base_gpu_id == 0
