"""Every jaxsd sampler against its diffusers scheduler, driven by the same fake model.

For each sampler, config (SD 1.5 epsilon/leading, SD 2.1 v-prediction, trailing spacing, Karras
sigmas where diffusers offers them) and step count (1, 2, 7, 50) the whole jaxsd trajectory (the
latents after every model evaluation, from one lax.scan) must equal diffusers' Python loop, with
the same injected noise for the stochastic samplers, and the timesteps jaxsd passes to the model
must equal those diffusers passes.

Tolerance, float32 on both sides: at every evaluation
    max |x_jaxsd - x_diffusers| <= RTOL * max(1, max |x_diffusers|),   RTOL = 3e-5.
Measured: 1e-7..2e-6 for almost every case (float32 rounding; jaxsd builds its schedules in
float64, diffusers in float32), up to 1.5e-5 where one huge step follows an evaluation at a
tiny sigma (Heun/DPM2 with N = 2: (x - x0)/sigma amplifies rounding ~500x on both sides).
The one exception is documented at DPM2_A_N2 below.
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from sampler_reference import CONFIGS, DIFFUSERS, KARRAS, diffusers_loop, jax_model
from jaxsd import sampling
from jaxsd.sampling.schedule import ScheduleConfig

# diffusers' schedulers emit thousands of NumPy 2 deprecation warnings; they slow the run.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL = 3e-5
# KDPM2Ancestral with N = 2 steps from sigma 14.6 straight to 0.029: diffusers computes
# sigma_down = sqrt(s_next^2 - s_up^2) in float32, where s_up^2 = s_next^2 (1 - 4e-6), and loses
# ~0.7% to cancellation (5.860e-5 instead of the exact 5.821e-5 = s_next^2 / s); its midpoint
# sigma and timestep move by 0.3% and 0.01. jaxsd computes these in float64 (the exact values),
# so here the two differ by up to 2.3e-4 relative. Checked in test_dpm2_a_cancellation.
DPM2_A_N2 = 5e-4
T_ATOL = 2e-3  # fractional timesteps: diffusers derives them from float32 training sigmas

STEPS = (1, 2, 7, 50)
CASES = [(name, cfg, n) for name in DIFFUSERS for cfg in CONFIGS for n in STEPS
         if cfg != "karras" or name in KARRAS]
LATENTS = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
KEY = jax.random.key(1)


@pytest.mark.parametrize("name,config,num_steps", CASES)
def test_trajectory_matches_diffusers(name, config, num_steps):
    cfg = ScheduleConfig.from_config(CONFIGS[config])
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    E = trajectory.shape[0]
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(E)])
    ref, ref_t = diffusers_loop(name, CONFIGS[config], num_steps, LATENTS, noises)

    assert trajectory.shape == ref.shape  # same number of model evaluations
    plan = sampling.make_plan(name, num_steps, cfg)
    big_t = name == "dpm2_a" and num_steps == 2
    np.testing.assert_allclose(plan.timesteps, ref_t, rtol=0, atol=1.5e-2 if big_t else T_ATOL)
    if name in ("ddim", "ddpm", "pndm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s", "unipc", "deis"):
        np.testing.assert_array_equal(plan.timesteps, ref_t)  # integer timesteps: exact
    tol = DPM2_A_N2 if big_t else RTOL
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= tol, f"evaluation {err.argmax()}: relative error {err.max():.2e}"
    np.testing.assert_array_equal(out.latents, trajectory[-1])


def test_dpm2_a_cancellation():
    """The DPM2_A_N2 exception: diffusers' float32 sigma_down is off by 0.7%, jaxsd's is exact."""
    from sampler_reference import _scheduler_class

    sched = _scheduler_class("KDPM2AncestralDiscreteScheduler").from_config(CONFIGS["sd1"])
    sched.set_timesteps(2)
    s, s_next = float(sched.sigmas[0]), float(sched.sigmas[1])
    exact_down = s_next**2 / s  # sqrt(s_next^2 - s_up^2) simplifies to s_next^2 / s
    assert abs(float(sched.sigmas_down[0]) / exact_down - 1) > 5e-3
    plan = sampling.make_plan("dpm2_a", 2, ScheduleConfig.from_config(CONFIGS["sd1"]))
    # 1e-4: diffusers' sigmas come from a float32 cumprod (1e-5 relative off at t = 999).
    np.testing.assert_allclose(plan.consts["sigma_in"][1], np.sqrt(s * exact_down), rtol=1e-4)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_ddim_ddpm_eta_and_clip(name):
    """DDIM with eta = 0.7 and both with clip_sample=True (their diffusers default)."""
    raw = dict(CONFIGS["sd1"], clip_sample=True)
    cfg = ScheduleConfig.from_config(raw)
    eta = 0.7 if name == "ddim" else 0.0
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=7,
                          schedule=cfg, key=KEY, eta=eta, return_trajectory=True)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(7)])
    ref, _ = diffusers_loop(name, raw, 7, LATENTS, noises, eta=eta)
    np.testing.assert_allclose(out.trajectory, ref, rtol=0, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("name,options", [
    ("euler", dict(final_sigmas_type="sigma_min")),
    ("euler", dict(use_exponential_sigmas=True)),
    ("euler", dict(use_beta_sigmas=True)),
    ("euler", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    ("dpmpp_2m", dict(use_lu_lambdas=True)),
    ("dpmpp_2m", dict(euler_at_final=True, final_sigmas_type="sigma_min")),
    ("dpmpp_2m", dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)),
    ("ddim", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction")),  # zero SNR needs v: eps gives x0 = 0/0
    ("ddpm", dict(variance_type="fixed_large")),
    ("lms", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ("unipc", dict(disable_corrector=[2])),
])
def test_config_options_match_diffusers(name, options):
    raw = dict(CONFIGS["sd1"], **options)
    cfg = ScheduleConfig.from_config(raw)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=7,
                          schedule=cfg, key=KEY, return_trajectory=True)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(7)])
    ref, ref_t = diffusers_loop(name, raw, 7, LATENTS, noises)
    np.testing.assert_allclose(sampling.make_plan(name, 7, cfg).timesteps, ref_t, atol=T_ATOL)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(np.asarray(out.trajectory) - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"


def test_unipc_bh1_final_step_is_finite_where_diffusers_is_nan():
    """diffusers' UniPC with solver_type="bh1" computes B_h = -h = -inf on the last step (to
    sigma = 0) and multiplies it by pred_res = 0: NaN. jaxsd's last step is the finite
    first-order update (x = x0 prediction); every earlier evaluation matches diffusers."""
    raw = dict(CONFIGS["sd1"], solver_type="bh1", disable_corrector=[2])
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="unipc", num_steps=7,
                          schedule=ScheduleConfig.from_config(raw), return_trajectory=True)
    ref, _ = diffusers_loop("unipc", raw, 7, LATENTS)
    assert np.isnan(ref[-1]).all() and np.isfinite(out.latents).all()
    np.testing.assert_allclose(out.trajectory[:-1], ref[:-1], rtol=0,
                               atol=RTOL * np.abs(ref[:-1]).max())


@pytest.mark.parametrize("name,option", [("deis", "use_exponential_sigmas"),
                                         ("unipc", "use_exponential_sigmas"),
                                         ("dpmpp_2m", "use_beta_sigmas")])
def test_exponential_beta_first_timestep(name, option):
    """With exponential or beta sigmas, diffusers' integer-timestep schedulers truncate the
    fractional timestep of sigma_max: exp(log(sigma_max)) rounds just below sigma_max,
    sigma_to_t gives 998.99999..., int64 makes it 998. jaxsd gives the exact 999, so the
    model sees a different first timestep (a known, deliberate difference); the rest agree."""
    raw = dict(CONFIGS["sd1"], **{option: True})
    plan = sampling.make_plan(name, 7, ScheduleConfig.from_config(raw))
    _, ref_t = diffusers_loop(name, raw, 7, LATENTS)
    assert plan.timesteps[0] == 999 and ref_t[0] == 998
    np.testing.assert_array_equal(plan.timesteps[1:], ref_t[1:])
