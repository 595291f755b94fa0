"""megatron_rpt: Reinforcement Pre-Training (arXiv 2506.08007) on Megatron-Core.

Importing the package is cheap: it imports neither torch nor megatron. Submodules:
``data`` (corpus -> entropy-filtered samples -> prompts), ``reward`` (parse and prefix-match),
``model`` / ``conversion`` (Megatron GPTModel from and to HF), ``checkpoint``, ``loss``,
``rollout``, ``weight_sync``, ``trainer``, ``eval``. Their import order: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
