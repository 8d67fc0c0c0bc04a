"""Adapters: small files that change a loaded model's weights (LoRA; see ``lora.py``)."""
from jaxsd.adapters.lora import LoraError, LoraUpdate, lora_deltas, merge, read_lora

__all__ = ["LoraError", "LoraUpdate", "lora_deltas", "merge", "read_lora"]
