"""Tiny random-weight Stable Diffusion checkpoints in diffusers' folder layout, for the pipeline tests.

Both jaxsd and diffusers load the same saved folder. Weights are re-randomised after diffusers'
init (which zeroes some output layers), so that nothing is trivially zero, and scaled so that
the decoded images are not saturated at 0 or 255.

The VAE's posterior is made (numerically) deterministic: the log-variance half of ``quant_conv``
is set to -30, so std = exp(-15) ~ 3e-7. diffusers' img2img/inpaint draw z ~ q(z|x) with torch's
generator and jaxsd with a JAX key; with this std the two draws agree to ~1e-7, and the tests
compare everything else exactly.
"""
from __future__ import annotations

import torch

SCHEDULER_SD1 = {  # stable-diffusion-v1-5's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}
SCHEDULER_SD2 = {  # stable-diffusion-2-1's: DDIM with v-prediction
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
    "prediction_type": "v_prediction",
}

# jaxsd sampler name -> (diffusers scheduler class name, extra from_config arguments)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}), "deis": ("DEISMultistepScheduler", {}),
    "tcd": ("TCDScheduler", {}), "lcm": ("LCMScheduler", {}),
}


def _rerandomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1:  # GroupNorm / LayerNorm scale and shift
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:  # fan-in scaled, so activations keep unit scale through the random network
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def build_components(*, sd2: bool = False, inpainting: bool = False, seed: int = 0, lcm: bool = False):
    """(tokenizer, text_encoder, unet, vae) with random weights: SD 1-style or SD 2-style; `lcm`:
    a latent consistency model's UNet, which embeds the guidance scale (time_cond_proj_dim)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxsd.checkpoints.tokenizer import BUILTIN_VOCABULARY

    tokenizer = CLIPTokenizer.from_pretrained(BUILTIN_VOCABULARY, **({"pad_token": "!"} if sd2 else {}))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if inpainting else 4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2, upcast_attention=sd2, time_cond_proj_dim=24 if lcm else None)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64)
    for i, module in enumerate((text_encoder, unet, vae)):
        _rerandomise(module, seed * 10 + i)
    with torch.no_grad():  # a deterministic posterior; see the module docstring
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
    return tokenizer, text_encoder.eval(), unet.eval(), vae.eval()


def save_checkpoint(folder, *, sd2: bool = False, inpainting: bool = False, seed: int = 0,
                    lcm: bool = False) -> str:
    """Save a random SD checkpoint in diffusers' layout to ``folder``; returns the path. `lcm`: a
    latent consistency model (LCM UNet, LCMScheduler), as SimianLuo/LCM_Dreamshaper_v7."""
    from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, StableDiffusionPipeline

    tokenizer, text_encoder, unet, vae = build_components(sd2=sd2, inpainting=inpainting, seed=seed, lcm=lcm)
    config = dict(SCHEDULER_SD2 if sd2 else SCHEDULER_SD1)
    scheduler = (LCMScheduler if lcm else DDIMScheduler if sd2 else PNDMScheduler).from_config(config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return str(folder)


SCHEDULER_XL = {  # stable-diffusion-xl-base-1.0's scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
    "use_karras_sigmas": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "clip_sample": False, "trained_betas": None,
}
XL_ADD_DIM = 8  # addition_time_embed_dim of the tiny SDXL UNets (256 in the real ones)


def build_xl_components(*, refiner: bool = False, inpainting: bool = False, seed: int = 0):
    """Random-weight tiny SDXL parts: {tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet,
    vae}, the refiner without the first encoder. Encoder 1 is 32 wide, the bigG stand-in 40 wide
    with a projection of 24 (not its width, so that a transposed projection fails); the UNet's
    first level has no attention and the second two transformer layers, as SDXL's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from jaxsd.checkpoints.tokenizer import BUILTIN_VOCABULARY

    common = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=3, max_position_embeddings=77,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SDXL's configs: legacy eos 2
    parts = {}
    if not refiner:
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(BUILTIN_VOCABULARY)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            hidden_size=32, num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32, **common))
    parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(BUILTIN_VOCABULARY, pad_token="!")
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=40, num_attention_heads=4, hidden_act="gelu", projection_dim=24, **common))
    ids = 5 if refiner else 6
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=9 if inpainting else 4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=40 if refiner else 72, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=XL_ADD_DIM,
        projection_class_embeddings_input_dim=24 + ids * XL_ADD_DIM)
    parts["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    for i, name in enumerate(("text_encoder", "text_encoder_2", "unet", "vae")):
        if name in parts:
            _rerandomise(parts[name], seed * 10 + i)
            parts[name].eval()
    with torch.no_grad():  # a deterministic posterior; see the module docstring
        parts["vae"].quant_conv.weight[4:] = 0.0
        parts["vae"].quant_conv.bias[4:] = -30.0
    return parts


def save_xl_checkpoint(folder, *, refiner: bool = False, inpainting: bool = False, seed: int = 0) -> str:
    """A random tiny SDXL base (or refiner) in diffusers' layout, saved by diffusers' own pipeline."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

    parts = build_xl_components(refiner=refiner, inpainting=inpainting, seed=seed)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_XL)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False, **parts)
    else:
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
        pipe = cls(scheduler=scheduler, add_watermarker=False, **parts)
    pipe.save_pretrained(folder)
    return str(folder)


def reference_xl_pipeline(folder, kind: str = "text", sampler: str | None = None, karras: bool = False):
    """diffusers' SDXL pipeline (kind: text, image, inpaint) from a saved folder."""
    import diffusers

    cls = {"text": diffusers.StableDiffusionXLPipeline, "image": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    return _with_sampler(cls.from_pretrained(folder, add_watermarker=False), sampler, karras)


def reference_pipeline(folder, kind: str = "text", sampler: str | None = None, karras: bool = False):
    """diffusers' pipeline (kind: text, image, inpaint) from a saved folder, with a jaxsd-named sampler."""
    import diffusers

    cls = {"text": diffusers.StableDiffusionPipeline,
           "image": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)
    return _with_sampler(pipe, sampler, karras)


def _with_sampler(pipe, sampler: str | None, karras: bool):
    """The diffusers pipeline, quiet, with the scheduler of a jaxsd sampler name (None: its own)."""
    import diffusers

    pipe.set_progress_bar_config(disable=True)
    if sampler is not None:
        name, extra = DIFFUSERS_SCHEDULERS[sampler]
        if karras:
            extra = dict(extra, use_karras_sigmas=True)
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    return pipe


def torch_noise(shape_nhwc, seed: int):
    """Unit Gaussian noise for both sides: torch NCHW for diffusers, NumPy NHWC for jaxsd."""
    B, h, w, C = shape_nhwc
    nchw = torch.randn((B, C, h, w), generator=torch.Generator().manual_seed(seed))
    return nchw, nchw.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Session fixtures shared by tests/test_pipeline*.py and tests/test_cli.py (import them by name).
import pytest  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("sd1"), seed=0)


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("sd2"), sd2=True, seed=1)


@pytest.fixture(scope="session")
def inpainting_folder(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("sd1-inpainting"), inpainting=True, seed=2)


@pytest.fixture(scope="session")
def sd1(sd1_folder):
    from jaxsd import StableDiffusion
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="session")
def sd2(sd2_folder):
    from jaxsd import StableDiffusion
    return StableDiffusion.from_pretrained(sd2_folder)


def to_uint8(images_np):
    """diffusers' output_type="np" floats -> uint8, exactly as its PIL conversion does."""
    import numpy as np
    return (images_np * 255).round().astype(np.uint8)


def max_diff(a, b) -> int:
    import numpy as np
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


# Image-to-image and inpainting fixtures (tests/test_pipeline_image.py, test_pipeline_xl.py).
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def deterministic_reference_posterior():
    """diffusers draws z ~ q(z|x) with torch's generator; the test VAE's posterior std is ~3e-7
    (see the module docstring), so take its mean and leave the generator for the noise alone.
    Modules that compare img2img/inpainting use it with autouse."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    original = DiagonalGaussianDistribution.sample
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    yield
    DiagonalGaussianDistribution.sample = original


@pytest.fixture(scope="module")
def picture():
    """A smooth RGB picture (so that Lanczos resizing and the VAE see structure, not noise)."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, np.cos(4 * x * y) * 0.5 + 0.5], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def mask():
    import numpy as np
    from PIL import Image
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    m[16:48, 8:40] = 255  # white: repaint
    return Image.fromarray(m)
