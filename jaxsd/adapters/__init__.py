"""Adapters: small files that change a loaded model (LoRA: ``lora.py``; textual inversion:
``embeddings.py``). The pipelines' ``with_lora`` and ``with_embedding`` apply them."""
from jaxsd.adapters.embeddings import EmbeddingError, expand_prompt, read_embedding
from jaxsd.adapters.lora import LoraError, LoraUpdate, lora_deltas, merge, read_lora

__all__ = ["EmbeddingError", "LoraError", "LoraUpdate", "expand_prompt", "lora_deltas", "merge",
           "read_embedding", "read_lora"]
