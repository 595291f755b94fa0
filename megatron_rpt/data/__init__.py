"""Corpus -> tokens -> entropy scores -> filtered RPT samples -> prompts.

See ``pipeline.py`` for the on-disk layout written by ``tools/prepare_rpt_data.py`` and
``store.py`` for reading samples back with O(1) memory per sample.
"""
