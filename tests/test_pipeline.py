"""Text-to-image against diffusers' StableDiffusionPipeline, on the same random-weight checkpoint."""
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pipeline_reference import (PROMPT, max_diff, reference_pipeline, sd1, sd1_folder, sd2,  # noqa: F401
                                sd2_folder, to_uint8, torch_noise)
from jaxsd import StableDiffusion
from jaxsd.checkpoints.files import CheckpointError

SIZE, STEPS = 64, 5
# tcd: deterministic with the pipelines' default eta (its gamma) of 0
DETERMINISTIC = ["ddim", "pndm", "lms", "euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_2s", "unipc", "deis", "tcd"]
KARRAS = [s for s in DETERMINISTIC if s not in ("ddim", "pndm", "tcd")]
CASES = ([(s, False) for s in DETERMINISTIC] + [(s, True) for s in KARRAS])


def reference_images(folder, sampler=None, karras=False, *, prompt=PROMPT, batch=1, per_prompt=1,
                     seed=0, **kwargs):
    pipe = reference_pipeline(folder, sampler=sampler, karras=karras)
    if not hasattr(pipe.text_encoder, "text_model"):
        # diffusers 0.42's clip_skip calls text_encoder.text_model.final_layer_norm, which
        # transformers 5 flattened into text_encoder.final_layer_norm; give it the old path.
        pipe.text_encoder.text_model = types.SimpleNamespace(
            final_layer_norm=pipe.text_encoder.final_layer_norm)
    nchw, nhwc = torch_noise((batch, SIZE // 8, SIZE // 8, 4), seed)
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=nchw,
                   num_images_per_prompt=per_prompt, output_type="np", **kwargs).images
    return to_uint8(out), nhwc


@pytest.mark.parametrize("sampler,karras", CASES, ids=[f"{s}{'-karras' if k else ''}" for s, k in CASES])
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_text_to_image_matches_diffusers(version, sampler, karras, request):
    pipe, folder = request.getfixturevalue(version), request.getfixturevalue(f"{version}_folder")
    expected, noise = reference_images(folder, sampler, karras)
    ours = pipe.text_to_image(PROMPT, num_steps=STEPS, height=SIZE, width=SIZE, latents=noise,
                              scheduler=sampler, karras=karras)
    assert ours.dtype == np.uint8 and ours.shape == (1, SIZE, SIZE, 3)
    diff = max_diff(ours, expected)
    print(f"{version} {sampler}{' karras' if karras else ''}: max pixel difference {diff}/255")
    assert diff <= 2


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    from pipeline_reference import save_checkpoint
    return save_checkpoint(tmp_path_factory.mktemp("lcm"), lcm=True, seed=3)


@pytest.mark.parametrize("sampler,steps,guidance", [("lcm", 4, 8.0), ("lcm", 1, 1.0), ("tcd", 4, 3.0)])
def test_latent_consistency_model_matches_diffusers(lcm_folder, sampler, steps, guidance):
    """An LCM checkpoint (UNet with time_cond_proj_dim, LCMScheduler): the guidance scale goes
    into the UNet as an embedding, one pass per step, no classifier-free guidance, as diffusers'
    StableDiffusionPipeline does. LCM's fresh noise at each step is jaxsd's, handed to diffusers."""
    import diffusers.schedulers.scheduling_lcm as lcm_module

    from jaxsd import sampling
    from jaxsd.pipelines.stable_diffusion import key_from_seed

    pipe = StableDiffusion.from_pretrained(lcm_folder)
    assert pipe.scheduler == "lcm" and pipe.embeds_guidance
    seed, shape = 5, (1, SIZE // 8, SIZE // 8, 4)
    sampler_key = jax.random.split(key_from_seed(seed), 3)[1]
    noises = [torch.from_numpy(np.asarray(sampling.step_noise(sampler_key, i, shape))).permute(0, 3, 1, 2)
              for i in range(steps)]
    reference = reference_pipeline(lcm_folder, sampler=None if sampler == "lcm" else sampler)
    nchw, nhwc = torch_noise(shape, seed)
    saved, lcm_module.randn_tensor = lcm_module.randn_tensor, lambda *a, **k: noises.pop(0)
    try:
        with torch.no_grad():
            expected = reference(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
                                 width=SIZE, latents=nchw, output_type="np").images
    finally:
        lcm_module.randn_tensor = saved
    ours = pipe.text_to_image(PROMPT, num_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                              latents=nhwc, seed=seed, scheduler=sampler)
    diff = max_diff(ours, to_uint8(expected))
    print(f"lcm checkpoint, {sampler} {steps} steps, w = {guidance}: max pixel difference {diff}/255")
    assert diff <= 2
    # the guidance scale is an input here, not a mix of two passes: another w, another image
    other = pipe.text_to_image(PROMPT, num_steps=steps, guidance_scale=guidance + 3, height=SIZE, width=SIZE,
                               latents=nhwc, seed=seed, scheduler=sampler)
    assert max_diff(other, ours) > 2


def test_negative_prompt_without_guidance_is_reported(lcm_folder, sd1, caplog):
    """No classifier-free guidance (w <= 1, or an LCM UNet), so a negative prompt does nothing
    (as in diffusers): said in a warning, not silently dropped."""
    lcm = StableDiffusion.from_pretrained(lcm_folder)
    for pipe, w, why in ((lcm, 8.0, "time_cond_proj_dim"), (sd1, 1.0, "guidance_scale <= 1")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jaxsd.pipelines.stable_diffusion"):
            pipe.text_to_image(PROMPT, negative_prompt="blurry", num_steps=1, guidance_scale=w,
                               height=SIZE, width=SIZE, output="latents")
        assert "the negative prompt is not used" in caplog.text and why in caplog.text


def test_default_scheduler_is_the_checkpoints(sd1, sd2):
    assert sd1.scheduler == "pndm" and sd2.scheduler == "ddim"
    assert sd2.schedule.prediction_type == "v_prediction"


def test_prompt_lists_negative_prompts_and_batches(sd1, sd1_folder):
    prompts, negatives = [PROMPT, "a red cube on a table"], ["blurry", "low quality, watermark"]
    expected, noise = reference_images(sd1_folder, prompt=prompts, negative_prompt=negatives,
                                       batch=4, per_prompt=2, guidance_scale=6.0)
    ours = sd1.text_to_image(prompts, negative_prompt=negatives, batch_size=4, guidance_scale=6.0,
                             num_steps=STEPS, height=SIZE, width=SIZE, latents=noise)
    assert max_diff(ours, expected) <= 2


def test_clip_skip_guidance_rescale_and_no_guidance(sd2, sd2_folder):
    expected, noise = reference_images(sd2_folder, "euler", clip_skip=1, guidance_rescale=0.7)
    ours = sd2.text_to_image(PROMPT, num_steps=STEPS, height=SIZE, width=SIZE, latents=noise,
                             scheduler="euler", clip_skip=1, guidance_rescale=0.7)
    assert max_diff(ours, expected) <= 2
    expected, noise = reference_images(sd2_folder, "euler", guidance_scale=1.0)
    ours = sd2.text_to_image(PROMPT, num_steps=STEPS, height=SIZE, width=SIZE, latents=noise,
                             scheduler="euler", guidance_scale=1.0)
    assert max_diff(ours, expected) <= 2


def test_prompt_embeds_latents_and_trajectory(sd1):
    kw = dict(num_steps=STEPS, height=SIZE, width=SIZE, seed=3, scheduler="euler")
    images = sd1.text_to_image(PROMPT, negative_prompt="fog", **kw)
    emb = sd1.encode_prompt(PROMPT, "fog")
    again = sd1.text_to_image(prompt_embeds=emb.cond, negative_prompt_embeds=emb.uncond, **kw)
    np.testing.assert_array_equal(images, again)
    latents = sd1.text_to_image(PROMPT, negative_prompt="fog", output="latents", **kw)
    trajectory = sd1.text_to_image(PROMPT, negative_prompt="fog", output="trajectory", **kw)
    assert latents.shape == (1, SIZE // 8, SIZE // 8, 4) and trajectory.shape == (STEPS, 1, SIZE // 8, SIZE // 8, 4)
    np.testing.assert_allclose(trajectory[-1], latents, atol=1e-5)
    np.testing.assert_array_equal(sd1.decode(latents), images)


def test_one_compilation_per_shape_and_sampler(sd1):
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) \
        if event == "/jax/core/compile/backend_compile_duration" else None
    kw = dict(num_steps=STEPS, height=SIZE, width=SIZE, scheduler="dpmpp_2m")
    sd1.text_to_image("a cat", seed=1, guidance_scale=7.5, **kw)  # compiles (unless cached)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        sd1.text_to_image("a dog in the snow", seed=2, guidance_scale=4.0, negative_prompt="rain", **kw)
        sd1.text_to_image("a dog", seed=3, karras=True, **kw)  # Karras sigmas are traced numbers too
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations on the second call"


def test_bad_inputs_say_what_is_wrong(sd1, caplog):
    kw = dict(num_steps=2, height=SIZE, width=SIZE)
    m = sd1.vae_factor * sd1.latent_multiple
    with pytest.raises(ValueError, match=f"height=60 must be a positive multiple of {m} for this model"):
        sd1.text_to_image(PROMPT, num_steps=2, height=60, width=SIZE)
    with pytest.raises(ValueError, match="width=100000 must be .* at most 8192"):  # used to abort
        sd1.text_to_image(PROMPT, num_steps=2, height=SIZE, width=100_000)
    for seed in (2**64, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"seed=.* must be .*\[0, 2\*\*64 - 1\]"):
            sd1.text_to_image(PROMPT, seed=seed, **kw)
    with pytest.raises(ValueError, match="batch_size=3 must be a positive multiple of the number of prompts"):
        sd1.text_to_image(["a", "b"], batch_size=3, **kw)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but there are 2 prompts"):
        sd1.text_to_image(["a", "b"], negative_prompt=["x", "y", "z"], **kw)
    with pytest.raises(ValueError, match="unknown sampler='eulr'"):
        sd1.text_to_image(PROMPT, scheduler="eulr", **kw)
    with pytest.raises(ValueError, match=r"eta=0.3 is DDIM's \(and TCD's gamma\): sampler 'pndm' has none"):
        sd1.text_to_image(PROMPT, eta=0.3, **kw)
    with pytest.raises(ValueError, match="sampler 'pndm' has no Karras sigmas"):
        sd1.text_to_image(PROMPT, karras=True, **kw)
    with pytest.raises(ValueError, match=r"sampler 'euler_a' has no Karras sigmas.*'euler', 'heun'"):
        sd1.text_to_image(PROMPT, scheduler="euler_a", karras=True, **kw)
    with pytest.raises(ValueError, match=r"latents has shape \(1, 4, 4, 4\)"):
        sd1.text_to_image(PROMPT, latents=np.zeros((1, 4, 4, 4), np.float32), **kw)
    long_prompt = " ".join(["horse"] * 80) + " zebra"
    with caplog.at_level(logging.WARNING):
        sd1.encode_prompt(long_prompt)
    assert "truncated" in caplog.text and "zebra" in caplog.text


def test_nan_output_warns_with_the_likely_cause(sd1, caplog):
    poisoned = jax.tree_util.tree_map(lambda x: x * jnp.nan, sd1.vae_params)
    good, sd1.vae_params = sd1.vae_params, poisoned
    try:
        with caplog.at_level(logging.WARNING):
            images = sd1.decode(np.zeros((1, SIZE // 8, SIZE // 8, 4), np.float32))
    finally:
        sd1.vae_params = good
    assert images.dtype == np.uint8
    assert "NaN" in caplog.text and "float16" in caplog.text


def test_sources_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint.*model_index.json"):
        StableDiffusion.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE.*local path"):  # conftest sets it
        StableDiffusion.from_pretrained("jaxsd-tests/no-such-model")
    with pytest.raises(CheckpointError, match="neither a built-in model"):
        StableDiffusion.from_pretrained(str(tmp_path / "missing" / "model.safetensors"))



def test_a_scheduler_without_a_jaxsd_sampler_is_a_checkpoint_error(tmp_path):
    import json
    import shutil

    from jaxsd.checkpoints.sources import BUILTIN_MODELS

    folder = shutil.copytree(BUILTIN_MODELS["tiny-shapes"], tmp_path / "model")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "FlowMatchEulerDiscreteScheduler"}))
    with pytest.raises(CheckpointError, match=r"model.*FlowMatchEulerDiscreteScheduler.*no jaxsd "
                                              r"sampler.*EulerDiscreteScheduler"):
        StableDiffusion.from_pretrained(folder)

def test_hub_downloads_only_the_files_jaxsd_reads():
    from fnmatch import fnmatch

    from jaxsd.checkpoints.sources import hub_patterns

    repo = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
            "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
            "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors", "v1-5-pruned.ckpt",
            "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json"]
    pick = lambda variant: sorted(f for f in repo if any(fnmatch(f, p) for p in hub_patterns(variant)))
    assert pick("fp16") == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors"])
    assert "unet/diffusion_pytorch_model.safetensors" in pick(None)
    assert not [f for f in pick(None) if "fp16" in f or f.endswith((".bin", ".ckpt"))]


def test_named_schedule_is_a_pipeline_argument(sd1):
    """schedule="sgm_uniform" is the same as setting the explicit timesteps it stands for."""
    from jaxsd.sampling.schedule import named_schedule

    kw = dict(num_steps=4, height=SIZE, width=SIZE, seed=1, scheduler="dpmpp_2m", output="latents")
    named = sd1.text_to_image(PROMPT, schedule="sgm_uniform", **kw)
    saved = sd1.schedule
    try:
        sd1.schedule = named_schedule(saved, "sgm_uniform", 4)
        explicit = sd1.text_to_image(PROMPT, **kw)
    finally:
        sd1.schedule = saved
    np.testing.assert_array_equal(named, explicit)
    assert not np.allclose(named, sd1.text_to_image(PROMPT, **kw))
    with pytest.raises(ValueError, match=r"karras=True and schedule='simple' ask for two schedules"):
        sd1.text_to_image(PROMPT, schedule="simple", karras=True, **kw)
    with pytest.raises(ValueError, match=r"schedule='unifrom' is not supported; choose one of"):
        sd1.text_to_image(PROMPT, schedule="unifrom", **kw)
