"""Image-to-image and inpainting against diffusers; single-file checkpoints against their folder."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_reference import (PROMPT, deterministic_reference_posterior, inpainting_folder, mask,  # noqa: F401
                                max_diff, picture, reference_pipeline, sd1,
                                sd1_folder, sd2, sd2_folder, to_uint8, torch_noise)
from jaxsd import StableDiffusion


# diffusers' posterior sample is its mean here (pipeline_reference.deterministic_reference_posterior)
pytestmark = pytest.mark.usefixtures("deterministic_reference_posterior")
SIZE, STEPS = 64, 5


@pytest.mark.parametrize("version,sampler,resize", [("sd1", None, False), ("sd1", None, True),
                                                    ("sd1", None, "array"),
                                                    ("sd1", "euler", False), ("sd2", None, False)])
def test_image_to_image_matches_diffusers(version, sampler, resize, picture, request):
    pipe, folder = request.getfixturevalue(version), request.getfixturevalue(f"{version}_folder")
    if resize:  # 84 x 70 -> rounded down to 80 x 64, Lanczos-resized on both sides
        picture = picture.resize((84, 70), Image.BICUBIC)
    if resize == "array":  # random floats in [0, 1], 84 x 70: nearest neighbour on both sides
        picture = np.random.default_rng(3).random((70, 84, 3)).astype(np.float32)
    ref = reference_pipeline(folder, "image", sampler)
    h, w = (64, 80) if resize else (SIZE, SIZE)
    nchw, noise = torch_noise((1, h // 8, w // 8, 4), seed=5)  # = the generator's first draw
    with torch.no_grad():
        expected = to_uint8(ref(PROMPT, image=picture, strength=0.6, num_inference_steps=STEPS,
                                generator=torch.Generator().manual_seed(5), output_type="np").images)
    ours = pipe.image_to_image(picture, PROMPT, strength=0.6, num_steps=STEPS, scheduler=sampler,
                               latents=noise)
    diff = max_diff(ours, expected)
    assert ours.shape == (1, h, w, 3)
    print(f"img2img {version} {sampler or pipe.scheduler}{' resized' if resize else ''}: max pixel difference {diff}/255")
    assert diff <= 2


@pytest.mark.parametrize("kind,sampler,strength", [
    ("sd1", None, 1.0), ("sd1", "dpmpp_2m", 1.0), ("sd1", "euler", 0.7), ("inpainting", None, 1.0),
    ("inpainting", "euler", 0.7)])
def test_inpaint_matches_diffusers(kind, sampler, strength, picture, mask, request):
    folder = request.getfixturevalue(f"{kind}_folder")
    pipe = request.getfixturevalue("sd1") if kind == "sd1" else inpainting_pipe(folder)
    ref = reference_pipeline(folder, "inpaint", sampler)
    nchw, noise = torch_noise((1, SIZE // 8, SIZE // 8, 4), seed=7)
    with torch.no_grad():
        expected = to_uint8(ref(PROMPT, image=picture, mask_image=mask, strength=strength,
                                num_inference_steps=STEPS, height=SIZE, width=SIZE,
                                generator=torch.Generator().manual_seed(7), output_type="np").images)
    ours = pipe.inpaint(picture, mask, PROMPT, strength=strength, num_steps=STEPS, scheduler=sampler,
                        latents=noise)
    diff = max_diff(ours, expected)
    print(f"inpaint {kind} {sampler or pipe.scheduler} strength {strength}: max pixel difference {diff}/255")
    assert diff <= 2


_INPAINTING = {}


def inpainting_pipe(folder):
    if folder not in _INPAINTING:
        _INPAINTING[folder] = StableDiffusion.from_pretrained(folder)
    return _INPAINTING[folder]


def test_image_inputs_and_their_errors(sd1, picture, mask):
    kw = dict(num_steps=2, seed=1, output="latents")
    as_pil = sd1.image_to_image(picture, PROMPT, **kw)
    as_array = sd1.image_to_image(np.asarray(picture), PROMPT, **kw)
    np.testing.assert_array_equal(as_pil, as_array)
    with pytest.raises(ValueError, match=r"strength=1.5 must lie in \(0, 1\]"):
        sd1.image_to_image(picture, PROMPT, strength=1.5)
    with pytest.raises(ValueError, match=r"strength=0 must lie in \(0, 1\]"):
        sd1.inpaint(picture, mask, PROMPT, strength=0)
    with pytest.raises(ValueError, match=r"mask size \(32, 32\).*does not match the image size \(64, 64\)"):
        sd1.inpaint(picture, mask.resize((32, 32)), PROMPT)


@pytest.mark.parametrize("size,out", [((70, 100), (64, 96)), ((64, 64), (128, 128)), ((97, 61), (56, 48)),
                                      ((512, 512), (64, 64))])
def test_array_inputs_are_prepared_as_diffusers_prepares_them(size, out):
    """Images and masks given as arrays (not PIL): diffusers turns them into tensors and resizes
    them with torch's F.interpolate (nearest), then normalises (images) or binarises (masks);
    jaxsd's prepared pixels must be those exactly (random pixels, so that any other resampling
    shows). PIL inputs are Lanczos-resized by PIL on both sides (the tests above)."""
    from diffusers.image_processor import VaeImageProcessor
    from jaxsd.pipelines import images

    rng = np.random.default_rng(0)
    batch = rng.random((2, *size, 3)).astype(np.float32)
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(batch, *out).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images.prepare_image(batch, *out), theirs)
    masks = rng.random((2, *size)).astype(np.float32)
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    theirs = processor.preprocess(masks, *out).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images.prepare_mask(masks, *out), theirs)


@pytest.mark.parametrize("size_in", [1, 3, 7, 64, 70, 97, 333, 512, 1000, 2049])
def test_nearest_indices_are_torchs(size_in):
    from jaxsd.pipelines.images import nearest_indices
    for size_out in (1, 8, 48, 64, 96, 2 * size_in, size_in, 512, 1016):
        x = torch.arange(size_in, dtype=torch.float32).view(1, 1, size_in, 1)
        expected = torch.nn.functional.interpolate(x, size=(size_out, 1)).view(-1).long().numpy()
        np.testing.assert_array_equal(nearest_indices(size_in, size_out), expected, f"{size_in} -> {size_out}")


def test_channel_first_arrays_are_refused(sd1, picture):
    pixels = np.asarray(picture, np.float32) / 255
    for image in (pixels.transpose(2, 0, 1), pixels.transpose(2, 0, 1)[None]):
        with pytest.raises(ValueError, match=r"image array has shape \((1, )?3, 64, 64\); jaxsd takes "
                                             r"\[H, W, 3\] or \[B, H, W, 3\]: channels first"):
            sd1.image_to_image(image, PROMPT, num_steps=2)
    with pytest.raises(ValueError, match=r"image array has shape \(64, 64, 4\); jaxsd takes \[H, W, 3\]"):
        sd1.image_to_image(np.zeros((64, 64, 4), np.float32), PROMPT, num_steps=2)
    with pytest.raises(ValueError, match=r"mask array has shape \(1, 1, 64, 64\); .*: channels first"):
        sd1.inpaint(pixels, np.zeros((1, 1, 64, 64), np.float32), PROMPT, num_steps=1)


def test_diffusers_argument_names_get_jaxsds(sd1, picture):
    with pytest.raises(TypeError, match=r"text_to_image\(\) got unexpected argument\(s\) "
                                        r"\['num_images_per_prompt', 'num_inference_steps'\]; "
                                        r"num_images_per_prompt is batch_size .* in jaxsd; "
                                        r"num_inference_steps is num_steps in jaxsd"):
        sd1.text_to_image(PROMPT, num_inference_steps=2, num_images_per_prompt=2)
    with pytest.raises(TypeError, match=r"inpaint\(\) got unexpected argument\(s\) \['padding_mask_crop'\]; "
                                        r"padding_mask_crop: not among its arguments"):
        sd1.inpaint(picture, picture, PROMPT, padding_mask_crop=8)


def test_single_file_checkpoint_gives_the_same_images(sd1, sd1_folder, tmp_path):
    from jaxsd.checkpoints.files import read_config, read_state_dict
    from jaxsd.checkpoints.single_file import write_single_file

    parts = ("unet", "vae", "text_encoder")
    configs = {p: read_config(f"{sd1_folder}/{p}") for p in parts}
    state_dicts = {p: dict(read_state_dict(f"{sd1_folder}/{p}")) for p in parts}
    path = tmp_path / "sd1-tiny.safetensors"
    write_single_file(path, state_dicts, configs, "sd1")
    # What the tensors cannot show: head counts and GroupNorm groups of this tiny model.
    single = StableDiffusion.from_pretrained(
        path, unet_config={"attention_head_dim": configs["unet"]["attention_head_dim"],
                           "norm_num_groups": configs["unet"]["norm_num_groups"]},
        vae_config={"norm_num_groups": configs["vae"]["norm_num_groups"]},
        text_encoder_config={"num_attention_heads": configs["text_encoder"]["num_attention_heads"]})
    assert single.scheduler == "pndm"
    # default size: the folder's unet sample_size (8 latents x 8); the single file's inferred 512
    assert (sd1.default_size, single.default_size) == (64, 512)
    kw = dict(num_steps=STEPS, height=SIZE, width=SIZE, seed=4, scheduler="euler")
    np.testing.assert_array_equal(single.text_to_image(PROMPT, **kw), sd1.text_to_image(PROMPT, **kw))
