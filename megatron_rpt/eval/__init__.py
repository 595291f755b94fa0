"""Evaluation instruments: next-token accuracy (standard argmax and next-token reasoning) by
difficulty bucket, reports in the RPT paper's Table 1 layout and scaling-law fits
(``tools/eval_next_token.py``, ``tools/fit_scaling.py``).

Modules: ``config`` (EvalConfig), ``dataset`` (which positions), ``models`` (NAME=PATH specs,
Megatron export, tokenizer check), ``next_token`` (standard accuracy), ``reasoning`` (Random@1,
Pass@k), ``metrics`` (buckets, Wilson intervals, Pass@k estimator, subsampling), ``runner``
(models x modes), ``report`` (JSON / Markdown / PNG), ``scaling``. Training/rollout FLOP
counting is ``model.flops``.

Importing the package is cheap (no torch): ``megatron_rpt.config`` imports ``eval.config``.
"""
