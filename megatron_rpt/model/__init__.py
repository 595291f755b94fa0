"""Megatron-Core models from HF checkpoints: architecture (arch.py), configs (config.py),
layer specs (specs.py, sdpa_attention.py), building (build.py), loading (loading.py), the
checkpoint layout (checkpoint_io.py) and logits without vocabulary padding (logits.py)."""
