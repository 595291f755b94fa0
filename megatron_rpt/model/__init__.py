"""Megatron-Core models from HF architectures: architecture (arch.py), configs (config.py),
layer specs (specs.py, sdpa_attention.py), building (build.py), unwrapped modules and global
parameter names (parameters.py), FLOPs (flops.py) and logits without vocabulary padding
(logits.py). Filling a model with weights: ``megatron_rpt.checkpoint``."""
