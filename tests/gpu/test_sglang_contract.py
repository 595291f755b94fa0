"""The RolloutEngine contract (tests/unit/test_rollout_contract.py) against a real SGLang server.

The server (GPU) serves a tiny random Llama in fp32 saved to a temporary folder; before each
test the reference weights are pushed again, undoing what earlier tests changed. Log-probs are
compared with a looser tolerance than on CPU (different kernels, same fp32 weights).
"""

from __future__ import annotations

import pytest

from tests.helpers.rollout_helpers import smollm2_tokenizer, tiny_llama
from tests.unit.test_rollout_contract import (  # noqa: F401 - collected here against SGLang
    Harness,
    test_greedy_is_the_reference_argmax_path,
    test_is_a_rollout_engine,
    test_prefix_cache_stats,
    test_release_update_resume_keeps_outputs_identical,
    test_seeded_sampling_is_deterministic_and_samples_differ,
    test_shapes_order_and_logprobs_match_teacher_forcing,
    test_stop_at_final_box_stops_right_after_the_closing_brace,
    test_update_weights_changes_outputs_and_checksums,
    test_update_weights_rejects_unknown_names_and_bad_shapes,
)

pytestmark = [pytest.mark.gpu, pytest.mark.sglang_runtime, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def real_sglang(tmp_path_factory):
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    tok = smollm2_tokenizer()
    path = tmp_path_factory.mktemp("contract_llama")
    tiny_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.port, cfg.sglang.dtype, cfg.sglang.mem_fraction_static = 0, "float32", 0.3
    # seeded sampling needs deterministic inference in SGLang (sglang_protocol.py docstring)
    cfg.sglang.deterministic_inference = True
    cfg.sglang.extra_args = {"disable-cuda-graph": True}
    engine = SGLangEngine.launch(cfg, str(path))
    yield engine
    engine.shutdown()


@pytest.fixture
def harness(real_sglang):
    tok = smollm2_tokenizer()
    ref = tiny_llama(tok)
    real_sglang.update_weights(((n, p.detach()) for n, p in ref.named_parameters()), version=0)
    real_sglang.reset_prefix_cache_stats()
    return Harness(real_sglang, ref, tok, tol=2e-3)
