"""jaxsd: a readable, exact and fast JAX implementation of Stable Diffusion.

Read the modules in this order:

    checkpoint.py     reading diffusers/transformers folders (safetensors) without torch
    convert.py        every rename from PyTorch keys to our parameter paths, as tables
    tokenizer.py      prompts -> CLIP token ids
    clip.py           the CLIP text encoder: token ids -> 77 x D embeddings
    layers.py         GroupNorm, ResNet blocks, up/downsampling, attention (shared by VAE and UNet)
    vae.py            the VAE: pixels <-> latents
    transformer.py    the UNet's spatial transformer (self- and cross-attention)
    unet.py           the UNet: (noisy latents, timestep, text) -> noise (or v) prediction
    schedule.py       betas, timesteps and sigmas from scheduler_config.json (NumPy, float64)
    samplers/         every diffusers sampler as a pure step function (common.py first)
    sampling.py       the whole sampling loop as one jax.lax.scan
    images.py         image and mask pre/post-processing (diffusers' VaeImageProcessor)
    ldm_keys.py, single_file.py   original (CompVis) single-file checkpoints
    loading.py        where a checkpoint comes from: folder, Hub id, single file
    pipeline.py       StableDiffusion: text_to_image, image_to_image, inpaint
    cli.py            the jaxsd command
    data/shapes.py, evaluate.py, train.py,             training the tiny model from scratch
    train_loop.py, export.py
"""
__version__ = "0.1.0"

from jaxsd.clip import CLIPTextConfig, CLIPTextModel, load_clip_text
from jaxsd.pipeline import StableDiffusion
from jaxsd.sampling import SAMPLERS, add_noise, first_step_for_strength, make_plan, sample
from jaxsd.schedule import SD1_CONFIG, SD2_V_CONFIG, ScheduleConfig
from jaxsd.tokenizer import load_tokenizer, tokenize
from jaxsd.unet import UNet, UNetConfig, load_unet
from jaxsd.vae import AutoencoderKL, VAEConfig, image_to_latents, latents_to_image, load_vae

__all__ = [
    "CLIPTextConfig", "CLIPTextModel", "load_clip_text", "load_tokenizer", "tokenize",
    "AutoencoderKL", "VAEConfig", "load_vae", "image_to_latents", "latents_to_image",
    "UNet", "UNetConfig", "load_unet",
    "ScheduleConfig", "SD1_CONFIG", "SD2_V_CONFIG", "SAMPLERS", "sample", "make_plan", "add_noise",
    "first_step_for_strength",
    "StableDiffusion",
]
