"""jaxsd.models.unet against diffusers' UNet2DConditionModel (PyTorch), with random weights.

Each reference model gets fresh random parameters (weights N(0, 1/fan_in), norm scales
N(1, 0.1), biases N(0, 0.1)), so that layers diffusers initialises to zero or one cannot hide
a mistake; it is saved with ``save_pretrained`` and read back through ``load_unet``.

Tolerances (float32, on 2 CPU cores), stated as max |ours - diffusers| / max |diffusers|:
    float32:              <= 1e-4   (measured: 1.4e-6 to 3.3e-6 on the tiny configs; 2.9e-6 on
                                     SD 1.5 and 4.5e-6 on SD 2.1 at a 16x16 latent, that is a
                                     max abs error of 7e-6 and 1.1e-5 on outputs of scale 2.5)
    bfloat16 vs float32:  <= 5e-2   (measured: 1.4e-2 for SD 1.5 at 16x16 with bfloat16 compute
                                     and parameters, 1.6e-2 for SD 2.1; 2.0e-2 on the tiny SD 2
                                     config with float32 parameters), and no NaN.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.numpy import load_file, save_file

from jaxsd.checkpoints.components import load_unet
from jaxsd.checkpoints.convert import ConversionError
from jaxsd.models.layers import Conv, blocked_attention
from jaxsd.models.unet import SD15, SD21, SDXL_BASE, SDXL_REFINER, AddedCond, UNet, UNetConfig

FLOAT32_TOLERANCE = 1e-4   # of the output scale
BFLOAT16_TOLERANCE = 5e-2  # of the output scale

# The config.json files of the released checkpoints (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1, unet/config.json), as published.
_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, **_SD_BLOCKS,
}
SD21_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024, "downsample_padding": 1,
    "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True, **_SD_BLOCKS,
}
# Small configs that exercise every config field jaxsd reads.
TINY_CONFIGS = {
    # SD 1.x style: conv projections, one head count for all levels.
    "sd1": dict(block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
                cross_attention_dim=16, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    # SD 2.x style: linear projections, per-level heads, upcast attention, per-level transformer
    # depth; attention on the inner levels only (so up/down flags are not mirror images by accident).
    "sd2": dict(block_out_channels=[32, 64, 64], layers_per_block=2, attention_head_dim=[2, 4, 8],
                norm_num_groups=8, cross_attention_dim=24, use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=[1, 2, 1], flip_sin_to_cos=False, freq_shift=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    # Inpainting: latent + mask + masked-image latent; also a mid block without attention and
    # per-level layers_per_block.
    "inpaint": dict(block_out_channels=[32, 64], layers_per_block=[1, 2], attention_head_dim=4,
                    norm_num_groups=16, cross_attention_dim=16, in_channels=9,
                    mid_block_type="UNetMidBlock2D", down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    # SDXL style: micro-conditioning (pooled text of width 20 + 6 ids x 8), level 0 without
    # attention, per-level depth; a sinusoid with freq_shift 1 and no flip, so that an add_time_proj
    # that ignored the config's flags would fail.
    "sdxl": dict(block_out_channels=[32, 64, 64], layers_per_block=2, attention_head_dim=[2, 4, 8],
                 norm_num_groups=8, cross_attention_dim=24, use_linear_projection=True,
                 transformer_layers_per_block=[1, 2, 3], flip_sin_to_cos=False, freq_shift=1,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=20 + 6 * 8, addition_embed_type_num_heads=64,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    # The refiner's shape: 4 levels, attention only on the inner two, 5 ids (size, crop, score).
    "refiner": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=[2, 2, 4, 4],
                    norm_num_groups=8, cross_attention_dim=20, use_linear_projection=True,
                    transformer_layers_per_block=2, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 5 * 8,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
}
# Pooled width and number of ids of the configs with added conditioning.
ADDED = {"sdxl": (20, 6), "refiner": (12, 5)}


# ---------------------------------------------------------------------------------------------
# Helpers

def randomised_reference(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' UNet for ``config`` with every parameter drawn afresh (no zero-init layers)."""
    torch.manual_seed(seed)
    with torch.device("meta"):  # skip diffusers' own init: we overwrite every tensor anyway
        model = UNet2DConditionModel.from_config(config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scales
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model


def reference_output(model, sample_BHWC, timesteps, text, added=None) -> np.ndarray:
    """diffusers' output, NHWC. ``timesteps``: a Python number or an array; ``added``: an
    AddedCond of NumPy arrays (SDXL's added_cond_kwargs)."""
    t = timesteps if isinstance(timesteps, (int, float)) else torch.from_numpy(np.asarray(timesteps))
    kwargs = {}
    if added is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(added.text_embeds),
                                       "time_ids": torch.from_numpy(added.time_ids)}
    with torch.no_grad():
        out = model(torch.from_numpy(sample_BHWC).permute(0, 3, 1, 2), t, torch.from_numpy(text), **kwargs).sample
    return out.permute(0, 2, 3, 1).numpy()


def added_inputs(batch: int, pooled: int, ids: int, seed: int = 2) -> AddedCond:
    """A pooled embedding and micro-conditioning numbers as SDXL's pipelines make them (sizes in
    pixels, crops, an aesthetic score), different per sample."""
    rng = np.random.default_rng(seed)
    numbers = np.array([1024, 768, 0, 16, 1024, 1024, 6.0, 2.5], np.float32)
    time_ids = np.stack([np.roll(numbers, b)[:ids] for b in range(batch)])
    return AddedCond(rng.standard_normal((batch, pooled), dtype=np.float32), time_ids)


def inputs(config: UNetConfig, batch: int, size: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, config.in_channels), dtype=np.float32)
    text = rng.standard_normal((batch, 77, config.cross_attention_dim), dtype=np.float32)
    return sample, text


def relative_error(ours, reference) -> float:
    ours = np.asarray(ours, dtype=np.float32)
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def saved_reference(config: dict, folder) -> UNet2DConditionModel:
    model = randomised_reference(config)
    model.save_pretrained(folder)
    return model


# ---------------------------------------------------------------------------------------------
# Tiny configs: float32 equivalence, timesteps of every kind

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (diffusers model, jaxsd model, params, jitted apply), built once per tiny config."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"unet_{name}")
            reference = saved_reference(TINY_CONFIGS[name], folder)
            model, params = load_unet(folder)
            built[name] = reference, model, params, jax.jit(model.apply)
        return built[name]
    return get


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_match_diffusers(tiny, name):
    """A batch with a different, fractional timestep per sample (as the Karras samplers give)."""
    reference, model, params, apply = tiny(name)
    sample, text = inputs(model.config, batch=3, size=8)
    timesteps = np.array([0.0, 250.25, 999.75], np.float32)
    added = added_inputs(3, *ADDED[name]) if name in ADDED else None
    expected = reference_output(reference, sample, timesteps, text, added)
    ours = apply({"params": params}, sample, jnp.asarray(timesteps), text, None, added)
    assert ours.dtype == jnp.float32
    assert relative_error(ours, expected) <= FLOAT32_TOLERANCE
    if added is not None:  # the conditioning matters: other sizes give another output
        other = AddedCond(added.text_embeds, added.time_ids + 64)
        assert relative_error(apply({"params": params}, sample, jnp.asarray(timesteps), text, None, other),
                              expected) > 10 * FLOAT32_TOLERANCE


def test_added_cond_errors_are_named(tiny):
    _, model, params, _ = tiny("sdxl")
    sample, text = inputs(model.config, batch=2, size=8)
    with pytest.raises(ValueError, match=r"added_cond is required .*AddedCond\(text_embeds, time_ids\)"):
        model.apply({"params": params}, sample, 1, text)
    with pytest.raises(ValueError, match=r"time_ids \(2, 5\); expected \[2, P\] and \[2, N\] with P \+ N x 8 "
                                         r"\(addition_time_embed_dim\) = 68"):
        model.apply({"params": params}, sample, 1, text, None, added_inputs(2, 20, 5))
    _, sd1, sd1_params, _ = tiny("sd1")
    sample, text = inputs(sd1.config, batch=2, size=8)
    with pytest.raises(ValueError, match="added_cond was given but this UNet has no addition_embed_type"):
        sd1.apply({"params": sd1_params}, sample, 1, text, None, added_inputs(2, 20, 6))


@pytest.mark.parametrize("timesteps", [
    37,                        # a Python int, as diffusers' pipelines pass it
    981.5,                     # a Python float
    np.array([0, 500, 999]),   # per-sample integers
], ids=["int", "float", "int_vector"])
def test_timestep_kinds_match_diffusers(tiny, timesteps):
    reference, model, params, apply = tiny("sd1")  # one config: each kind compiles anew
    sample, text = inputs(model.config, batch=3, size=8)
    expected = reference_output(reference, sample, timesteps, text)
    ours = apply({"params": params}, sample, jnp.asarray(timesteps), text)
    assert relative_error(ours, expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("w", [1.0, 2.5, 8.0])
def test_lcm_unet_guidance_embedding_matches_diffusers(tmp_path, w):
    """A latent consistency model's UNet (time_cond_proj_dim): the guidance scale's sinusoidal
    embedding goes through cond_proj into the time features (diffusers' timestep_cond), with
    the embedding of w - 1 as diffusers' pipelines build it (get_guidance_scale_embedding)."""
    from diffusers import StableDiffusionPipeline

    from jaxsd.models.unet import guidance_scale_embedding

    config = dict(TINY_CONFIGS["sd1"], time_cond_proj_dim=12)
    reference = saved_reference(config, tmp_path)
    model, params = load_unet(tmp_path)
    assert model.config.time_cond_proj_dim == 12 and params["time_mlp"]["cond_proj"]["kernel"].shape == (12, 32)
    sample, text = inputs(model.config, batch=2, size=8)
    w_B = torch.full((2,), w - 1.0)
    cond = StableDiffusionPipeline.get_guidance_scale_embedding(None, w_B, embedding_dim=12)
    ours_cond = guidance_scale_embedding(jnp.full((2,), w - 1.0), 12)
    np.testing.assert_allclose(ours_cond, cond.numpy(), rtol=0, atol=2e-6)
    with torch.no_grad():
        out = reference(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.tensor([999, 259]),
                        torch.from_numpy(text), timestep_cond=cond).sample
    expected = out.permute(0, 2, 3, 1).numpy()
    ours = model.apply({"params": params}, sample, jnp.array([999, 259]), text, ours_cond)
    assert relative_error(ours, expected) <= FLOAT32_TOLERANCE
    # without the condition (diffusers skips cond_proj then) it is another output
    plain = model.apply({"params": params}, sample, jnp.array([999, 259]), text)
    assert relative_error(plain, expected) > 10 * FLOAT32_TOLERANCE
    with pytest.raises(ValueError, match=r"timestep_cond has shape \(2, 5\); expected \[2, 12\]"):
        model.apply({"params": params}, sample, jnp.array([999, 259]), text, jnp.zeros((2, 5)))


def test_bfloat16_compute_with_float32_params(tiny):
    reference, model, params, _ = tiny("sd2")
    sample, text = inputs(model.config, batch=2, size=8)
    expected = reference_output(reference, sample, np.array([10, 900]), text)
    bf16 = UNet(model.config, dtype=jnp.bfloat16)
    ours = jax.jit(bf16.apply)({"params": params}, sample, jnp.array([10, 900]), text)
    assert ours.dtype == jnp.bfloat16
    assert not np.isnan(np.asarray(ours, np.float32)).any()
    assert relative_error(ours, expected) <= BFLOAT16_TOLERANCE


# ---------------------------------------------------------------------------------------------
# The real SD 1.5 and SD 2.1 UNets (860M parameters each) at a 16x16 latent.
# Each class holds one model at a time: its fixtures are torn down before the next class.

def _real(config_json, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp(name)
    reference = saved_reference(config_json, folder)
    config = UNetConfig.from_diffusers(config_json)
    sample, text = inputs(config, batch=2, size=16)
    timesteps = np.array([999, 261.5], np.float32)
    expected = reference_output(reference, sample, timesteps, text)
    del reference  # 3.4 GB
    model, params = load_unet(folder)
    return model, params, (sample, timesteps, text), expected


@pytest.mark.slow
class TestSD15:
    @pytest.fixture(scope="class")
    @classmethod
    def real(cls, tmp_path_factory):
        return _real(SD15_CONFIG_JSON, tmp_path_factory, "sd15")

    @pytest.fixture(scope="class")
    @classmethod
    def float32_output(cls, real):
        model, params, args, _ = real
        return jax.jit(model.apply)({"params": params}, *args)

    def test_config_is_the_sd15_preset(self):
        assert UNetConfig.from_diffusers(SD15_CONFIG_JSON) == SD15

    def test_matches_diffusers(self, real, float32_output):
        assert relative_error(float32_output, real[3]) <= FLOAT32_TOLERANCE

    def test_bfloat16_stays_close_to_float32(self, real, float32_output):
        model, params, args, _ = real
        params_bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        ours = jax.jit(UNet(model.config, dtype=jnp.bfloat16).apply)({"params": params_bf16}, *args)
        assert not np.isnan(np.asarray(ours, np.float32)).any()
        assert relative_error(ours, np.asarray(float32_output)) <= BFLOAT16_TOLERANCE


@pytest.mark.slow
class TestSD21:
    @pytest.fixture(scope="class")
    @classmethod
    def real(cls, tmp_path_factory):
        return _real(SD21_CONFIG_JSON, tmp_path_factory, "sd21")

    def test_config_is_the_sd21_preset(self):
        config = UNetConfig.from_diffusers(SD21_CONFIG_JSON)
        assert config == SD21
        # The head-dim trap: "attention_head_dim" [5, 10, 20, 20] is the number of heads;
        # the head size is 64 on every level.
        assert [c // h for c, h in zip(config.block_out_channels, config.heads)] == [64] * 4

    def test_matches_diffusers(self, real):
        model, params, args, expected = real
        assert relative_error(jax.jit(model.apply)({"params": params}, *args), expected) <= FLOAT32_TOLERANCE


# The SDXL UNets (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json).
SDXL_BASE_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_REFINER_CONFIG_JSON = {
    **SDXL_BASE_CONFIG_JSON, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.parametrize("config_json, preset", [(SDXL_BASE_CONFIG_JSON, SDXL_BASE),
                                                 (SDXL_REFINER_CONFIG_JSON, SDXL_REFINER)], ids=["base", "refiner"])
def test_full_sdxl_parameters_equal_diffusers_state_dict(config_json, preset):
    """At the real, full configs (2.6B and 2.3B parameters) with nothing allocated: jaxsd's
    parameter tree (traced init) against diffusers' state dict (built on torch's meta device),
    key by key through the conversion table, shapes through each row's layout."""
    from jaxsd.checkpoints import convert
    config = UNetConfig.from_diffusers(config_json)
    assert config == preset
    assert [c // h for c, h, a in zip(config.block_out_channels, config.heads, config.down_attention)
            if a] == [64] * sum(config.down_attention)  # attention_head_dim counts heads (64 wide)
    model = UNet(config)
    shapes = convert.expected_shapes(model, *model.example_inputs())
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(config_json)
    compiled = convert.unet_table(config).compiled()
    converted = {}
    for key, tensor in reference.state_dict().items():
        (path, layout, _), = convert._match(compiled, key, 0)
        converted[path] = layout.to_ours(np.broadcast_to(np.float32(0), tuple(tensor.shape))).shape
    assert converted == shapes
    count = sum(int(np.prod(s)) for s in shapes.values())
    assert count == sum(p.numel() for p in reference.parameters())
    if preset is SDXL_BASE:
        assert count == 2_567_463_684  # the base UNet's published parameter count


@pytest.mark.slow
def test_sdxl_unet_at_real_widths_matches_diffusers(tmp_path):
    """SDXL's base UNet at its real widths, heads and 2048-wide text, with the transformer depth
    cut from [1, 2, 10] to [1, 2, 2] so that both copies fit this machine; 16 x 16 latent."""
    config_json = dict(SDXL_BASE_CONFIG_JSON, transformer_layers_per_block=[1, 2, 2])
    reference = saved_reference(config_json, tmp_path)
    config = UNetConfig.from_diffusers(config_json)
    sample, text = inputs(config, batch=2, size=16)
    added = added_inputs(2, 1280, 6)
    timesteps = np.array([999, 261.5], np.float32)
    expected = reference_output(reference, sample, timesteps, text, added)
    del reference
    model, params = load_unet(tmp_path)
    ours = jax.jit(model.apply)({"params": params}, sample, timesteps, text, None, added)
    assert relative_error(ours, expected) <= FLOAT32_TOLERANCE


@pytest.mark.slow
def test_sdxl_refiner_unet_at_real_widths_matches_diffusers():
    """The refiner's UNet at its real widths (384..1536), heads, 1280-wide text and 5 numbers,
    with the depth cut from 4 to 1; converted in memory (no file); 8 x 8 latent, one sample."""
    from jaxsd.checkpoints.components import build_unet
    config_json = dict(SDXL_REFINER_CONFIG_JSON, transformer_layers_per_block=1)
    reference = randomised_reference(config_json, seed=3)
    config = UNetConfig.from_diffusers(config_json)
    sample, text = inputs(config, batch=1, size=8)
    added = added_inputs(1, 1280, 5)
    expected = reference_output(reference, sample, np.array([400.0], np.float32), text, added)
    model, params = build_unet(config_json, {k: v.numpy() for k, v in reference.state_dict().items()})
    del reference
    ours = jax.jit(model.apply)({"params": params}, sample, np.array([400.0], np.float32), text, None, added)
    assert relative_error(ours, expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_matches_jax(dtype):
    """The CPU attention path, with a query count that needs padding to whole blocks (300 = 256 + 44)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, T, 3, 40)), dtype) for T in (300, 77, 77))
    expected = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    ours = jax.jit(blocked_attention)(q, k, v)
    assert ours.dtype == dtype
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(expected, np.float32), atol=tolerance)


@pytest.mark.parametrize("shape, k, stride, padding", [
    ((2, 16, 16, 24), 3, 1, ((1, 1), (1, 1))),  # 3x3, padding 1 (UNet, VAE)
    ((1, 31, 33, 8), 3, 2, ((0, 1), (0, 1))),   # the VAE's stride 2, right/bottom pad
    ((2, 64, 64, 8), 3, 2, ((1, 1), (1, 1))),   # the UNet's stride 2
    ((2, 32, 32, 24), 1, 1, ((0, 0), (0, 0))),  # 1x1
], ids=["3x3", "stride2_right_pad", "stride2", "1x1"])
def test_conv_matches_torch(shape, k, stride, padding):
    """``Conv`` equals torch's conv2d (kernel HWIO against torch's OIHW, padding as given)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    module = Conv(16, k, stride, padding)
    params = module.init(jax.random.key(0), jnp.asarray(x))
    params["params"]["bias"] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    apply = jax.jit(module.apply)
    ours = np.asarray(apply(params, jnp.asarray(x)))
    weight = torch.from_numpy(np.asarray(params["params"]["kernel"])).permute(3, 2, 0, 1)
    (top, bottom), (left, right) = padding
    x_torch = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom))
    expected = torch.nn.functional.conv2d(x_torch, weight, torch.from_numpy(np.asarray(params["params"]["bias"])),
                                          stride=stride).permute(0, 2, 3, 1).numpy()
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Bad inputs, bad configs, bad checkpoints

@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_errors")
    saved_reference(TINY_CONFIGS["sd1"], folder)
    return folder


@pytest.mark.parametrize("shape, text_shape, timesteps, message", [
    ((1, 12, 16, 4), (1, 77, 16), 1, r"height x width 12 x 16; both must be multiples of 8"),  # 4 levels
    ((1, 16, 16, 3), (1, 77, 16), 1, r"sample has shape \(1, 16, 16, 3\); expected NHWC \[batch, height, width, 4\]"),
    ((1, 16, 16, 4), (1, 77, 768), 1, r"encoder_hidden_states has shape \(1, 77, 768\); expected \[1, sequence, 16\]"),
    ((2, 16, 16, 4), (2, 77, 16), np.ones(3), r"timesteps has shape \(3,\); expected a scalar or a vector of 2"),
], ids=["size", "channels", "text_width", "timesteps"])
def test_bad_inputs_are_named(shape, text_shape, timesteps, message):
    config = UNetConfig(block_out_channels=(32, 32, 32, 32), heads=(2,) * 4, cross_attention_dim=16,
                        norm_num_groups=8)
    model = UNet(config)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.asarray(timesteps),
                                          jnp.zeros(text_shape)))


@pytest.mark.parametrize("field, value", [
    ("addition_embed_type", "image"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("conv_in_kernel", 7),
    ("dual_cross_attention", True),
    ("only_cross_attention", [True, False]),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("transformer_layers_per_block", [[1, 2], [2, 2]]),
])
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(NotImplementedError, match=field):
        UNetConfig.from_diffusers({**TINY_CONFIGS["sd1"], field: value})


def test_unknown_config_field_is_logged(caplog):
    with caplog.at_level("WARNING", logger="jaxsd.models.unet"):
        config = UNetConfig.from_diffusers({**SD15_CONFIG_JSON, "some_future_option": 3})
    assert config == SD15
    assert "some_future_option" in caplog.text


def test_wrong_shaped_tensor_names_the_key(tiny_sd1, tmp_path):
    state = load_file(tiny_sd1 / "diffusion_pytorch_model.safetensors")
    state["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    del state["conv_out.bias"]
    state["mid_block.unknown.weight"] = np.zeros(3, np.float32)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((tiny_sd1 / "config.json").read_text())
    with pytest.raises(ConversionError) as error:
        load_unet(tmp_path)
    message = str(error.value)
    assert "down_blocks.0.resnets.0.conv1.weight -> down_0_res_0/conv1/kernel" in message
    assert "checkpoint (1, 1, 32, 32) (conv layout), model (3, 3, 32, 32)" in message
    assert "conv_out/bias" in message             # missing
    assert "mid_block.unknown.weight" in message  # unexpected


def test_load_reads_config_json(tiny_sd1, caplog):
    with caplog.at_level("WARNING", logger="jaxsd.models.unet"):
        model, params = load_unet(tiny_sd1, dtype=jnp.bfloat16)
    assert caplog.text == ""  # every field diffusers 0.42 writes is known
    assert model.config == UNetConfig.from_diffusers(json.loads((tiny_sd1 / "config.json").read_text()))
    assert model.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, params = load_unet(tiny_sd1, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
