"""HF <-> Megatron-Core weight conversion: the name table (mappings.py), pure transforms
(transforms.py), TP sharding (tp_sharding.py), per-parameter conversion and streaming export
(converter.py) and safetensors I/O (hf_io.py). The directory converters, which build models
and write checkpoints, are in ``megatron_rpt.checkpoint``."""
