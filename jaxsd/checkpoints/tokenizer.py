"""Prompts -> CLIP token ids, padded to the text encoder's context length (77).

jaxsd uses transformers' CLIP tokenizer (byte-level BPE) as it is. Each checkpoint ships its
own ``tokenizer/`` folder (SD 2.x pads with ``!`` = id 0, SD 1.x with ``<|endoftext|>``), and
jaxsd ships OpenAI's CLIP vocabulary in ``jaxsd/assets/clip_tokenizer`` so that the built-in
model, the tests and the tutorials need no network.

    "a photograph of an astronaut riding a horse"
    -> [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, <pad> x 67]
        <|startoftext|> a photograph of an astronaut riding a horse <|endoftext|>

Prompts longer than 77 tokens are truncated, as in diffusers, with a logged warning that
quotes the dropped text.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _drop_torch_notice(record: logging.LogRecord) -> bool:
    """A filter for transformers' logger: drop the notice it logs on import when torch is not
    installed ("PyTorch was not found. Models won't be available..."). jaxsd uses transformers
    only for its tokenizer, which needs no torch, so on a plain install every command printed a
    warning about nothing. Every other transformers message passes."""
    return not record.getMessage().startswith("PyTorch was not found")


def import_clip_tokenizer():
    """transformers' ``CLIPTokenizer`` class, with transformers' "PyTorch was not found" notice
    dropped (jaxsd uses only its tokenizer, which needs no torch)."""
    transformers_logger = logging.getLogger("transformers")
    if _drop_torch_notice not in transformers_logger.filters:
        transformers_logger.addFilter(_drop_torch_notice)
    # the class's own module: half a second less than `from transformers import CLIPTokenizer`
    from transformers.models.clip.tokenization_clip import CLIPTokenizer
    return CLIPTokenizer


BUILTIN_VOCABULARY = Path(__file__).parents[1] / "assets" / "clip_tokenizer"


def load_tokenizer(folder: str | os.PathLike | None = None):
    """A transformers CLIP tokenizer from ``folder`` (a checkpoint's ``tokenizer/``).

    With no folder, the CLIP vocabulary that ships with jaxsd (context length 77).
    """
    CLIPTokenizer = import_clip_tokenizer()
    folder = Path(folder) if folder is not None else BUILTIN_VOCABULARY
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a CLIP tokenizer folder: it has neither "
                                f"vocab.json + merges.txt nor tokenizer.json")
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
    """Token ids [B, max_length] (int32), padded and truncated as diffusers does.

    :param tokenizer: a CLIP tokenizer (see :func:`load_tokenizer`).
    :param prompts: one prompt or a list of prompts.
    :param max_length: the context length; default ``tokenizer.model_max_length`` (77).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r}")
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                    truncation=True).input_ids
    full = tokenizer(list(prompts), verbose=False).input_ids  # unpadded, untruncated; we warn below
    for prompt_ids, untruncated in zip(ids, full):
        if len(untruncated) > max_length:
            # Everything between the kept tokens and the final <|endoftext|> was dropped.
            removed = tokenizer.decode(untruncated[max_length - 1:-1])
            logger.warning("The following part of your input was truncated because CLIP can only "
                           "handle sequences up to %d tokens: %r", max_length, removed)
    return np.asarray(ids, dtype=np.int32)
