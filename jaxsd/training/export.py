"""Saving a jaxsd model in diffusers' folder layout, so that diffusers (and jaxsd) can load it.

    model_index.json                     which class each component is
    scheduler/scheduler_config.json      the noise schedule it was trained with
    text_encoder/config.json             transformers.CLIPTextConfig
    text_encoder/model.safetensors       keys as transformers writes them
    tokenizer/                           the CLIP vocabulary (copied from jaxsd/assets/clip_tokenizer)
    unet/config.json                     diffusers.UNet2DConditionModel's config
    unet/diffusion_pytorch_model.safetensors
    vae/config.json                      diffusers.AutoencoderKL's config
    vae/diffusion_pytorch_model.safetensors

Weights go through the converter's tables in reverse (:func:`jaxsd.checkpoints.convert.to_reference`), so
the saved keys and layouts are exactly what the loaders read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from jaxsd.checkpoints import convert
from jaxsd.checkpoints.tokenizer import BUILTIN_VOCABULARY
from jaxsd.models.clip import CLIPTextConfig
from jaxsd.models.unet import UNetConfig
from jaxsd.models.vae import VAEConfig

DIFFUSERS_VERSION = "0.42.1"  # the version the files were checked against (tests/test_export.py)


def unet_config_json(cfg: UNetConfig, sample_size: int) -> dict:
    """The inverse of :meth:`UNetConfig.from_diffusers`."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": list(cfg.layers_per_block),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.down_attention],
        # diffusers lists the up blocks from the lowest resolution up
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.up_attention)],
        "mid_block_type": (None if not cfg.mid_block else
                           "UNetMidBlock2DCrossAttn" if cfg.mid_attention else "UNetMidBlock2D"),
        "attention_head_dim": list(cfg.heads),  # diffusers' name for the number of heads (SD 1.x)
        "transformer_layers_per_block": list(cfg.transformer_depth),
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
        "time_embedding_dim": cfg.time_embedding_dim,
        "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "dual_cross_attention": False, "only_cross_attention": False,
        **({"addition_embed_type": cfg.addition_embed_type,
            "addition_time_embed_dim": cfg.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim}
           if cfg.addition_embed_type else {}),
    }


def vae_config_json(cfg: VAEConfig, sample_size: int) -> dict:
    """The inverse of :meth:`VAEConfig.from_dict`."""
    levels = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu", "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "force_upcast": cfg.force_upcast,
    }


def text_config_json(cfg: CLIPTextConfig) -> dict:
    """transformers' ``CLIPTextConfig`` JSON (the fields jaxsd reads, plus what transformers needs)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "with_projection"}
    return {"architectures": ["CLIPTextModelWithProjection" if cfg.with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", **fields,
            "projection_dim": cfg.projection_dim if cfg.with_projection else cfg.hidden_size,
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
            "initializer_factor": 1.0,
            # transformers 5 loads weights in the file's dtype unless the config names one;
            # diffusers upcasts its parts to float32. Mixed, the pipeline fails on float16 files.
            "dtype": "float32", "torch_dtype": "float32"}


# The diffusers scheduler classes a folder can name as its default, with the keys of their own.
# Every config also carries SD 1.5's PNDM/DDIM keys (clip_sample, set_alpha_to_one, skip_prk_steps),
# as SD's own folders do: diffusers keeps them when a user switches samplers with `from_config`,
# and without them DDIM and DDPM would clip the latents to [-1, 1] (their default).
SCHEDULER_KEYS = {
    "PNDMScheduler": {},
    "DDIMScheduler": {},
    "EulerDiscreteScheduler": {"interpolation_type": "linear", "use_karras_sigmas": False},
}


def scheduler_config_json(scheduler: str = "PNDMScheduler", prediction_type: str = "epsilon",
                          zero_terminal_snr: bool = False) -> dict:
    """The training schedule (scaled_linear, 1000 steps), with SD 1.5's sampling settings
    (leading timesteps + 1), for the diffusers class ``scheduler`` (SD 1.5's is PNDM).

    A model trained with a zero-terminal-SNR schedule says ``rescale_betas_zero_snr`` and
    samples from the last timestep: "trailing" spacing, as Lin et al. (2024, sec. 3.3) and
    diffusers' own zero-SNR folders do ("leading" would never start from pure noise)."""
    if scheduler not in SCHEDULER_KEYS:
        raise ValueError(f"scheduler={scheduler!r} is not supported; choose one of {list(SCHEDULER_KEYS)}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}; choose 'epsilon' or 'v_prediction'")
    config = {"_class_name": scheduler, "_diffusers_version": DIFFUSERS_VERSION,
              "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "trained_betas": None, "prediction_type": prediction_type,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "clip_sample": False, "timestep_spacing": "leading", **SCHEDULER_KEYS[scheduler]}
    if zero_terminal_snr:
        # steps_offset stays 1: only "leading" spacing reads it (in diffusers and in jaxsd), and
        # diffusers' StableDiffusionPipeline warns about and rewrites any other value.
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def export_diffusers(folder: str | os.PathLike, *, text_config: CLIPTextConfig, text_params,
                     unet_config: UNetConfig, unet_params, vae_config: VAEConfig, vae_params,
                     image_size: int = 64, dtype=np.float16, scheduler: str = "PNDMScheduler",
                     prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> Path:
    """Write a complete StableDiffusionPipeline folder; returns its path.

    :param dtype: the dtype the weights are stored in (float16 halves the size; loaders upcast).
    :param scheduler: the diffusers scheduler class the folder names as its default (one of
        :data:`SCHEDULER_KEYS`); any sampler can still be chosen at sampling time.
    :param prediction_type, zero_terminal_snr: how the UNet was trained (see
        :func:`scheduler_config_json`).
    """
    from safetensors.numpy import save_file

    # an unknown name fails before writing
    scheduler_config = scheduler_config_json(scheduler, prediction_type, zero_terminal_snr)
    folder = Path(folder)
    f = vae_config.downsample_factor
    if image_size % f:
        raise ValueError(f"image_size={image_size} must be a multiple of the VAE's downsampling "
                         f"factor {f}")
    parts = {
        "text_encoder": (text_config_json(text_config), "model.safetensors",
                         convert.to_reference(text_params, convert.CLIP_TEXT)),
        "unet": (unet_config_json(unet_config, image_size // f), "diffusion_pytorch_model.safetensors",
                 convert.to_reference(unet_params, convert.unet_table(unet_config))),
        "vae": (vae_config_json(vae_config, image_size), "diffusion_pytorch_model.safetensors",
                convert.to_reference(vae_params, convert.VAE)),
    }
    for name, (config, weights, state) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        _write_json(folder / name / "config.json", config)
        state = {k: np.ascontiguousarray(v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v)
                 for k, v in state.items()}
        save_file(state, folder / name / weights, metadata={"format": "pt"})
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for file in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(BUILTIN_VOCABULARY / file, tokenizer / file)
    _write_json(folder / "model_index.json", dict(MODEL_INDEX, scheduler=["diffusers", scheduler]))
    return folder


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
