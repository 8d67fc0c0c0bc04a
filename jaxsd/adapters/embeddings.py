"""Textual-inversion embeddings: new words for the text encoder, learned as vectors.

Gal et al. (2022) freeze the whole model and learn only the input vectors of a new token, so a
prompt can say ``<cat-toy>`` and mean what a few pictures showed. A file holds n >= 1 vectors
of the text encoder's width D; loading one (as diffusers' ``load_textual_inversion``) adds n
tokens to the tokenizer, ``<name>``, ``<name>_1``, ..., ``<name>_{n-1}``, with the next free ids,
and n rows to the token-embedding table [V, D] -> [V + n, D]. A prompt that says ``<name>`` is
rewritten to ``<name> <name>_1 ... <name>_{n-1}`` before tokenizing (``expand_prompt``).

Files people have:

| format | written by | contents | token |
| --- | --- | --- | --- |
| diffusers ``learned_embeds.safetensors`` | diffusers' training script | ``{"<token>": [D] or [n, D]}`` | the key |
| A1111 ``.safetensors`` | AUTOMATIC1111, Civitai | ``{"emb_params": [n, D]}`` | the file name, or ``token=`` |
| A1111 ``.pt`` (pickle) | AUTOMATIC1111 | ``{"string_to_param": {"*": [n, D]}, "name": ...}`` | ``name``, or ``token=`` |
| SDXL ``.safetensors`` | SDXL trainers | ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` | refused: two text encoders |
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxsd.checkpoints.files import CheckpointError, SafetensorsFile


class EmbeddingError(CheckpointError):
    """An embedding file jaxsd cannot read, or that does not fit the text encoder."""


def read_embedding(source: str | os.PathLike, *, token: str | None = None,
                   allow_pickle: bool = False) -> tuple[str, np.ndarray]:
    """A textual-inversion file -> ``(token, vectors [n, D] float32)``.

    :param token: the word the prompt will use; default the file's own (see the module table).
    :param allow_pickle: read an A1111 ``.pt``/``.bin`` pickle (unpickling can run code; read
        with ``torch.load(weights_only=True)``, which needs torch).
    """
    path = Path(source).expanduser()
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    if path.suffix == ".safetensors":
        try:   # the checkpoints' reader: validates the header, reads bfloat16 too
            f = SafetensorsFile(path)
            state = {k: np.asarray(f[k]) for k in f}
        except CheckpointError as error:
            raise EmbeddingError(str(error)) from None
    elif path.suffix in (".pt", ".bin", ".pth"):
        if not allow_pickle:
            raise EmbeddingError(f"{path} is a pickle file; unpickling can run arbitrary code, so jaxsd "
                                 "refuses it by default. Prefer .safetensors; if you trust this file, "
                                 "pass allow_pickle=True (read with torch.load(weights_only=True)).")
        import torch  # only on this explicitly requested path
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise EmbeddingError(f"{path}: expected a .safetensors file (or, with allow_pickle, .pt/.bin), "
                             f"got suffix {path.suffix!r}")
    if hasattr(state, "detach"):  # torch.save(tensor): the vectors alone, no token (diffusers reads these)
        if token is None:
            raise EmbeddingError(f"{path} holds a bare tensor {tuple(state.shape)}, with no token name; "
                                 "pass the token it should be, e.g. token='<my-style>'")
        name, vectors = token, state
    elif not isinstance(state, Mapping):
        raise EmbeddingError(f"{path} holds a {type(state).__name__}, not a textual-inversion embedding")
    else:
        name, vectors = _token_and_vectors(state, path)
    if hasattr(vectors, "detach"):            # a torch tensor, from a .pt
        vectors = vectors.detach().float().numpy()
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise EmbeddingError(f"{path}: the embedding has shape {vectors.shape}; expected [D] or [n, D]")
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the embedding holds NaN or infinite values")
    return token or name, vectors


def _token_and_vectors(state: Mapping, path: Path):
    if "clip_l" in state or "clip_g" in state:
        raise EmbeddingError(f"{path} is an SDXL embedding (keys {sorted(state)}: one set of vectors "
                             "per text encoder); SD 1.x/2.x have one text encoder")
    if "string_to_param" in state:                          # A1111 .pt
        return state.get("name", path.stem), state["string_to_param"]["*"]
    if len(state) == 1:
        key, value = next(iter(state.items()))
        return (path.stem if key == "emb_params" else key), value   # A1111 .safetensors / diffusers
    raise EmbeddingError(f"{path}: keys {sorted(state)[:10]} are not a textual-inversion embedding "
                         "(expected one {token: vectors}, emb_params, or string_to_param)")


def new_tokens(token: str, n: int) -> list[str]:
    """The tokens n vectors become: ``<t>``, ``<t>_1``, ..., ``<t>_{n-1}`` (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_prompt(tokenizer, prompt: str) -> str:
    """Write each multi-vector token out in full, as diffusers' ``maybe_convert_prompt``:
    ``"a <t> photo"`` -> ``"a <t> <t>_1 <t>_2 photo"`` (a plain text replacement)."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt
