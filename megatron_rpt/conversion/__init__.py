"""HF <-> Megatron-Core weight conversion: the name table (mappings.py), pure transforms
(transforms.py), TP sharding (tp_sharding.py), per-parameter conversion and streaming export
(converter.py), safetensors I/O (hf_io.py) and the two directory converters."""
