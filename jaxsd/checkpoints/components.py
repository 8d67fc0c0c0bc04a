"""One component folder -> ``(model, params)``: the text encoder, the UNet, the VAE.

Each ``build_*`` function takes a component's config (``config.json`` as a dict) and its
PyTorch-named tensors: the config becomes the model's frozen config dataclass, the model's own
``init`` shapes say which parameters it wants, and the conversion table (``convert.py``) turns
the tensors into them. The ``load_*`` functions read both from a component folder; single-file
checkpoints (``sources.py``) infer the configs and call the same ``build_*``:

    model, params = load_unet("stable-diffusion-v1-5/unet")
    eps = model.apply({"params": params}, latents, t, text)

Tensors are read lazily and converted one at a time, so loading holds the converted parameters
plus one tensor in memory (and the memory-mapped file pages the OS keeps).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxsd.checkpoints import convert
from jaxsd.checkpoints.files import CheckpointError, read_config, read_state_dict
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.unet import UNet, UNetConfig
from jaxsd.models.vae import AutoencoderKL, VAEConfig


def _config(make, config: dict, what: str):
    """``make(config)``, with a bad value reported as a CheckpointError naming the component.

    ``what`` names the component and where its config came from (a folder, whose config.json
    it is, or a single file, whose config is inferred from the tensors plus the overrides)."""
    try:
        return make(config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{what}: its config does not describe a model jaxsd can build: "
                              f"{error}") from None


def build_clip_text(config: dict, state: Mapping, dtype=jnp.float32, *, param_dtype=None,
                    what: str = "CLIP text encoder"):
    """A transformers ``CLIPTextModel`` config and state dict -> ``(CLIPTextModel, params)``."""
    model = CLIPTextModel(_config(CLIPTextConfig.from_dict, config, what), dtype=dtype)
    shapes = convert.expected_shapes(model, np.zeros((1, model.config.max_position_embeddings), np.int32))
    return model, convert.convert(state, convert.CLIP_TEXT, shapes, dtype=param_dtype or dtype, what=what)


def build_unet(config: dict, state: Mapping, dtype=jnp.float32, *, param_dtype=None,
               what: str = "UNet checkpoint"):
    """A diffusers ``UNet2DConditionModel`` config and state dict -> ``(UNet, params)``."""
    model = UNet(_config(UNetConfig.from_diffusers, config, what), dtype=dtype)
    shapes = convert.expected_shapes(model, *model.example_inputs())
    table = convert.unet_table(model.config)
    return model, convert.convert(state, table, shapes, dtype=param_dtype or dtype, what=what)


def build_vae(config: dict, state: Mapping, dtype=jnp.float32, *, param_dtype=None, what: str = "VAE"):
    """A diffusers ``AutoencoderKL`` config and state dict -> ``(AutoencoderKL, params)``."""
    model = AutoencoderKL(_config(VAEConfig.from_dict, config, what), dtype=dtype)
    f = model.config.downsample_factor
    shapes = convert.expected_shapes(model, jnp.zeros((1, f, f, model.config.in_channels), jnp.float32))
    return model, convert.convert(state, convert.VAE, shapes, dtype=param_dtype or dtype, what=what)


def load_clip_text(folder: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None,
                   variant: str | None = None, allow_pickle: bool = False):
    """Load a transformers ``CLIPTextModel`` folder (``text_encoder/`` of an SD checkpoint).

    :param folder: a folder with ``config.json`` and ``model.safetensors`` (or shards/variants).
    :param dtype: the compute dtype, e.g. ``jnp.bfloat16``.
    :param param_dtype: the dtype parameters are stored in (default: ``dtype``).
    :param variant: weights variant, e.g. ``"fp16"`` for ``model.fp16.safetensors``.
    :param allow_pickle: permit ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``).
    :returns: ``(model, params)``; run it with ``model.apply({"params": params}, input_ids)``.
    """
    state = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    return build_clip_text(read_config(folder), state, dtype, param_dtype=param_dtype,
                           what=f"CLIP text encoder {str(folder)!r}")


def load_unet(folder: str | os.PathLike, dtype=jnp.float32, param_dtype=None, *,
              variant: str | None = None, allow_pickle: bool = False):
    """``model, params = load_unet("…/unet")`` from a diffusers ``unet/`` folder.

    :param folder: the folder with ``config.json`` and the weights.
    :param dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
    :param param_dtype: dtype the parameters are stored in (default: ``dtype``).
    :param variant: weights variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
    :param allow_pickle: accept a pickle ``.bin`` file (see :func:`jaxsd.checkpoints.files.read_state_dict`).
    """
    state = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    return build_unet(read_config(folder), state, dtype, param_dtype=param_dtype,
                      what=f"UNet checkpoint {str(folder)!r}")


def load_vae(folder: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None,
             variant: str | None = None, allow_pickle: bool = False):
    """Load a diffusers ``AutoencoderKL`` folder (``vae/`` of an SD checkpoint).

    :param folder: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``.
    :param dtype: the compute dtype, e.g. ``jnp.bfloat16``.
    :param param_dtype: the dtype parameters are stored in (default: ``dtype``).
    :param variant: weights variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
    :param allow_pickle: permit ``diffusion_pytorch_model.bin`` (read with ``torch.load(weights_only=True)``).
    :returns: ``(model, params)``; run it with ``model.apply({"params": params}, x, method=model.encode)``.
    """
    state = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    return build_vae(read_config(folder), state, dtype, param_dtype=param_dtype, what=f"VAE {str(folder)!r}")
