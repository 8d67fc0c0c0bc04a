"""Training the tiny model: losses, the jitted steps, checkpoints and resuming, on a small config.

The CI smoke test: a few steps of each stage must lower the loss. (The full run is
``jaxsd train-tiny runs/tiny``; see docs/tiny_model.md.)
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsd.checkpoints.sources import load_folder
from jaxsd.training import recipe as train, loop as train_loop

MODEL = train.SMOKE_MODEL


# Both UNet tests below train on one VAE stage, trained once: its jitted step compiles once.
VAE_CFG = train.TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5, edge_weight=10.0)


@pytest.fixture(scope="module")
def vae_stage(tmp_path_factory):
    """The VAE stage of the smoke model, trained once: (folder, model config with the measured
    scaling factor, its per-step losses)."""
    folder = tmp_path_factory.mktemp("vae_stage")
    _, model, losses = _losses("vae", folder, VAE_CFG)
    return folder, model, losses


def _with_vae(vae_stage, folder):
    """``folder`` holding a copy of the trained VAE stage's checkpoint, ready for a UNet stage."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vae.msgpack", "vae.json"):
        (folder / name).write_bytes((vae_stage[0] / name).read_bytes())
    return folder


def _losses(stage, folder, cfg, **kwargs):
    losses = []
    state, model = train_loop.run_stage(stage, folder, MODEL, cfg, save_every=10_000, metrics_every=1,
                                   on_step=lambda step, m: losses.append(m["loss"]), **kwargs)
    return state, model, losses


def test_schedule_is_sd_scaled_linear():
    abar = train.scaled_linear_alphas_cumprod()
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(betas[1:]) - np.sqrt(betas[:-1]),
                               (0.012 ** 0.5 - 0.00085 ** 0.5) / 999, rtol=1e-9)


def test_attribute_loss_is_the_mean_cross_entropy_over_kept_captions():
    import jax.numpy as jnp
    D, K = 8, sum(n for _, n in train.ATTRIBUTES)
    head = {"kernel": jnp.zeros((D, K)), "bias": jnp.zeros((K,))}   # uniform predictions
    attributes = jnp.array([[0, 1, 2, 3, 9], [3, 4, 1, 0, 5]], jnp.int32)
    kept = jnp.array([True, False])
    uniform = np.mean([np.log(n) for _, n in train.ATTRIBUTES])
    assert float(train.attribute_loss(jnp.ones((2, D)), head, attributes, kept)) == pytest.approx(uniform, rel=1e-6)
    # a head that is sure of caption 0's attributes: loss ~0; caption 1 (dropped) does not count
    bias = np.zeros(K, np.float32)
    for (_, n), start, value in zip(train.ATTRIBUTES, np.cumsum([0] + [n for _, n in train.ATTRIBUTES][:-1]),
                                    [0, 1, 2, 3, 9]):
        bias[start + value] = 50.0
    sure = {"kernel": jnp.zeros((D, K)), "bias": jnp.asarray(bias)}
    assert float(train.attribute_loss(jnp.ones((2, D)), sure, attributes, kept)) < 1e-6
    assert float(train.attribute_loss(jnp.ones((2, D)), sure, attributes, ~kept)) > 10


def test_learning_rate_warms_up_decays_and_restarts():
    one = train.TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10)
    two = train.TrainConfig(steps=200, learning_rate=1e-3, warmup_steps=10, cycle_steps=100)
    lr1, lr2 = train.learning_rate_schedule(one), train.learning_rate_schedule(two)
    assert float(lr1(0)) == 0 and float(lr1(10)) == pytest.approx(1e-3)
    assert float(lr1(99)) == pytest.approx(1e-4, rel=1e-2)           # cosine down to 10% of the peak
    assert all(float(lr2(i)) == float(lr1(i)) for i in range(100))    # the first cycle is the same run
    assert float(lr2(100)) == pytest.approx(5e-4)                     # restart at half the peak
    assert float(lr2(199)) == pytest.approx(5e-5, rel=1e-2)


def test_both_stages_lower_the_loss_and_resume_exactly(vae_stage, tmp_path):
    vae_folder, model, losses = vae_stage
    vae_cfg = VAE_CFG
    assert train_loop.saved_step(vae_folder, "vae") == 40 and len(losses) == 40
    # L1 starts near mean |x| ~ 0.5 and must fall (single steps are noisy: compare 5-step means).
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert model.vae.scaling_factor != 1.0 and np.isfinite(model.vae.scaling_factor)
    assert train_loop.load_model_config(vae_folder) == model
    _with_vae(vae_stage, tmp_path)

    unet_cfg = train.TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5)
    # Twice 20 steps, resuming from the checkpoint, then the same 40 steps in one go: identical.
    train_loop.run_stage("unet", tmp_path, MODEL, unet_cfg, stop_after=20)
    assert train_loop.saved_step(tmp_path, "unet") == 20
    resumed, _, losses = _losses("unet", tmp_path, unet_cfg)
    assert int(resumed.step) == 40
    straight_dir = _with_vae(vae_stage, tmp_path / "straight")
    straight, _, straight_losses = _losses("unet", straight_dir, unet_cfg)
    assert straight_losses[20:] == losses
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    # eps-prediction MSE starts near 1 (or above) and must fall.
    assert np.mean(straight_losses[-5:]) < 0.8 * np.mean(straight_losses[:5]), straight_losses

    # The export: the EMA weights of both stages, in a folder jaxsd (and diffusers) loads.
    presets = {"vae": vae_cfg, "unet": unet_cfg}
    exported = load_folder(train_loop.export_model(tmp_path, tmp_path / "model", model, presets))
    vae_ema = train_loop.load_checkpoint(tmp_path, "vae", train.init_state("vae", model, vae_cfg)).ema
    for ours, theirs in ((exported.vae_params["encoder"], vae_ema["encoder"]),
                         (exported.unet_params, resumed.ema["unet"])):
        np.testing.assert_allclose(ours["conv_in"]["kernel"], theirs["conv_in"]["kernel"],
                                   rtol=1e-3, atol=1e-4)                   # float16 files
    assert exported.vae.config.scaling_factor == model.vae.scaling_factor
    assert exported.scheduler_config["_class_name"] == train.SCHEDULER == "EulerDiscreteScheduler"


def test_latent_pool_v_prediction_zero_snr_lower_the_loss_resume_and_export(vae_stage, tmp_path):
    """The full preset's UNet stage draws from a pool of pre-encoded scenes; here with
    v-prediction on a zero-terminal-SNR schedule and Min-SNR weights, all at once."""
    _, model, _ = vae_stage
    vae_cfg = VAE_CFG
    _with_vae(vae_stage, tmp_path)
    unet_cfg = train.TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5, latent_pool=96,
                                 prediction_type="v_prediction", zero_terminal_snr=True, min_snr_gamma=5.0)
    train_loop.run_stage("unet", tmp_path, MODEL, unet_cfg, stop_after=20)
    # Resuming under other settings would silently make it another run: refused, naming them.
    with pytest.raises(ValueError, match=r"trained with steps=40, learning_rate=0.003; this run asks for "
                                         r"steps=80, learning_rate=0.001"):
        train_loop.run_stage("unet", tmp_path, MODEL, dataclasses.replace(unet_cfg, steps=80, learning_rate=1e-3))
    pool = np.load(tmp_path / "latents-96.npz")
    assert pool["moments"].shape == (96, 16, 16, 2 * MODEL.vae.latent_channels)
    assert pool["moments"].dtype == np.float16 and len(pool["fg"]) == 96
    resumed, _, losses = _losses("unet", tmp_path, unet_cfg)          # reads the cached pool
    straight_dir = _with_vae(vae_stage, tmp_path / "straight")
    straight, _, straight_losses = _losses("unet", straight_dir, unet_cfg)   # encodes it anew
    assert straight_losses[20:] == losses
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    assert np.mean(straight_losses[-5:]) < 0.8 * np.mean(straight_losses[:5]), straight_losses
    presets = {"vae": vae_cfg, "unet": unet_cfg}
    scheduler = load_folder(train_loop.export_model(tmp_path, tmp_path / "model", model, presets)).scheduler_config
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"
    assert scheduler["steps_offset"] == 1     # unread with "trailing"; diffusers' pipeline rewrites other values
    # A cache written with other VAE weights is not reused: it is encoded anew.
    from jaxsd.models.vae import AutoencoderKL
    from jaxsd.training.shapes import ShapesDataset
    vae_ema = train_loop.load_checkpoint(tmp_path, "vae", train.init_state("vae", model, vae_cfg)).ema
    _, again = train_loop.latent_pool(tmp_path, AutoencoderKL(model.vae), vae_ema, ShapesDataset(seed=0), 96)
    np.testing.assert_array_equal(again, pool["moments"].astype(np.float32))
    _, other = train_loop.latent_pool(tmp_path, AutoencoderKL(model.vae), jax.tree.map(lambda p: 1.01 * p, vae_ema),
                                      ShapesDataset(seed=0), 96)
    assert not np.array_equal(other, again)
    # A cache from before fingerprints, or one cut short, is encoded anew too (it used to crash).
    path = tmp_path / "latents-96.npz"
    with np.load(path) as saved:
        np.savez(path, **{k: saved[k] for k in saved.files if k != "fingerprint"})
    _, old = train_loop.latent_pool(tmp_path, AutoencoderKL(model.vae), vae_ema, ShapesDataset(seed=0), 96)
    np.testing.assert_array_equal(old, again)
    path.write_bytes(path.read_bytes()[:1000])
    _, cut = train_loop.latent_pool(tmp_path, AutoencoderKL(model.vae), vae_ema, ShapesDataset(seed=0), 96)
    np.testing.assert_array_equal(cut, again)


def test_zero_terminal_snr_schedule_is_diffusers():
    from diffusers import DDPMScheduler
    ours = train.scaled_linear_alphas_cumprod(zero_terminal_snr=True)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           rescale_betas_zero_snr=True).alphas_cumprod.double().numpy()
    assert ours[-1] == 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)   # theirs: float32 betas


def test_min_snr_weights_are_min_snr_gamma_on_the_x0_error():
    """Hang et al.: weight min(SNR, gamma) on ||x0_hat - x0||^2, whatever the network predicts.
    Checked through the identities ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1)
    ||x0 err||^2, on random predictions."""
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    abar = jnp.asarray(train.scaled_linear_alphas_cumprod()[[0, 100, 500, 900, 999]], jnp.float32)
    a = abar[:, None]
    x0, eps, guess = (jnp.asarray(rng.standard_normal((5, 64)), jnp.float32) for _ in range(3))
    z = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    snr = abar / (1 - abar)
    for prediction_type in ("epsilon", "v_prediction"):
        if prediction_type == "epsilon":   # the network's guess of eps, and the x0 it implies
            err = jnp.square(guess - eps).sum(1)
            x0_hat = (z - jnp.sqrt(1 - a) * guess) / jnp.sqrt(a)
        else:
            err = jnp.square(guess - (jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0)).sum(1)
            x0_hat = jnp.sqrt(a) * z - jnp.sqrt(1 - a) * guess
        x0_err = jnp.square(x0_hat - x0).sum(1)
        w = train.snr_weight(abar, prediction_type, 5.0)
        np.testing.assert_allclose(w * err, jnp.minimum(snr, 5.0) * x0_err, rtol=2e-3)
        np.testing.assert_array_equal(train.snr_weight(abar, prediction_type, None), np.ones(5))


def test_outline_weights_and_caption_attributes():
    from jaxsd.training import shapes
    scenes = shapes.Scenes(*(np.array([v]) for v in (0, 4, 1, 2, 4, 32.0, 32.0, 10.0)))  # a square, half 10
    mask = shapes.outline_mask(scenes)[0]
    assert mask[32, 32] == 0 and mask[2, 2] == 0                       # centre, far background
    assert mask[32, 22] == 1 and mask[22, 32] == 1 and mask[32, 42] == 1   # on the edges (x = 22, 42)
    # The attributes a caption says, with "unsaid" classes, for every phrasing; "" gives zeros.
    rng = np.random.default_rng(1)
    many = shapes.sample_scenes(rng, 50)
    texts = shapes.captions(rng, many)
    got = shapes.caption_attributes(texts + [""])
    for text, row in zip(texts, got):
        p = shapes.parse_caption(text)
        assert tuple(row) == (p.fg, p.bg, p.shape, 3 if p.size is None else p.size,
                              9 if p.position is None else p.position)
    assert (got[-1] == 0).all() and (got[:, 3] == 3).any() and (got[:, 4] == 9).any()


def test_train_config_refuses_settings_that_cannot_work():
    with pytest.raises(ValueError, match="zero_terminal_snr=True needs prediction_type='v_prediction'"):
        train.TrainConfig(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        train.TrainConfig(prediction_type="sample")
    for field, value in (("min_snr_gamma", 0), ("edge_weight", -1), ("latent_pool", -1)):
        with pytest.raises(ValueError, match=field):
            train.TrainConfig(**{field: value})


def test_unet_stage_needs_the_vae(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 'vae'"):
        train_loop.run_stage("unet", tmp_path, MODEL, train.SMOKE["unet"])
    with pytest.raises(ValueError, match="stage='gan'"):
        train_loop.run_stage("gan", tmp_path, MODEL)
