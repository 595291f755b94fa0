"""The RPT policy update on Megatron-Core (the RPT loop itself will live in ``trainer/loop.py``).

* ``config``: ``OptimizerConfig``, ``TrainConfig``, ``CheckpointConfig`` (``optimizer.*``,
  ``train.*``, ``checkpoint.*`` in the run config);
* ``batch``: ``TrainSequence`` / ``RolloutBatch`` -> DP partition and token-budget micro-batches
  (packed THD or padded), global loss denominators (pure torch);
* ``forward``: Megatron's ``forward_step`` / ``loss_func`` seam and the loss-scaling contract;
* ``optimizer``: Megatron DDP, ``DistributedOptimizer``, LR scheduler, schedule hooks;
* ``step``: ``TrainStep.train_step(batch) -> StepMetrics`` and ``compute_logprobs(batch)``;
* ``checkpoint``: atomic training checkpoints and exact resume;
* ``metrics``: ``StepMetrics``.

Nothing is imported here: ``megatron_rpt.config`` reads ``trainer.config`` without loading
Megatron-Core.
"""
