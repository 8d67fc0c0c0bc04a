"""jaxsd.models.vae against diffusers.AutoencoderKL (PyTorch, CPU), with random weights.

Every parameter of the reference is re-drawn (conv/linear weights N(0, 1/fan_in), norm scales
N(1, 0.1^2), biases N(0, 0.1^2)) so that no layer is a zero-initialised no-op, saved with
``save_pretrained`` and loaded through :func:`jaxsd.checkpoints.components.load_vae`.

Tolerances (float32): posterior mean, log-variance and decoder output must agree to a max abs
error of 1e-4 x the reference's max abs value. Measured on the 2-core CPU (max abs error /
max abs value of the output):
    tiny config, 32x32, batch 2      3.1e-6 / 2.2 (mean), 3.0e-6 / 2.4 (logvar), 4.1e-6 / 3.0 (decoded)
    SD 1.x/2.x config, 64x64         8.2e-6 / 2.2 (mean), 1.6e-5 / 2.5 (logvar), 1.5e-5 / 2.3 (decoded)

bfloat16 (parameters and compute; GroupNorm statistics and attention scores in float32) against
our float32 at the SD config, 64x64: the max abs error must stay under 5% of the output's max
abs value. Measured: 2.9e-2 (mean), 4.3e-2 (logvar), 7.0e-2 (decoded) on outputs of scale
2.2-2.5, i.e. 1.3-3.0%, mean abs errors 7-9e-3. diffusers' own bfloat16 model against its
float32 gives 3.7e-2, 3.9e-2 and 5.0e-2 on the same weights: the same order.
"""
import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import load_file, save_file

from jaxsd.checkpoints import convert
from jaxsd.checkpoints.components import load_vae
from jaxsd.models.vae import (SD_VAE, TINY_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig, image_to_latents,
                              latents_to_image)

WEIGHTS = "diffusion_pytorch_model.safetensors"
RTOL_F32 = 1e-4           # max abs error / max abs reference value, float32
BF16_RTOL = 5e-2          # max abs error / max abs float32 value, bfloat16 vs float32


def diffusers_kwargs(config: VAEConfig, **extra) -> dict:
    levels = len(config.block_out_channels)
    return dict(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                norm_num_groups=config.norm_num_groups, latent_channels=config.latent_channels,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, **extra)


def random_reference(config: VAEConfig, seed: int = 0, **extra) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**diffusers_kwargs(config, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)    # weights: N(0, 1/fan_in)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)                     # GroupNorm scales around 1
            else:
                p.normal_(0.0, 0.1)                     # biases
    return model


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float32).transpose(0, 3, 1, 2).copy())


def max_rel_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def jitted(model):
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    return encode, decode


def compare_with_reference(reference, folder, images_BCHW, rtol=RTOL_F32, **load_kwargs):
    """Encode and decode with both; return the three relative errors after asserting them."""
    with torch.no_grad():
        posterior = reference.encode(images_BCHW).latent_dist
        decoded = reference.decode(posterior.mean).sample
    model, params = load_vae(folder, **load_kwargs)
    encode, decode = jitted(model)
    ours = encode(params, jnp.asarray(nhwc(images_BCHW)))
    assert isinstance(ours, DiagonalGaussian)
    errors = {"mean": max_rel_error(ours.mean, nhwc(posterior.mean)),
              "logvar": max_rel_error(ours.logvar, nhwc(posterior.logvar)),
              "decoded": max_rel_error(decode(params, jnp.asarray(nhwc(posterior.mean))), nhwc(decoded))}
    assert all(e < rtol for e in errors.values()), errors
    return errors


def images(batch, size, seed=0, channels=3):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    reference = random_reference(TINY_VAE)
    folder = tmp_path_factory.mktemp("tiny_vae")
    reference.save_pretrained(folder)
    return reference, folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    reference = random_reference(SD_VAE, seed=1)
    folder = tmp_path_factory.mktemp("sd_vae")
    reference.save_pretrained(folder)
    return reference, folder


# ---------------------------------------------------------------------------------------------
# Equivalence with diffusers

def test_tiny_config_matches_diffusers(tiny):
    reference, folder = tiny
    compare_with_reference(reference, folder, images(2, 32, seed=3))


@pytest.mark.parametrize("flags", [dict(mid_block_add_attention=False),
                                   dict(use_quant_conv=False, use_post_quant_conv=False)])
def test_optional_parts_match_diffusers(tmp_path, flags):
    reference = random_reference(TINY_VAE, seed=2, **flags)
    reference.save_pretrained(tmp_path)
    compare_with_reference(reference, tmp_path, images(1, 16))


@pytest.fixture(scope="module")
def sd_float32(sd):
    """Our float32 SD-config VAE on one 64x64 image: shared by the equivalence and bf16 tests."""
    _, folder = sd
    model, params = load_vae(folder)
    encode, decode = jitted(model)
    x_BCHW = images(1, 64, seed=3)
    posterior = encode(params, jnp.asarray(nhwc(x_BCHW)))
    return model, x_BCHW, posterior, decode(params, posterior.mean)


@pytest.mark.slow
def test_sd_config_matches_diffusers(sd, sd_float32):
    """The real SD 1.x/2.x VAE config (83.7M parameters) at a 64x64 image."""
    reference, _ = sd
    model, x_BCHW, posterior, decoded = sd_float32
    assert model.config == SD_VAE
    with torch.no_grad():
        expected = reference.encode(x_BCHW).latent_dist
        expected_decoded = reference.decode(expected.mean).sample
    errors = {"mean": max_rel_error(posterior.mean, nhwc(expected.mean)),
              "logvar": max_rel_error(posterior.logvar, nhwc(expected.logvar)),
              "decoded": max_rel_error(decoded, nhwc(expected_decoded))}
    assert all(e < RTOL_F32 for e in errors.values()), errors


def rename_attention_keys(folder, out_folder, as_conv1x1: bool):
    """Rewrite a saved VAE with the old AttentionBlock names (and optionally 1x1-conv shapes)."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, tensor in load_file(folder / WEIGHTS).items():
        for new_name, old_name in old.items():
            if f".attentions.0.{new_name}." in key:
                key = key.replace(f".{new_name}.", f".{old_name}.")
                if as_conv1x1 and key.endswith("weight"):
                    tensor = tensor[:, :, None, None]
        state[key] = tensor.contiguous()
    out_folder.mkdir()
    save_file(state, out_folder / WEIGHTS)
    (out_folder / "config.json").write_text((folder / "config.json").read_text())
    return state


@pytest.mark.parametrize("as_conv1x1", [False, True])
def test_old_attention_key_names(tiny, tmp_path, as_conv1x1):
    reference, folder = tiny
    state = rename_attention_keys(folder, tmp_path / "old", as_conv1x1)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    _, params = load_vae(folder)
    _, params_old = load_vae(tmp_path / "old")
    jax.tree.map(np.testing.assert_array_equal, params_old, params)
    if not as_conv1x1:  # diffusers itself reads these names (it refuses the 1x1-conv shapes)
        renamed = TorchAutoencoderKL.from_pretrained(tmp_path / "old").eval()
        compare_with_reference(renamed, tmp_path / "old", images(1, 16))
    # Writing back gives diffusers' current names only.
    written = convert.to_reference(params_old, convert.VAE)
    assert set(written) == set(reference.state_dict())


def test_to_reference_round_trip(tiny):
    reference, folder = tiny
    _, params = load_vae(folder)
    written = convert.to_reference(params, convert.VAE)
    expected = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert set(written) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(written[key], expected[key], err_msg=key)


def test_fp16_variant(tiny, tmp_path):
    reference, _ = tiny
    copy.deepcopy(reference).half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    # The reference runs the fp16-rounded weights in float32; so do we.
    rounded = TorchAutoencoderKL.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32).eval()
    compare_with_reference(rounded, tmp_path, images(2, 16, seed=4), variant="fp16")


# ---------------------------------------------------------------------------------------------
# bfloat16

@pytest.mark.slow
def test_bfloat16_close_to_float32(sd, sd_float32):
    """bf16 parameters and compute (GroupNorm and attention scores in float32) vs our float32."""
    _, folder = sd
    _, x_BCHW, posterior, decoded = sd_float32
    model, params = load_vae(folder, dtype=jnp.bfloat16)
    assert params["decoder"]["conv_out"]["kernel"].dtype == jnp.bfloat16
    encode, decode = jitted(model)
    posterior_bf16 = encode(params, jnp.asarray(nhwc(x_BCHW)))
    assert posterior_bf16.mean.dtype == jnp.float32  # outputs stay float32
    # Both decode the float32 mean, so the decoder's error is its own.
    errors = {"mean": max_rel_error(posterior_bf16.mean, posterior.mean),
              "logvar": max_rel_error(posterior_bf16.logvar, posterior.logvar),
              "decoded": max_rel_error(decode(params, posterior.mean), decoded)}
    assert all(e < BF16_RTOL for e in errors.values()), errors


# ---------------------------------------------------------------------------------------------
# The posterior

def test_posterior_sample_mode_and_clamp(tiny):
    _, folder = tiny
    model, params = load_vae(folder)
    encode, _ = jitted(model)
    posterior = encode(params, jnp.asarray(nhwc(images(2, 64))))
    assert posterior.mode() is posterior.mean
    z = posterior.sample(jax.random.key(0))
    np.testing.assert_array_equal(z, posterior.sample(jax.random.key(0)))
    assert not np.array_equal(z, posterior.sample(jax.random.key(1)))
    eps = np.asarray((z - posterior.mean) / posterior.std)  # should be N(0, 1): 8192 draws
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    np.testing.assert_allclose(posterior.std, np.exp(0.5 * np.asarray(posterior.logvar)), rtol=1e-6)
    # diffusers clamps logvar to [-30, 20]: push the logvar half of quant_conv's bias far out.
    C = model.config.latent_channels
    for push, bound in ((1e4, 20.0), (-1e4, -30.0)):
        bias = params["quant_conv"]["bias"].at[C:].add(push)
        pushed = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
        np.testing.assert_array_equal(encode(pushed, jnp.zeros((1, 16, 16, 3))).logvar, bound)


# ---------------------------------------------------------------------------------------------
# Helpers: pictures <-> scaled latents

def test_image_to_latents_and_back_match_diffusers(tiny):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    reference, folder = tiny
    model, params = load_vae(folder)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    processor = VaeImageProcessor(vae_scale_factor=model.config.downsample_factor)
    sf = reference.config.scaling_factor
    with torch.no_grad():  # as the img2img pipeline, with the mean instead of a sample
        x = processor.preprocess([Image.fromarray(p) for p in pixels])
        expected = reference.encode(x).latent_dist.mean * sf
    latents = image_to_latents(model, params, pixels)
    assert max_rel_error(latents, nhwc(expected)) < RTOL_F32
    single = image_to_latents(model, params, Image.fromarray(pixels[1]))  # PIL, unbatched
    np.testing.assert_allclose(single, latents[1:], atol=1e-5)

    with torch.no_grad():  # as the text-to-image pipeline's decode + postprocess
        decoded = reference.decode(expected / sf).sample
        expected_pixels = (processor.postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)
    ours = latents_to_image(model, params, latents)
    assert ours.dtype == np.uint8 and ours.shape == (2, 32, 32, 3)
    diff = np.abs(ours.astype(int) - expected_pixels)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # only rounding ties may differ

    # sampling: same key, same latents; the mean is what key=None returns
    key = jax.random.key(7)
    np.testing.assert_array_equal(image_to_latents(model, params, pixels, key),
                                  image_to_latents(model, params, pixels, key))


def test_helpers_apply_shift_factor(tiny):
    _, params = load_vae(tiny[1])
    model = AutoencoderKL(dataclasses.replace(TINY_VAE, scaling_factor=1.5, shift_factor=0.25))
    encode, decode = jitted(model)
    pixels = np.full((16, 16, 3), 200, np.uint8)
    mean = encode(params, jnp.full((1, 16, 16, 3), 2 * 200 / 255 - 1)).mean
    latents = image_to_latents(model, params, pixels)
    np.testing.assert_allclose(latents, (mean - 0.25) * 1.5, rtol=1e-5, atol=1e-6)
    x = decode(params, latents / 1.5 + 0.25)
    expected = (np.clip(np.asarray(x) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
    diff = np.abs(latents_to_image(model, params, latents).astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2  # only rounding ties may differ


# ---------------------------------------------------------------------------------------------
# Errors

@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_vae(tiny[1])


@pytest.mark.parametrize("shape, dtype, message", [
    ((1, 17, 16, 3), jnp.float32, "17x16 must both be multiples of 2"),
    ((1, 16, 16, 4), jnp.float32, "has 4 channels"),
    ((1, 3, 16, 16), jnp.float32, "NHWC"),                     # an NCHW batch
    ((16, 16, 3), jnp.float32, "4-D NHWC"),
    ((1, 16, 16, 3), jnp.uint8, "p / 127.5 - 1"),
])
def test_encode_rejects_bad_images(tiny_model, shape, dtype, message):
    model, params = tiny_model
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, jnp.zeros(shape, dtype), method=model.encode)


def test_decode_rejects_wrong_latent_channels(tiny_model):
    model, params = tiny_model
    with pytest.raises(ValueError, match="has 3 channels.*latent_channels=4"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method=model.decode)


@pytest.mark.parametrize("image, message", [
    (np.zeros((16, 16, 3), np.float32), "uint8 pixels in \\[0, 255\\]; got dtype float32"),
    (np.full((16, 16, 3), 300, np.int64), "values in \\[300, 300\\]"),
    (np.zeros((16, 16, 4), np.uint8), "got shape \\(16, 16, 4\\)"),
    (np.zeros((16, 16), np.uint8), "got shape \\(16, 16\\)"),
])
def test_image_helper_rejects_bad_pixels(tiny_model, image, message):
    model, params = tiny_model
    with pytest.raises(ValueError, match=message):
        image_to_latents(model, params, image)


def test_image_helper_accepts_integer_pixels_in_range(tiny_model):
    model, params = tiny_model
    pixels = np.arange(16 * 16 * 3).reshape(16, 16, 3) % 256
    np.testing.assert_array_equal(image_to_latents(model, params, pixels),
                                  image_to_latents(model, params, pixels.astype(np.uint8)))


def test_wrong_shaped_weight_names_the_key(tiny, tmp_path):
    _, folder = tiny
    state = load_file(folder / WEIGHTS)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:, :-1].contiguous()
    del state["encoder.conv_in.bias"]
    state["decoder.mid_block.attentions.0.query.bias"] = state["decoder.mid_block.attentions.0.to_q.bias"].clone()
    save_file(state, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(convert.ConversionError) as error:
        load_vae(tmp_path)
    message = str(error.value)
    assert "decoder.conv_out.weight -> decoder/conv_out/kernel: checkpoint (3, 3, 31, 3)" in message
    assert "missing" in message and "encoder/conv_in/bias" in message
    # given twice, under the old and the new name
    assert "decoder/mid/attention/query/bias, which decoder.mid_block.attentions.0.query.bias" in message


@pytest.mark.parametrize("change, message", [
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
    ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
    ({"norm_num_groups": 24}, "not divisible by norm_num_groups=24"),
])
def test_unsupported_config_is_refused(tiny, change, message):
    _, folder = tiny
    config = {**json.loads((folder / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict(config)
