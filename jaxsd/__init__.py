"""jaxsd: a readable, exact and fast JAX implementation of Stable Diffusion.

One folder per concern; read them in this order:

    models/        the networks, as flax.linen modules (no files, no sampling)
        layers.py         GroupNorm, ResNet blocks, up/downsampling, attention (VAE and UNet share them)
        clip.py           the CLIP text encoder: token ids -> 77 x D embeddings
        vae.py            the VAE: pixels <-> latents
        transformer.py    the UNet's spatial transformer (self- and cross-attention)
        unet.py           the UNet: (noisy latents, timestep, text) -> noise (or v) prediction
    checkpoints/   reading what others saved, without torch
        files.py          config.json and safetensors files of a component folder
        convert.py        every rename from PyTorch keys to our parameter paths, as tables
        components.py     one component folder -> (model, params)
        tokenizer.py      prompts -> CLIP token ids (a checkpoint's tokenizer/, or the built-in vocabulary)
        ldm_keys.py       original (CompVis) single files: the key tables
        ldm_arch.py       ... the architecture, read off the tensor shapes
        single_file.py    ... reading and writing the files
        sources.py        where a checkpoint comes from: built-in name, folder, Hub id, single file
    sampling/      every diffusers sampler as a pure step function; sees the UNet only as model_fn
        schedule.py       betas, timesteps and sigmas from scheduler_config.json (NumPy)
        common.py, ddpm_family.py, k_diffusion.py, dpm_solver.py, unipc_deis.py   the samplers
        loop.py           the whole sampling loop as one jax.lax.scan
    pipelines/     models + checkpoints + sampling = images
        images.py         image and mask pre/post-processing (diffusers' VaeImageProcessor)
        encoding.py       prompts -> embeddings, pixels <-> scaled latents, the guided denoiser
        stable_diffusion.py   StableDiffusion: text_to_image, image_to_image, inpaint
        stable_diffusion_xl.py  StableDiffusionXL: SDXL's conditioning on the same entry points
    adapters/      files that change a loaded model
        lora.py           LoRA files (PEFT, diffusers, kohya-ss) -> weight updates, merged purely
        embeddings.py     textual-inversion embeddings -> new tokens
    runtime.py     the compilation cache on disk, and the devices a batch is spread over
    training/      training the built-in tiny model from scratch (imported only by cli.py)
        shapes.py         the synthetic dataset; evaluate.py its judge
        recipe.py         model and training configs, losses, jitted steps
        loop.py           data, checkpoints, the loop; export.py writes a diffusers folder
    cli.py         the jaxsd command; batch.py its prompts file (generate --prompts)

Imports flow one way, and ``tests/test_layout.py`` keeps it so: ``models/`` imports nothing else
of jaxsd; ``checkpoints/`` only ``models/``; ``sampling/`` nothing else of jaxsd (it sees a
``model_fn``); ``adapters/`` only ``checkpoints/`` and ``models/``; ``runtime.py`` nothing else of jaxsd;
``pipelines/`` composes models, checkpoints, sampling, adapters and runtime; ``training/`` may use all
of them and only ``cli.py`` imports it; ``cli.py`` is the only module that imports both
``pipelines/`` and ``training/``. ``import jaxsd`` loads neither ``training/`` nor optax.
"""
__version__ = "0.1.0"

from jaxsd.checkpoints.components import load_clip_text, load_unet, load_vae
from jaxsd.checkpoints.tokenizer import load_tokenizer, tokenize
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.unet import UNet, UNetConfig
from jaxsd.models.vae import AutoencoderKL, VAEConfig, image_to_latents, latents_to_image
from jaxsd.pipelines.images import image_grid
from jaxsd.pipelines.stable_diffusion import StableDiffusion
from jaxsd.pipelines.stable_diffusion_xl import StableDiffusionXL
from jaxsd.runtime import enable_compilation_cache
from jaxsd.sampling import SAMPLERS, add_noise, first_step_for_strength, make_plan, sample
from jaxsd.sampling.schedule import SD1_CONFIG, SD2_V_CONFIG, ScheduleConfig

__all__ = [
    "enable_compilation_cache",
    "CLIPTextConfig", "CLIPTextModel", "load_clip_text", "load_tokenizer", "tokenize",
    "AutoencoderKL", "VAEConfig", "load_vae", "image_to_latents", "latents_to_image",
    "UNet", "UNetConfig", "load_unet",
    "ScheduleConfig", "SD1_CONFIG", "SD2_V_CONFIG", "SAMPLERS", "sample", "make_plan", "add_noise",
    "first_step_for_strength",
    "StableDiffusion", "StableDiffusionXL", "image_grid",
]
