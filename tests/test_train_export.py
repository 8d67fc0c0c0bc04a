"""jaxsd.training.export: a jaxsd model saved in diffusers' layout loads in diffusers and gives our outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.checkpoints.components import load_clip_text, load_unet, load_vae
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.unet import UNet, UNetConfig
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from jaxsd.training import export
from jaxsd.training.recipe import init_params

# Small, but with every feature of the tiny model: three levels, mixed attention, head lists.
VAE = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.7)
TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
UNET = UNetConfig(block_out_channels=(16, 32, 32), layers_per_block=(1, 1, 1),
                  down_attention=(True, True, False), up_attention=(True, True, False),
                  heads=(2, 4, 4), transformer_depth=(1, 1, 1), cross_attention_dim=32, norm_num_groups=8, time_embedding_dim=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    rng = np.random.default_rng(0)
    vae_params = init_params(AutoencoderKL(VAE), rng, jnp.zeros((1, 32, 32, 3)))
    text_params = init_params(CLIPTextModel(TEXT), rng, jnp.zeros((1, 77), jnp.int32))
    unet = UNet(UNET)
    unet_params = init_params(unet, rng, *unet.example_inputs(1, 8))
    # Random, non-trivial norms and biases (init leaves them at 1 and 0).
    perturb = lambda p: jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), p)
    vae_params, text_params, unet_params = perturb(vae_params), perturb(text_params), perturb(unet_params)
    folder = export.export_diffusers(
        tmp_path_factory.mktemp("export") / "model", text_config=TEXT, text_params=text_params,
        unet_config=UNET, unet_params=unet_params, vae_config=VAE, vae_params=vae_params,
        image_size=32, dtype=np.float32)
    return folder, text_params, unet_params, vae_params


def test_jaxsd_reads_back_what_it_wrote(exported):
    folder, text_params, unet_params, vae_params = exported
    for (model, params), original in ((load_vae(folder / "vae"), vae_params),
                                      (load_unet(folder / "unet"), unet_params),
                                      (load_clip_text(folder / "text_encoder"), text_params)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, original)
    assert load_vae(folder / "vae")[0].config == VAE
    assert load_unet(folder / "unet")[0].config == UNET
    assert load_clip_text(folder / "text_encoder")[0].config == TEXT


def test_diffusers_loads_the_folder_and_agrees(exported):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    folder, text_params, unet_params, vae_params = exported
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    assert pipe.vae.config.scaling_factor == VAE.scaling_factor

    ids = pipe.tokenizer(["a red circle on a blue background"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text_ref = pipe.text_encoder(ids).last_hidden_state.numpy()
    text = jax.jit(CLIPTextModel(TEXT).apply)({"params": text_params}, jnp.asarray(ids.numpy())).last_hidden_state
    np.testing.assert_allclose(np.asarray(text), text_ref, atol=1e-4, rtol=1e-4)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        eps_ref = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), 500,
                            torch.from_numpy(text_ref)).sample.permute(0, 2, 3, 1).numpy()
        image_ref = pipe.vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    eps = jax.jit(UNet(UNET).apply)({"params": unet_params}, jnp.asarray(latents), jnp.array([500]),
                                     jnp.asarray(text_ref))
    np.testing.assert_allclose(np.asarray(eps), eps_ref, atol=1e-4, rtol=1e-4)
    vae = AutoencoderKL(VAE)
    image = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(vae_params, jnp.asarray(latents))
    np.testing.assert_allclose(np.asarray(image), image_ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4)


def test_float16_export_halves_the_size(exported, tmp_path):
    folder, text_params, unet_params, vae_params = exported
    half = export.export_diffusers(tmp_path / "half", text_config=TEXT, text_params=text_params,
                                   unet_config=UNET, unet_params=unet_params, vae_config=VAE,
                                   vae_params=vae_params, image_size=32)
    full_size = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    half_size = (half / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert half_size < 0.55 * full_size
    _, params = load_unet(half / "unet", param_dtype=jnp.float32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4),
                 params, unet_params)
    # diffusers and transformers load every part in float32 (a mix would fail in the pipeline).
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(half, safety_checker=None)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert next(part.parameters()).dtype == torch.float32, type(part).__name__


@pytest.mark.parametrize("name", sorted(export.SCHEDULER_KEYS))
def test_scheduler_config_is_what_diffusers_and_jaxsd_expect(name):
    diffusers = pytest.importorskip("diffusers")
    from jaxsd.sampling import default_sampler

    config = export.scheduler_config_json(name)
    scheduler = getattr(diffusers, name).from_config(config)
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    # A user who switches to DDIM keeps SD's settings (not DDIM's defaults, which clip the latents)
    ddim = diffusers.DDIMScheduler.from_config(scheduler.config)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    # jaxsd runs the sampler that reproduces the class, on the same schedule
    assert default_sampler(config) == {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim",
                                       "EulerDiscreteScheduler": "euler"}[name]


def test_unknown_scheduler_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="scheduler='Nope'.*PNDMScheduler"):
        export.export_diffusers(tmp_path / "model", text_config=TEXT, text_params={}, unet_config=UNET,
                                unet_params={}, vae_config=VAE, vae_params={}, scheduler="Nope")
    assert not (tmp_path / "model").exists()
