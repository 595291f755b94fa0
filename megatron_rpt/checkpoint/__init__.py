"""Checkpoints: finding them (discovery.py, the one place that resolves a path, a run's latest
checkpoint, ``--init-from`` and ``--resume``), saving and loading the model's weights (io.py),
building a model filled with pretrained weights (loading.py), and the HF <-> Megatron directory
converters (hf_to_megatron.py, megatron_to_hf.py). Training state on top of a model
checkpoint (optimizer, RNG, step): ``trainer/checkpoint.py``."""
