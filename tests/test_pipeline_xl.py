"""SDXL pipelines against diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline, on tiny
random-weight SDXL folders saved by diffusers (``pipeline_reference.save_xl_checkpoint``).

Both sides start from the same noise (``latents``); images are compared as uint8, within 2/255
(as the SD 1.x/2.x pipeline tests): float32 on both sides, the difference is rounding.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_reference import (deterministic_reference_posterior, mask, max_diff, picture,  # noqa: F401
                                reference_xl_pipeline, save_xl_checkpoint, sd1,
                                sd1_folder, to_uint8, torch_noise)
from jaxsd import StableDiffusion, StableDiffusionXL
from jaxsd.checkpoints.files import CheckpointError


# diffusers' posterior sample is its mean here (pipeline_reference.deterministic_reference_posterior)
pytestmark = pytest.mark.usefixtures("deterministic_reference_posterior")
SIZE, STEPS, PROMPT = 64, 4, "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_xl_checkpoint(tmp_path_factory.mktemp("sdxl"), seed=0)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    return save_xl_checkpoint(tmp_path_factory.mktemp("sdxl-refiner"), refiner=True, seed=1)


@pytest.fixture(scope="module")
def base(base_folder):
    return StableDiffusion.from_pretrained(base_folder)


@pytest.fixture(scope="module")
def reference(base_folder):
    return reference_xl_pipeline(base_folder)


def compare(ours, expected, what):
    diff = max_diff(ours, to_uint8(expected))
    print(f"{what}: max pixel difference {diff}/255")
    assert ours.std() > 5, f"{what}: a flat image"
    assert diff <= 2, what


def test_folder_is_an_sdxl_pipeline(base, base_folder):
    assert type(base) is StableDiffusionXL
    assert StableDiffusionXL.from_pretrained(base_folder).force_zeros_for_empty_prompt
    info = base.info()
    assert info["architecture"] == "Stable Diffusion XL (base)"
    assert info["parameters"]["text_encoder_2"] > 0 and info["native_size"].startswith("64x64")
    assert base.scheduler == "euler" and base.vae.config.scaling_factor == 0.13025


# Every deterministic sampler of jaxsd that diffusers' SDXL pipeline runs.
SAMPLERS = [None, "ddim", "pndm", "lms", "heun", "dpm2", "dpmpp_2m", "dpmpp_2s", "unipc", "deis"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_text_to_image_matches_diffusers(base, base_folder, sampler):
    ref = reference_xl_pipeline(base_folder, sampler=sampler)
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=3)
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=STEPS, latents=nchw, height=SIZE, width=SIZE,
                       output_type="np").images
    ours = base.text_to_image(PROMPT, num_steps=STEPS, latents=noise, height=SIZE, width=SIZE, scheduler=sampler)
    compare(ours, expected, f"txt2img {sampler or base.scheduler}")


@pytest.mark.parametrize("case", [
    dict(negative_prompt="blurry", prompt_2=["an oil painting", "a photo"], negative_prompt_2="a sketch"),
    dict(negative_prompt="", guidance_scale=7.0),  # "" is a prompt; None gives zeros
    dict(guidance_scale=1.0),                        # no guidance
    dict(prompt_2=["a lighthouse", "a tree"], clip_skip=1, guidance_scale=3.0),
    dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 48),
         negative_original_size=(32, 32), negative_target_size=(64, 64)),
    dict(original_size=(256, 256), negative_original_size=(32, 32)),  # one negative size: unused
], ids=["negatives_and_prompt_2", "empty_negative", "no_guidance", "clip_skip", "sizes", "one_negative_size"])
def test_conditioning_matches_diffusers(base, reference, case):
    # diffusers' text-to-image pipeline repeats [negative ids; ids] per image *after* joining
    # them, so with several images and negative sizes its rows mix the two halves' ids (its
    # img2img and inpaint pipelines do not): one image there, and the batch checked below.
    prompts = [PROMPT] if "negative_target_size" in case else [PROMPT, "a red circle"]
    nchw, noise = torch_noise((len(prompts), SIZE // 8, SIZE // 8, 4), seed=4)
    with torch.no_grad():
        expected = reference(prompts, num_inference_steps=STEPS, latents=nchw, height=SIZE,
                             width=SIZE, output_type="np", **case).images
    ours = base.text_to_image(prompts, num_steps=STEPS, latents=noise, height=SIZE, width=SIZE, **case)
    compare(ours, expected, f"txt2img {case}")


def test_negative_sizes_in_a_batch_are_each_images_own(base):
    case = dict(original_size=(128, 96), negative_original_size=(32, 32), negative_target_size=(64, 64),
                num_steps=2, height=SIZE, width=SIZE, output="latents")
    both = base.text_to_image([PROMPT, "a red circle"], seed=[1, 2], **case)
    for b, (prompt, seed) in enumerate([(PROMPT, 1), ("a red circle", 2)]):
        one = base.text_to_image(prompt, seed=seed, **case)[0]
        assert np.abs(both[b] - one).max() <= 1e-4 * np.abs(one).max()  # float32 batch vs one


def test_the_conditioning_is_traced_not_compiled(base):
    """Sizes, crops and the pooled text are inputs of the one compiled loop: new values, same program."""
    from jaxsd.sampling import loop
    base.text_to_image(PROMPT, num_steps=2, height=SIZE, width=SIZE, output="latents")
    before = loop._sample_jit._cache_size()
    a = base.text_to_image(PROMPT, num_steps=2, height=SIZE, width=SIZE, output="latents",
                           original_size=(512, 512), crops_coords_top_left=(32, 0))
    b = base.text_to_image(PROMPT, num_steps=2, height=SIZE, width=SIZE, output="latents")
    assert loop._sample_jit._cache_size() == before
    assert np.abs(a - b).max() > 1e-3  # and they do change the image


def test_precomputed_embeddings(base):
    emb = base.encode_prompt([PROMPT], "blurry", prompt_2="a drawing")
    kw = dict(num_steps=2, height=SIZE, width=SIZE, output="latents")
    expected = base.text_to_image(PROMPT, negative_prompt="blurry", prompt_2="a drawing", **kw)
    ours = base.text_to_image(prompt_embeds=emb.cond.text, pooled_prompt_embeds=emb.cond.added.text_embeds,
                              negative_prompt_embeds=emb.uncond.text,
                              negative_pooled_prompt_embeds=emb.uncond.added.text_embeds, **kw)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt_embeds needs pooled_prompt_embeds \[1, 24\]"):
        base.text_to_image(prompt_embeds=emb.cond.text, **kw)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds has shape \(1, 7\); expected \[1, 24\]"):
        base.text_to_image(prompt_embeds=emb.cond.text, pooled_prompt_embeds=np.zeros((1, 7)), **kw)


def test_sdxl_arguments_are_checked(base, caplog):
    kw = dict(num_steps=1, height=SIZE, width=SIZE, output="latents")
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['prompt3'\]; prompt3: not among its "
                                        r"arguments .*; SDXL's further arguments are"):
        base.text_to_image(PROMPT, prompt3="x", **kw)
    with pytest.raises(ValueError, match=r"original_size=\(64,\) must be a pair of numbers"):
        base.text_to_image(PROMPT, original_size=(64,), **kw)
    base.text_to_image(PROMPT, aesthetic_score=7.0, **kw)
    assert "aesthetic_score not used: only a refiner" in caplog.text
    base.text_to_image(PROMPT, negative_prompt="blurry", guidance_scale=1.0, **kw)
    assert "negative_prompt not used: there is no classifier-free guidance" in caplog.text
    with pytest.raises(ValueError, match=r"clip_skip=2 must be an integer in \[0, 1\]"):  # 3-layer encoders
        base.text_to_image(PROMPT, clip_skip=2, **kw)
    with pytest.raises(NotImplementedError, match="LoRAs for SDXL"):
        base.with_lora([])


def test_sd1_pipeline_refuses_sdxl_arguments(sd1):
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['prompt_2'\]; prompt_2: SDXL's conditioning "
                                        r"arguments need an SDXL checkpoint, and "):
        sd1.text_to_image(PROMPT, prompt_2="x", num_steps=1)


@pytest.mark.parametrize("sampler,strength", [(None, 0.6), ("dpmpp_2m", 0.75)])
def test_image_to_image_matches_diffusers(base, base_folder, picture, sampler, strength):
    ref = reference_xl_pipeline(base_folder, "image", sampler)
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=5)
    with torch.no_grad():
        expected = ref(PROMPT, image=picture, strength=strength, num_inference_steps=STEPS * 2,
                       generator=torch.Generator().manual_seed(5), output_type="np").images
    ours = base.image_to_image(picture, PROMPT, strength=strength, num_steps=STEPS * 2, scheduler=sampler,
                               latents=noise)
    compare(ours, expected, f"img2img {sampler or base.scheduler} {strength}")


def test_refiner_matches_diffusers(refiner_folder, picture):
    """The refiner: only the bigG encoder, 5 numbers (size, crop, aesthetic score), no zeroed
    negative (force_zeros_for_empty_prompt false), SDXL's image-to-image defaults."""
    refiner = StableDiffusion.from_pretrained(refiner_folder)
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    assert refiner.info()["architecture"] == "Stable Diffusion XL (refiner)"
    ref = reference_xl_pipeline(refiner_folder, "image")
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=6)
    for kw in ({}, dict(aesthetic_score=8.0, negative_aesthetic_score=1.0, negative_prompt="dull",
                        strength=0.7)):
        with torch.no_grad():
            expected = ref(PROMPT, image=picture, num_inference_steps=STEPS * 3,
                           generator=torch.Generator().manual_seed(6), output_type="np", **kw).images
        ours = refiner.image_to_image(picture, PROMPT, num_steps=STEPS * 3, latents=noise, **kw)
        compare(ours, expected, f"refiner {kw}")
    with pytest.raises(ValueError, match="is an SDXL refiner .* use image_to_image or inpaint"):
        refiner.text_to_image(PROMPT)


@pytest.mark.parametrize("sampler,strength", [(None, 0.9999), ("dpmpp_2m", 1.0)])
def test_inpaint_matches_diffusers(base, base_folder, picture, mask, sampler, strength):
    ref = reference_xl_pipeline(base_folder, "inpaint", sampler)
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=7)
    with torch.no_grad():
        expected = ref(PROMPT, image=picture, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                       height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(7),
                       output_type="np").images
    ours = base.inpaint(picture, mask, PROMPT, strength=strength, num_steps=STEPS, scheduler=sampler,
                        latents=noise)
    compare(ours, expected, f"inpaint {sampler or base.scheduler} {strength}")


def test_turbo_one_step(base_folder, tmp_path):
    """SDXL-Turbo's setup: Euler ancestral with trailing timesteps, one step, no guidance (one
    step ends at sigma 0, where the ancestral step adds no noise)."""
    folder = tmp_path / "turbo"
    shutil.copytree(base_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    turbo = StableDiffusion.from_pretrained(str(folder))
    assert turbo.scheduler == "euler_a"
    ref = reference_xl_pipeline(str(folder))
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=8)
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=nchw, height=SIZE,
                       width=SIZE, output_type="np").images
    ours = turbo.text_to_image(PROMPT, num_steps=1, guidance_scale=0.0, latents=noise, height=SIZE, width=SIZE)
    compare(ours, expected, "turbo")


def test_incomplete_sdxl_folders_are_named(base_folder, tmp_path):
    folder = tmp_path / "no_te2"
    shutil.copytree(base_folder, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match=r"missing the folders \['text_encoder_2'\]"):
        StableDiffusion.from_pretrained(str(folder))
    with pytest.raises(CheckpointError, match="'tiny-shapes' is a StableDiffusion checkpoint, not a "
                                              "StableDiffusionXL one"):
        StableDiffusionXL.from_pretrained("tiny-shapes")


@pytest.mark.parametrize("sampler,fraction", [(None, 0.8), ("dpmpp_2m", 0.7), ("heun", 0.75)])
def test_refiner_hand_off_matches_diffusers(base, base_folder, refiner_folder, sampler, fraction):
    """The "ensemble of experts": the base stops at denoising_end with its unfinished sampler
    state, the refiner continues from it (denoising_start, no noise added, no VAE round trip).
    heun: a second-order sampler, which diffusers' rule can cut between its two evaluations."""
    steps = 10
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=9)
    ref_base = reference_xl_pipeline(base_folder, sampler=sampler)
    ref_refiner = reference_xl_pipeline(refiner_folder, "image", sampler=sampler)
    with torch.no_grad():
        handed = ref_base(PROMPT, num_inference_steps=steps, denoising_end=fraction, latents=nchw, height=SIZE,
                          width=SIZE, output_type="latent").images
        expected = ref_refiner(PROMPT, image=handed, num_inference_steps=steps, denoising_start=fraction,
                               output_type="np").images
    refiner = StableDiffusion.from_pretrained(refiner_folder)
    latents = base.text_to_image(PROMPT, num_steps=steps, denoising_end=fraction, latents=noise, height=SIZE,
                                 width=SIZE, scheduler=sampler, output="latents")
    handed_nhwc = handed.permute(0, 2, 3, 1).numpy()
    assert np.abs(latents - handed_nhwc).max() <= 1e-4 * np.abs(handed_nhwc).max()
    ours = refiner.image_to_image(image_latents=latents, prompt=PROMPT, num_steps=steps, denoising_start=fraction,
                                  scheduler=sampler)
    compare(ours, expected, f"hand-off {sampler or base.scheduler} at {fraction}")


def test_hand_off_arguments_are_checked(base, caplog):
    kw = dict(num_steps=4, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"denoising_end=1.5 must be a number strictly between 0 and 1"):
        base.text_to_image(PROMPT, denoising_end=1.5, **kw)
    with pytest.raises(ValueError, match="pass exactly one of image .* and image_latents"):
        base.image_to_image(prompt=PROMPT, num_steps=4)
    with pytest.raises(ValueError, match=r"image_latents has shape \(1, 8, 8, 3\); expected scaled latents"):
        base.image_to_image(image_latents=np.zeros((1, 8, 8, 3)), prompt=PROMPT, denoising_start=0.5, num_steps=4)
    with pytest.raises(ValueError, match="denoising_start=0.8 must be below denoising_end=0.5"):
        base.image_to_image(image_latents=np.zeros((1, 8, 8, 4)), prompt=PROMPT, denoising_start=0.8,
                            denoising_end=0.5, num_steps=4)
    base.image_to_image(image_latents=np.zeros((1, 8, 8, 4)), prompt=PROMPT, denoising_start=0.5, strength=0.3,
                        num_steps=2, output="latents")
    assert "strength=0.3 is not used: denoising_start=0.5" in caplog.text


def test_float16_pipeline_decodes_in_float32(base_folder, base):
    """force_upcast (the SDXL VAE overflows float16): the VAE runs in float32, as diffusers'."""
    import jax.numpy as jnp
    half = StableDiffusion.from_pretrained(base_folder, dtype=jnp.float16)
    assert half.vae.dtype == jnp.float32 and half.vae_params["decoder"]["conv_in"]["kernel"].dtype == jnp.float32
    assert half.unet_params["conv_in"]["kernel"].dtype == jnp.float16
    # (XLA's CPU backend has no float16 matmul, so the float16 UNet itself runs on GPUs only.)
    latents = base.text_to_image(PROMPT, num_steps=2, height=SIZE, width=SIZE, output="latents")
    assert max_diff(half.decode(latents), base.decode(latents)) <= 2  # weights rounded to float16


def test_command_line_base_then_refiner(base, base_folder, refiner_folder, tmp_path):
    """jaxsd generate --refiner: the same images as the API's hand-off, SDXL's default guidance
    (5.0), both models recorded in the PNG's parameters."""
    from jaxsd.cli import main
    assert main(["generate", PROMPT, "--model", base_folder, "--refiner", refiner_folder, "--steps", "6",
                 "--seed", "3", "--size", f"{SIZE}x{SIZE}", "--out", str(tmp_path)]) == 0
    png = Image.open(next(tmp_path.glob("*.png")))
    fields = png.text["parameters"].splitlines()[-1]
    assert "CFG scale: 5.0," in fields and fields.endswith(
        f"Refiner: {refiner_folder.rstrip('/').split('/')[-1]}, Refiner switch at: 0.8")
    refiner = StableDiffusion.from_pretrained(refiner_folder)
    latents = base.text_to_image(PROMPT, num_steps=6, seed=[3], denoising_end=0.8, output="latents",
                                 height=SIZE, width=SIZE)
    expected = refiner.image_to_image(image_latents=latents, prompt=PROMPT, num_steps=6, seed=[3],
                                      denoising_start=0.8)
    assert max_diff(np.asarray(png)[None], expected) <= 1


def test_single_file_gives_the_same_images(base, base_folder, tmp_path):
    """The tiny SDXL folder written as one original (SGM-layout) file: the same images, bit for
    bit. What the tensors cannot show (head counts, groups, the tiny id width 8, which real files
    fix at 256) is passed as overrides, as for SD files."""
    from pathlib import Path

    from jaxsd.checkpoints.files import read_config, read_state_dict
    from jaxsd.checkpoints.ldm_arch import UNSEEN
    from jaxsd.checkpoints.single_file import write_single_file
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    configs = {p: read_config(Path(base_folder) / p) for p in parts}
    state_dicts = {p: {k: np.asarray(v) for k, v in read_state_dict(Path(base_folder) / p).items()} for p in parts}
    write_single_file(tmp_path / "xl.safetensors", state_dicts, configs, "sdxl")
    overrides = {f"{c}_config": {k: configs[c][k] for k in keys} for c, keys in UNSEEN.items() if c in configs}
    overrides["unet_config"]["addition_time_embed_dim"] = configs["unet"]["addition_time_embed_dim"]
    single = StableDiffusion.from_pretrained(str(tmp_path / "xl.safetensors"), **overrides)
    assert type(single) is StableDiffusionXL and single.info_architecture() == "Stable Diffusion XL (base)"
    kw = dict(negative_prompt="blurry", num_steps=3, height=SIZE, width=SIZE, seed=2)
    np.testing.assert_array_equal(single.text_to_image(PROMPT, **kw), base.text_to_image(PROMPT, **kw))
