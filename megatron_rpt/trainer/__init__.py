"""The RPT training loop and the policy update on Megatron-Core.

The loop:

* ``loop``: the training loop (one optimizer step per rollout batch) and its deviations from
  the paper;
* ``builders``: builds what the loop drives (the policy, the batch source, the engines);
* ``rollout_source``: one step's rollouts -> reward -> GRPO advantages -> a batch;
  ``ntp`` and ``rlp``: the NTP control and the RLP objective as batch sources;
  ``step_batch``: what a batch source hands the loop;
* ``sampler``: the resumable order of training contexts;
* ``fleet`` and ``engine_guard``: the rollout engines behind deadlines, routing and restarts;
  ``offload``: the trainer's half of the colocated memory hand-off;
* ``preflight``: what the entry point checks and settles before training starts;
* ``run_logger``: step metrics to JSON lines, wandb and the console;
* ``checkpoint`` and ``run_state``: atomic training checkpoints and exact resume;
* ``ema``: RLP's EMA teacher.

The policy update:

* ``config`` (and ``rlp_config``): ``OptimizerConfig``, ``TrainConfig``, ``CheckpointConfig``
  (``optimizer.*``, ``train.*``, ``checkpoint.*`` in the run config);
* ``batch`` and ``prefix_layout``: ``TrainSequence`` / ``RolloutBatch`` -> DP partition and
  token-budget micro-batches (shared-prefix, packed THD or padded), global loss denominators
  (pure torch);
* ``forward``: Megatron's ``forward_step`` / ``loss_func`` seam and the loss-scaling contract;
* ``optimizer``: Megatron DDP, ``DistributedOptimizer``, LR scheduler, schedule hooks;
* ``step``: ``PolicyTrainer.train_step(batch) -> StepMetrics`` and ``compute_logprobs(batch)``;
* ``metrics``: ``StepMetrics``.

Nothing is imported here: ``megatron_rpt.config`` reads ``trainer.config`` without loading
Megatron-Core.
"""
