"""A small kit for testing extensions (a custom reward, engine or rollout phase) on CPU.

* ``FakeRolloutEngine`` (fake_engine.py): a ``RolloutEngine`` with scripted completions;
* ``save_tiny_model`` / ``save_tiny_causal_lm`` (tiny_models.py): tiny random HF checkpoints
  that Megatron-Core and the HF engine load like real ones;
* ``run_distributed`` (distributed.py): run a function on N gloo processes with a timeout.

The product never imports this package; the project's own test utilities live in tests/.
"""
