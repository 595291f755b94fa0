"""Context parallelism on a GPU with Transformer Engine (skipped elsewhere; see conftest.py).

What exists for CP: the ``parallel.context_parallel_size`` setting reaches Megatron's
TransformerConfig with the TE spec, the preflight accepts it with the packed layout and refuses
the shared-prefix layout (its pieces attend to a prefix on another CP rank), the planner divides
activations by CP (tests/unit/test_planning.py), and ``TrainStep`` refuses CP > 1 with a clear
error because the per-CP-rank micro-batch split is not written yet (docs/SCALING.md). On CPU the
builder and the preflight refuse CP > 1 (tests/unit/test_model_config.py).
"""

import pytest

from megatron_rpt import capabilities
from megatron_rpt.config import RPTConfig
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import arch_from_dict
from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.testing.tiny_models import tiny_config_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not capabilities.have_te(), reason="needs Transformer Engine"),
]


def test_cp_reaches_the_te_transformer_config():
    from megatron_rpt.model.build import build_transformer_config

    arch = arch_from_dict(tiny_config_dict("qwen3"))
    config = build_transformer_config(
        arch, ModelConfig(dtype="bf16", spec="te"), ParallelConfig(context_parallel_size=2)
    )
    assert config.context_parallel_size == 2


def test_preflight_accepts_packed_and_refuses_shared_prefix():
    from megatron_rpt.preflight import check_context_parallel

    cfg = RPTConfig()
    cfg.parallel.context_parallel_size = 2
    cfg.train.micro_batch_layout = "packed"
    check_context_parallel(cfg)
    cfg.train.micro_batch_layout = "shared_prefix"
    with pytest.raises(ConfigError, match="micro_batch_layout=packed only"):
        check_context_parallel(cfg)
