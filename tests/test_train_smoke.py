"""Training the tiny model: losses, the jitted steps, checkpoints and resuming, on a small config.

The CI smoke test: a few steps of each stage must lower the loss. (The full run is
``jaxsd train-tiny runs/tiny``; see docs/tiny_model.md.)
"""

import jax
import numpy as np
import pytest

from jaxsd.checkpoints.sources import load_folder
from jaxsd.training import recipe as train, loop as train_loop

MODEL = train.SMOKE_MODEL


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
    attributes = jnp.array([[0, 1, 2], [3, 4, 1]], jnp.int32)
    kept = jnp.array([True, False])
    uniform = np.mean([np.log(n) for _, n in train.ATTRIBUTES])
    assert float(train.attribute_loss(jnp.ones((2, D)), head, attributes, kept)) == pytest.approx(uniform, rel=1e-6)
    # a head that is sure of caption 0's attributes: loss ~0; caption 1 (dropped) does not count
    bias = np.zeros(K, np.float32)
    for (_, n), start, value in zip(train.ATTRIBUTES, np.cumsum([0] + [n for _, n in train.ATTRIBUTES][:-1]), [0, 1, 2]):
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


def test_both_stages_lower_the_loss_and_resume_exactly(tmp_path):
    vae_cfg = train.TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5)
    state, model, losses = _losses("vae", tmp_path, vae_cfg)
    assert int(state.step) == 40 and len(losses) == 40
    # L1 starts near mean |x| ~ 0.5 and must fall (single steps are noisy: compare 5-step means).
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert model.vae.scaling_factor != 1.0 and np.isfinite(model.vae.scaling_factor)
    assert train_loop.load_model_config(tmp_path) == model

    unet_cfg = train.TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5)
    # Twice 20 steps, resuming from the checkpoint, then the same 40 steps in one go: identical.
    train_loop.run_stage("unet", tmp_path, MODEL, unet_cfg, stop_after=20)
    assert train_loop.saved_step(tmp_path, "unet") == 20
    resumed, _, losses = _losses("unet", tmp_path, unet_cfg)
    assert int(resumed.step) == 40
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    for name in ("vae.msgpack", "vae.json"):
        (straight_dir / name).write_bytes((tmp_path / name).read_bytes())
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


def test_unet_stage_needs_the_vae(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 'vae'"):
        train_loop.run_stage("unet", tmp_path, MODEL, train.SMOKE["unet"])
    with pytest.raises(ValueError, match="stage='gan'"):
        train_loop.run_stage("gan", tmp_path, MODEL)
