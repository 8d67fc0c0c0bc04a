"""jaxsd: a readable, exact and fast JAX implementation of Stable Diffusion.

Read the modules in this order:

    checkpoint.py   reading diffusers/transformers folders (safetensors) without torch
    convert.py      every rename from PyTorch keys to our parameter paths, as tables
    tokenizer.py    prompts -> CLIP token ids
    clip.py         the CLIP text encoder: token ids -> 77 x D embeddings
    layers.py       GroupNorm, ResNet blocks, up/downsampling, attention (shared by VAE and UNet)
    vae.py, unet.py, schedule.py, samplers/, sampling.py, single_file.py   (see their docs)
    images.py       image and mask pre/post-processing (diffusers' VaeImageProcessor)
    loading.py      where a checkpoint comes from: folder, Hub id, single file
    pipeline.py     StableDiffusion: text_to_image, image_to_image, inpaint
"""
__version__ = "0.1.0"

from jaxsd.clip import CLIPTextConfig, CLIPTextModel, load_clip_text
from jaxsd.pipeline import StableDiffusion
from jaxsd.tokenizer import load_tokenizer, tokenize

__all__ = ["CLIPTextConfig", "CLIPTextModel", "load_clip_text", "load_tokenizer", "tokenize",
           "StableDiffusion"]
