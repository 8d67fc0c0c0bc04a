"""Every jaxsd sampler against its diffusers scheduler, driven by the same fake model.

For each sampler, config (SD 1.5 epsilon/leading, SD 2.1 v-prediction, trailing spacing, Karras
sigmas where diffusers offers them, linear betas over 1100 training steps, the cosine schedule)
and step count (1, 2, 7, 50) the whole jaxsd trajectory (the latents after every model
evaluation, from one lax.scan) must equal diffusers' Python loop, with the same injected noise
for the stochastic samplers, and the timesteps jaxsd passes to the model must equal those
diffusers passes.

Tolerance, float32 on both sides: at every evaluation
    max |x_jaxsd - x_diffusers| <= RTOL * max(1, max |x_diffusers|),   RTOL = 2e-5.
Measured (diffusers 0.42, schedules in float32 on both sides): 1e-7..2.5e-6 for almost every
case, up to 1e-5 where a step divides by a tiny sigma ((x - x0)/sigma amplifies rounding on both
sides). The exceptions are documented at DPM2_A_N2 and in test_trajectory_matches_diffusers_cosine.
"""
import json
import re

import diffusers
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from sampler_reference import CONFIGS, DIFFUSERS, KARRAS, diffusers_loop, jax_model
from jaxsd import sampling
from jaxsd.sampling import schedule as S
from jaxsd.sampling.schedule import ScheduleConfig

# diffusers' schedulers emit thousands of NumPy 2 deprecation warnings; they slow the run.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL = 2e-5
# KDPM2Ancestral with N = 2 steps from sigma 14.6 straight to 0.029: diffusers computes
# sigma_down = sqrt(s_next^2 - s_up^2) in float32, where s_up^2 = s_next^2 (1 - 4e-6), and loses
# ~0.7% to cancellation (5.860e-5 instead of the exact 5.821e-5 = s_next^2 / s); its midpoint
# sigma and timestep move by 0.3% and 0.01. jaxsd computes these in float64 (the exact values),
# so here the two differ by up to 2.3e-4 relative. Checked in test_dpm2_a_cancellation.
DPM2_A_N2 = 5e-4
T_ATOL = 2e-3  # fractional timesteps: diffusers derives them from float32 training sigmas

STEPS = (1, 2, 7, 50)
CASES = [(name, cfg, n) for name in DIFFUSERS for cfg in CONFIGS for n in STEPS
         if (cfg != "karras" or name in KARRAS) and cfg != "cosine"
         and not (name == "pndm" and n < 4 and not CONFIGS[cfg].get("skip_prk_steps"))]
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
    if name in ("ddim", "ddpm", "pndm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s", "unipc", "deis", "lcm"):
        np.testing.assert_array_equal(plan.timesteps, ref_t)  # integer timesteps: exact
    tol = DPM2_A_N2 if big_t else RTOL
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= tol, f"evaluation {err.argmax()}: relative error {err.max():.2e}"
    np.testing.assert_array_equal(out.latents, trajectory[-1])


# Samplers that evaluate the model twice per step ((x - x0) / sigma at the second evaluation).
TWO_EVALUATIONS = ("heun", "dpm2", "dpm2_a", "dpmpp_sde")


@pytest.mark.parametrize("name,num_steps", [(name, n) for name in DIFFUSERS for n in STEPS
                                            if name not in TWO_EVALUATIONS
                                            and not (name == "pndm" and n < 4)])
def test_trajectory_matches_diffusers_cosine(name, num_steps):
    """Nichol & Dhariwal's cosine schedule ends at alpha_bar_999 = 2.4e-9, sigma_max = 20291: the
    text-to-image latents start at 20291 x N(0, 1) (DDIM-like samplers: their first update
    multiplies by 1/sqrt(alpha_bar) = 20291), and the first step cancels that down to ~1. One
    float32 ulp there is ~4e-3, on both sides. So here the bound is relative to that scale:
        max |x_jaxsd - x_diffusers| <= 2e-6 * sigma_max * max |noise|   (16 ulps of it).
    Measured: up to 2.3e-7 (2 ulps). The two-evaluation samplers (heun, dpm2, dpm2_a,
    dpmpp_sde) are not compared here: after that first step they divide a ~1e-3 rounding error by
    sigma = 0.0064, and diffusers itself moves by as much as jaxsd differs from it when its input
    moves by one ulp (heun, 50 steps: 0.64 vs 0.99); dpm2_a with 2 or 7 steps gives NaN in
    diffusers (sqrt of a negative float32 sigma_down^2), a finite value here."""
    config = CONFIGS["cosine"]
    cfg = ScheduleConfig.from_config(config)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(len(trajectory))])
    ref, ref_t = diffusers_loop(name, config, num_steps, LATENTS, noises)
    plan = sampling.make_plan(name, num_steps, cfg)
    np.testing.assert_allclose(plan.timesteps, ref_t, rtol=0, atol=T_ATOL)
    sigma_max = float(S.train_sigmas(S.with_betas(cfg))[-1])
    assert 2e4 < sigma_max < 2.1e4
    err = np.abs(trajectory - ref).max() / (sigma_max * np.abs(LATENTS).max())
    assert err <= 2e-6, f"relative error {err:.2e}"


@pytest.mark.parametrize("config", ["sd1", "sd2_v"])
@pytest.mark.parametrize("num_steps", [4, 5, 7, 50])
def test_pndm_runge_kutta_warmup_matches_diffusers(config, num_steps):
    """PNDMScheduler's default skip_prk_steps=False: three Runge-Kutta steps of four evaluations
    (12), then PLMS: N + 9 evaluations, the whole trajectory as diffusers'."""
    raw = dict(CONFIGS[config], skip_prk_steps=False)
    cfg = ScheduleConfig.from_config(raw)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="pndm", num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    ref, ref_t = diffusers_loop("pndm", raw, num_steps, LATENTS)
    assert len(ref_t) == num_steps + 9
    np.testing.assert_array_equal(sampling.make_plan("pndm", num_steps, cfg).timesteps, ref_t)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(np.asarray(out.trajectory) - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_pndm_runge_kutta_needs_four_steps(num_steps):
    """diffusers' PRK timesteps need N >= 4 (it fails with a NumPy broadcast error below); jaxsd
    says why and what to do."""
    from sampler_reference import _scheduler_class

    raw = dict(CONFIGS["sd1"], skip_prk_steps=False)
    with pytest.raises(ValueError):
        _scheduler_class("PNDMScheduler").from_config(raw).set_timesteps(num_steps)
    with pytest.raises(ValueError, match=rf"skip_prk_steps=False.*num_steps >= 4, got num_steps={num_steps}"):
        sampling.make_plan("pndm", num_steps, ScheduleConfig.from_config(raw))


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


def compare_with_diffusers(name, raw, num_steps, tol=RTOL, diffusers_last_step_inf=False):
    """The whole trajectory of `name` on the config dict `raw` against diffusers' class for
    `name` built with from_config(raw): timesteps within T_ATOL, latents within tol.
    `diffusers_last_step_inf`: UniPC's higher-order step to sigma = 0, where diffusers divides by
    zero (test_unipc_higher_order_step_to_zero_is_first_order): the last evaluation is finite
    here and not compared."""
    cfg = ScheduleConfig.from_config(raw)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(len(trajectory))])
    ref, ref_t = diffusers_loop(name, raw, num_steps, LATENTS, noises)
    assert trajectory.shape == ref.shape
    np.testing.assert_allclose(sampling.make_plan(name, num_steps, cfg).timesteps, ref_t, atol=T_ATOL)
    if diffusers_last_step_inf:
        assert np.isfinite(trajectory[-1]).all() and not np.isfinite(ref[-1]).all()
        trajectory, ref = trajectory[:-1], ref[:-1]
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= tol, f"{name}: evaluation {err.argmax()}: relative error {err.max():.2e}"


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
    compare_with_diffusers(name, dict(CONFIGS["sd1"], **options), 7)


OPTIONS = [
    ("euler", dict(interpolation_type="log_linear")),
    ("euler", dict(interpolation_type="log_linear", use_karras_sigmas=True)),
    ("euler", dict(timestep_type="continuous")),  # log(sigma) / 4 with v-prediction only
    ("euler", dict(timestep_type="continuous", interpolation_type="log_linear")),
    ("dpmpp_2s", dict(final_sigmas_type="sigma_min")),
    ("unipc", dict(final_sigmas_type="sigma_min")),
    ("dpmpp_2m", dict(solver_order=1)),
    ("dpmpp_2m", dict(solver_order=3)),  # DPM-Solver++(3M)
    ("dpmpp_2m_sde", dict(solver_order=3)),
    ("dpmpp_2m_sde", dict(solver_order=3, lower_order_final=False)),
    ("dpmpp_2m", dict(solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min")),
    ("dpmpp_2s", dict(solver_order=1)),
    ("dpmpp_2s", dict(solver_order=3)),  # groups of (1, 2, 3) evaluations from one anchor
    ("dpmpp_2s", dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")),
    ("unipc", dict(solver_order=1)),
    ("unipc", dict(solver_order=3)),
    ("unipc", dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    ("unipc", dict(solver_order=3, disable_corrector=[1, 3])),
    ("deis", dict(solver_order=1)),
    ("deis", dict(solver_order=3)),
    ("deis", dict(solver_order=3, lower_order_final=False)),
]
# DEIS-3 with many steps: diffusers computes each coefficient as the difference of two values of
# its ind_fn, in float32, and they nearly cancel (N = 50, SD: 673.104 - 673.921 = -0.8168 where
# the exact value is -0.8170, 2e-4 off); jaxsd computes them in float64, so its trajectory differs
# from diffusers' by up to 2.7e-4 of its scale (measured: SD 1.x 8.2e-5, SD 2.x 2.7e-4, 50 steps).
# Checked in test_deis_third_order_coefficients_cancel_in_float32.
DEIS3_F32 = 5e-4


def test_third_order_is_not_second_order():
    """solver_order=3 really uses m_{i-2}: 3M differs from 2M, in diffusers and here alike."""
    raw3 = dict(CONFIGS["sd1"], solver_order=3)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="dpmpp_2m", num_steps=7,
                          schedule=ScheduleConfig.from_config(raw3)).latents
    ref2, _ = diffusers_loop("dpmpp_2m", CONFIGS["sd1"], 7, LATENTS)
    ref3, _ = diffusers_loop("dpmpp_2m", raw3, 7, LATENTS)
    assert np.abs(ref3[-1] - ref2[-1]).max() > 1e-3
    np.testing.assert_allclose(out, ref3[-1], rtol=0, atol=RTOL * np.abs(ref3[-1]).max())


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", ["sd1", "sd2_v", "linear_1100"])
@pytest.mark.parametrize("name,options", OPTIONS)
def test_options_match_diffusers_at_every_step_count(name, options, config, num_steps):
    tol = DEIS3_F32 if name == "deis" and options.get("solver_order") == 3 and num_steps == 50 else RTOL
    compare_with_diffusers(name, dict(CONFIGS[config], **options), num_steps, tol)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("name,options", [o for o in OPTIONS if o[0] != "euler"]
                         + [("lcm", {}), ("tcd", {}), ("ddpm", dict(variance_type="fixed_large"))])
def test_options_match_diffusers_on_the_cosine_schedule(name, options, num_steps):
    """The options on Nichol & Dhariwal's cosine schedule, with test_trajectory_matches_diffusers_cosine's
    bound (its latents start at sigma_max = 20291 times the noise, and one float32 ulp there is
    ~4e-3 on both sides): max |x_jaxsd - x_diffusers| <= 2e-6 * sigma_max * max |noise|."""
    raw = dict(CONFIGS["cosine"], **options)
    cfg = ScheduleConfig.from_config(raw)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(len(trajectory))])
    ref, _ = diffusers_loop(name, raw, num_steps, LATENTS, noises)
    sigma_max = float(S.train_sigmas(S.with_betas(cfg))[-1])
    err = np.abs(trajectory - ref).max() / (sigma_max * np.abs(LATENTS).max())
    assert err <= 2e-6, f"relative error {err:.2e}"


def test_deis_third_order_coefficients_cancel_in_float32():
    """Why DEIS3_F32: diffusers' own third-order coefficient, in float32 (as it runs) against the
    same formula in float64, is 2e-4 off at 50 steps; jaxsd's float64 coefficient is the latter."""
    import torch

    from sampler_reference import _scheduler_class

    sched = _scheduler_class("DEISMultistepScheduler").from_config(dict(CONFIGS["sd1"], solver_order=3))
    sched.set_timesteps(50)
    L = np.log

    def coefficient(dtype, i=10):  # coef1 of multistep_deis_third_order_update, step i
        rho = [sched.sigmas[j].to(dtype) for j in (i + 1, i, i - 1, i - 2)]  # sigma/alpha = sigma

        def ind_fn(t, b, c, d):
            return (t * (L(c) * (L(d) - L(t) + 1) - L(d) * L(t) + L(d) + L(t) ** 2 - 2 * L(t) + 2)
                    / ((L(b) - L(c)) * (L(b) - L(d))))
        return float(ind_fn(*rho) - ind_fn(rho[1], *rho[1:]))

    c32, c64 = coefficient(torch.float32), coefficient(torch.float64)
    assert abs(c32 - c64) / abs(c64) > 1e-4
    plan = sampling.make_plan("deis", 50, ScheduleConfig.from_config(dict(CONFIGS["sd1"], solver_order=3)))
    alpha_next = 1 / np.sqrt(float(sched.sigmas[11]) ** 2 + 1)
    np.testing.assert_allclose(plan.consts["B0_3"][10] / alpha_next, c64, rtol=1e-5)  # not c32


THRESHOLDING = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s", "unipc", "deis", "lcm")
# Two samples at different scales, so that each gets its own threshold s.
BATCH2 = np.concatenate([LATENTS, 3 * LATENTS[:, ::-1]]).astype(np.float32)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", ["sd1", "sd2_v", "linear_1100"])
@pytest.mark.parametrize("name", THRESHOLDING)
def test_dynamic_thresholding_matches_diffusers(name, config, num_steps):
    """Imagen's dynamic thresholding of x0, per sample, in every diffusers class that has it."""
    options = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    raw = dict(CONFIGS[config], **options)
    run = lambda cfg: np.asarray(sampling.sample(
        jax_model, jnp.asarray(BATCH2), sampler=name, num_steps=num_steps, schedule=cfg, key=KEY,
        return_trajectory=True).trajectory)
    trajectory = run(ScheduleConfig.from_config(raw))
    noises = np.stack([sampling.step_noise(KEY, i, BATCH2.shape) for i in range(len(trajectory))])
    ref, _ = diffusers_loop(name, raw, num_steps, BATCH2, noises)
    # The scale: the step's result, or the raw x0 prediction's x_t / sqrt(alpha_bar_t) (what
    # thresholding then clips) if larger. Thresholded x0 stays within +-2.5, so a step can end
    # much smaller than its terms: DEIS in 1 step from |x| ~ 9 at alpha = 0.0038 (1100 linear
    # betas) sums terms of ~2400 that cancel to ~1, and rounding follows the ~2400.
    plan = sampling.make_plan(name, num_steps, ScheduleConfig.from_config(raw))
    before = np.concatenate([BATCH2[None] * plan.init_noise_sigma, ref[:-1]])
    raw_x0 = np.abs(before).max(axis=(1, 2, 3, 4)) / plan.noise_a
    scale = np.maximum(1.0, np.maximum(np.abs(ref).max(axis=(1, 2, 3, 4)), raw_x0))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"
    # Where thresholding changes diffusers' result (most cases; not where |x0| stays below 1) it
    # changes ours, and the other way round.
    plain = run(ScheduleConfig.from_config(CONFIGS[config]))
    ref_plain, _ = diffusers_loop(name, CONFIGS[config], num_steps, BATCH2, noises)
    assert (np.abs(plain - trajectory).max() > 1e-3) == (np.abs(ref_plain - ref).max() > 1e-3)


@pytest.mark.parametrize("num_steps", (1, 2, 4, 8, 50))
@pytest.mark.parametrize("config", ["sd1", "sd2_v", "linear_1100"])
@pytest.mark.parametrize("name,options,eta", [
    ("tcd", {}, 0.3), ("tcd", {}, 1.0), ("tcd", dict(original_inference_steps=100), 0.5),
    ("lcm", dict(original_inference_steps=100, timestep_scaling=5.0), 0.0),
    ("lcm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 0.0),
])
def test_consistency_samplers_match_diffusers(name, options, eta, config, num_steps):
    """LCM and TCD with their own options: TCD's gamma (diffusers' and jaxsd's `eta`; fresh
    noise at every step but the last when it is > 0), a longer distillation schedule, LCM's
    timestep_scaling, zero terminal SNR (diffusers' LCM ignores timestep_spacing, and so does
    jaxsd's). The default options run in test_trajectory_matches_diffusers."""
    raw = dict(CONFIGS[config], **options)
    cfg = ScheduleConfig.from_config(raw)
    out = sampling.sample(jax_model, jnp.asarray(BATCH2), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, eta=eta, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, BATCH2.shape) for i in range(len(trajectory))])
    ref, ref_t = diffusers_loop(name, raw, num_steps, BATCH2, noises, eta=eta)
    np.testing.assert_array_equal(sampling.make_plan(name, num_steps, cfg).timesteps, ref_t)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"
    if name == "tcd" and num_steps > 1:  # gamma > 0 draws noise: another key, another result
        other = sampling.sample(jax_model, jnp.asarray(BATCH2), sampler=name, num_steps=num_steps,
                                schedule=cfg, key=jax.random.key(7), eta=eta)
        assert np.abs(np.asarray(other.latents) - trajectory[-1]).max() > 1e-3


def variance_models(kind):
    """A fake model that also predicts its variance, [prediction | v] (2C channels): v in [-1, 1]
    for learned_range, a positive variance for learned; JAX NHWC and torch NCHW."""
    import torch

    from sampler_reference import torch_model

    if kind == "learned_range":
        jv, tv = (lambda x, t: jnp.tanh(0.5 * x + 0.001 * t)), (lambda x, t: torch.tanh(0.5 * x + 0.001 * t))
    else:
        jv, tv = (lambda x, t: 0.02 * jax.nn.sigmoid(x)), (lambda x, t: 0.02 * torch.sigmoid(x))
    return (lambda x, t: jnp.concatenate([jax_model(x, t), jv(x, t)], axis=-1),
            lambda x, t: torch.cat([torch_model(x, t), tv(x, t)], dim=1))


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", ["sd1", "sd2_v", "linear_1100"])
@pytest.mark.parametrize("kind", ["learned_range", "learned"])
def test_ddpm_learned_variance_matches_diffusers(kind, config, num_steps):
    """DDPMScheduler's variance_type learned / learned_range: the model returns 2C channels, the
    second half its variance (Nichol & Dhariwal 2021 eq. 15 for learned_range)."""
    raw = dict(CONFIGS[config], variance_type=kind)
    jax_fn, torch_fn = variance_models(kind)
    out = sampling.sample(jax_fn, jnp.asarray(BATCH2), sampler="ddpm", num_steps=num_steps,
                          schedule=ScheduleConfig.from_config(raw), key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, BATCH2.shape) for i in range(len(trajectory))])
    ref, _ = diffusers_loop("ddpm", raw, num_steps, BATCH2, noises, model=torch_fn)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"
    if num_steps > 1:  # the learned variance is used: not the fixed one
        fixed = sampling.sample(jax_model, jnp.asarray(BATCH2), sampler="ddpm", num_steps=num_steps,
                                schedule=ScheduleConfig.from_config(CONFIGS[config]), key=KEY)
        assert np.abs(np.asarray(fixed.latents) - trajectory[-1]).max() > 1e-3


def test_model_output_shape_is_checked():
    jax_fn, _ = variance_models("learned_range")
    cfg = ScheduleConfig.from_config(CONFIGS["sd1"])
    with pytest.raises(ValueError, match=r"model_fn returned shape \(1, 4, 4, 8\); sampler 'euler' needs "
                                         r"the latents' shape \(1, 4, 4, 4\).*variance_type learned"):
        sampling.sample(jax_fn, jnp.asarray(LATENTS), sampler="euler", num_steps=2, schedule=cfg)
    learned = ScheduleConfig.from_config(dict(CONFIGS["sd1"], variance_type="learned_range"))
    with pytest.raises(ValueError, match=r"learned_range needs a model output of shape \(1, 4, 4, 8\)"):
        sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="ddpm", num_steps=2, schedule=learned)


CHURN = [dict(s_churn=0.5), dict(s_churn=80.0),  # gamma = min(s_churn / N, sqrt 2 - 1): small, capped
         dict(s_churn=10.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)]  # churn only in a sigma band


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", ["sd1", "sd2_v", "linear_1100"])
@pytest.mark.parametrize("churn", CHURN, ids=["small", "capped", "band"])
def test_euler_churn_matches_diffusers(churn, config, num_steps):
    """Karras et al. 2022 Alg. 2's churn, as arguments of EulerDiscreteScheduler.step (diffusers'
    pipelines never pass them; jaxsd takes them in ScheduleConfig), with the same noise."""
    cfg = ScheduleConfig.from_config(dict(CONFIGS[config], **churn))
    out = sampling.sample(jax_model, jnp.asarray(BATCH2), sampler="euler", num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, BATCH2.shape) for i in range(len(trajectory))])
    ref, _ = diffusers_loop("euler", CONFIGS[config], num_steps, BATCH2, noises, step_kwargs=churn)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"
    # the churn changes the result, wherever a step's sigma lies in [s_tmin, s_tmax] (with 1 or 2
    # steps none lies in the band's [0.5, 5])
    churned = sampling.make_plan("euler", num_steps, cfg).consts["churn"].any()
    assert churned == ("s_tmax" not in churn or num_steps > 2)
    plain, _ = diffusers_loop("euler", CONFIGS[config], num_steps, BATCH2, noises)
    assert (np.abs(plain - ref).max() > 1e-3) == churned


def test_churn_refused_where_diffusers_has_none():
    with pytest.raises(ValueError, match=r"'heun'.*has no s_churn.*'euler'"):
        sampling.make_plan("heun", 5, ScheduleConfig.from_config(dict(CONFIGS["sd1"], s_churn=1.0)))
    with pytest.raises(ValueError, match=r"s_tmax=0.1 must be a number >= s_tmin=0.5"):
        ScheduleConfig.from_config(dict(CONFIGS["sd1"], s_tmin=0.5, s_tmax=0.1))


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_consistency_samplers_refuse_more_steps_than_distilled(name):
    from sampler_reference import _scheduler_class

    raw = dict(CONFIGS["sd1"], original_inference_steps=8)
    with pytest.raises(ValueError):  # diffusers refuses it too
        _scheduler_class(DIFFUSERS[name][0]).from_config(raw).set_timesteps(9)
    with pytest.raises(ValueError, match=rf"'{name}' takes at most original_inference_steps=8 steps.*num_steps=9"):
        sampling.make_plan(name, 9, ScheduleConfig.from_config(raw))


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_tcd_gamma_outside_unit_interval_refused(eta):
    with pytest.raises(ValueError, match=rf"eta={eta} is TCD's gamma and must be in \[0, 1\]"):
        sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="tcd", num_steps=2,
                        schedule=ScheduleConfig.from_config(CONFIGS["sd1"]), eta=eta)


def test_consistency_options_refused_elsewhere():
    with pytest.raises(ValueError, match=r"'euler'.*has no original_inference_steps.*'lcm' or 'tcd'"):
        sampling.make_plan("euler", 4, ScheduleConfig.from_config(dict(CONFIGS["sd1"], original_inference_steps=8)))
    # TCDScheduler has the key, but its step never reads it
    with pytest.raises(ValueError, match=r"'tcd'.*has no timestep_scaling.*'lcm'"):
        sampling.make_plan("tcd", 4, ScheduleConfig.from_config(dict(CONFIGS["sd1"], timestep_scaling=5.0)))


@pytest.mark.parametrize("name", ["euler", "tcd"])
def test_thresholding_refused_where_diffusers_has_none(name):
    """TCDScheduler takes thresholding and clip_sample keys but its step never reads them."""
    with pytest.raises(ValueError, match=rf"'{name}'.*has no thresholding.*ddim, ddpm"):
        sampling.make_plan(name, 5, ScheduleConfig.from_config(dict(CONFIGS["sd1"], thresholding=True)))
    if name == "tcd":
        with pytest.raises(ValueError, match=r"'tcd'.*has no clip_sample"):
            sampling.make_plan(name, 5, ScheduleConfig.from_config(dict(CONFIGS["sd1"], clip_sample=True)))


EXPLICIT = [("euler", "timesteps"), ("euler", "sigmas"), ("heun", "timesteps"), ("ddpm", "timesteps"),
            ("dpmpp_2m", "timesteps"), ("dpmpp_2m_sde", "timesteps"), ("dpmpp_2s", "timesteps"),
            ("lcm", "timesteps"), ("tcd", "timesteps")]


def explicit_list(kind, config, num_steps):
    """Align Your Steps for 10 steps; otherwise random descending timesteps, or sigmas (ending
    with 0) drawn in the training range, for num_steps steps."""
    cfg = ScheduleConfig.from_config(CONFIGS[config])
    if num_steps == 10:
        return list(S.AYS["sd1"][kind])
    rng = np.random.default_rng(num_steps)
    T = cfg.num_train_timesteps
    if kind == "timesteps":
        return sorted(rng.choice(T, num_steps, replace=False).tolist(), reverse=True)
    sig = S.train_sigmas(S.with_betas(cfg))
    return sorted(np.exp(rng.uniform(np.log(sig[0]), np.log(sig[-1]), num_steps)).tolist(), reverse=True) + [0.0]


@pytest.mark.parametrize("num_steps", (1, 2, 7, 10, 50))
@pytest.mark.parametrize("config", ["sd1", "sd2_v", "linear_1100"])
@pytest.mark.parametrize("name,kind", EXPLICIT)
def test_explicit_timesteps_and_sigmas_match_diffusers(name, kind, config, num_steps):
    """diffusers' set_timesteps(timesteps=...) / (sigmas=...), Align Your Steps among them."""
    values = explicit_list(kind, config, num_steps)
    raw = dict(CONFIGS[config], **{kind: values})
    cfg = ScheduleConfig.from_config(raw)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(len(trajectory))])
    ref, ref_t = diffusers_loop(name, CONFIGS[config], num_steps, LATENTS, noises, **{kind: values})
    assert trajectory.shape == ref.shape
    np.testing.assert_allclose(sampling.make_plan(name, num_steps, cfg).timesteps, ref_t, atol=T_ATOL)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"


@pytest.mark.parametrize("name,options,match", [
    ("ddim", dict(timesteps=[999, 500]), "'ddim'.*takes no explicit timesteps.*euler, heun"),
    ("heun", dict(sigmas=[14.6, 1.0, 0.0]), "'heun'.*takes no explicit sigmas.*euler"),
    ("euler", dict(timesteps=[999, 500], use_karras_sigmas=True), "cannot be combined with use_karras_sigmas"),
])
def test_explicit_lists_refused_where_diffusers_has_none(name, options, match):
    with pytest.raises(ValueError, match=match):
        sampling.make_plan(name, 2, ScheduleConfig.from_config(dict(CONFIGS["sd1"], **options)))


@pytest.mark.parametrize("options,num_steps,match", [
    (dict(timesteps=[999, 500]), 3, "num_steps=3 does not match the schedule's explicit timesteps list, which makes 2"),
    (dict(sigmas=[14.6, 1.0, 0.0]), 3, "explicit sigmas list, which makes 2"),
])
def test_explicit_list_fixes_the_step_count(options, num_steps, match):
    with pytest.raises(ValueError, match=match):
        sampling.make_plan("euler", num_steps, ScheduleConfig.from_config(dict(CONFIGS["sd1"], **options)))


@pytest.mark.parametrize("options,match", [
    (dict(timesteps=[500, 999]), "strictly descending"),
    (dict(timesteps=[1000, 10]), r"in \[0, num_train_timesteps=1000\)"),
    (dict(sigmas=[14.6]), "at least two"),
    (dict(timesteps=[999], sigmas=[1.0, 0.0]), "not both"),
])
def test_bad_explicit_lists(options, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_config(dict(CONFIGS["sd1"], **options))


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


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_higher_order_step_to_zero_is_first_order(order):
    """With lower_order_final=False the last step (to sigma = 0) runs at order 2 or 3: diffusers
    divides by rk = 0 there (inf or NaN at order 2; at order 3 torch.linalg.solve fails on a
    singular matrix). jaxsd takes the first-order update for that step; every earlier one matches."""
    raw = dict(CONFIGS["sd1"], solver_order=order, lower_order_final=False)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="unipc", num_steps=7,
                          schedule=ScheduleConfig.from_config(raw), return_trajectory=True)
    assert np.isfinite(out.latents).all()
    if order == 3:
        with pytest.raises(RuntimeError, match="singular"):
            diffusers_loop("unipc", raw, 7, LATENTS)
        return
    ref, _ = diffusers_loop("unipc", raw, 7, LATENTS)
    assert not np.isfinite(ref[-1]).any()  # inf or NaN
    np.testing.assert_allclose(out.trajectory[:-1], ref[:-1], rtol=0, atol=RTOL * np.abs(ref[:-1]).max())


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


@pytest.mark.parametrize("name", ["lcm", "tcd", "ddim", "euler", "heun"])
def test_empty_config_takes_each_classes_defaults(name):
    """A config that says nothing gets the chosen class's own defaults, which differ: LCM and TCD
    default to SD's scaled_linear 0.00085..0.012, Heun to those numbers on a linear schedule, DDIM
    and Euler to the DDPM paper's linear 1e-4..0.02."""
    cfg = ScheduleConfig.from_config({})
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=4, schedule=cfg,
                          key=KEY, return_trajectory=True)
    trajectory = np.asarray(out.trajectory)
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(len(trajectory))])
    ref, _ = diffusers_loop(name, {}, 4, LATENTS, noises)
    scale = np.maximum(1.0, np.abs(ref).max(axis=(1, 2, 3, 4)))
    err = np.abs(trajectory - ref).max(axis=(1, 2, 3, 4)) / scale
    assert err.max() <= RTOL, f"evaluation {err.argmax()}: relative error {err.max():.2e}"


# --- Configs as users have them: saved by any class, read by any sampler -----------------------

@pytest.mark.parametrize("option", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("name", KARRAS)
def test_config_sigma_range_matches_diffusers(name, option):
    """sigma_min / sigma_max in a config bound the Karras, exponential and beta sigmas of every
    sampler that has them: diffusers' conversions read the keys from any config that holds them
    (declared by Euler, kept by from_config for the others), except the Karras conversion of
    LMSDiscrete and DPMSolverSDE, which spans the training sigmas. The range moves the result
    far beyond the bound (checked: it is not the training range's schedule)."""
    raw = dict(CONFIGS["sd1"], sigma_min=0.1, sigma_max=10.0, **{option: True})
    compare_with_diffusers(name, raw, 8)
    plan = sampling.make_plan(name, 8, ScheduleConfig.from_config(raw))
    plain = sampling.make_plan(name, 8, ScheduleConfig.from_config(dict(CONFIGS["sd1"], **{option: True})))
    ignored = name in ("lms", "dpmpp_sde") and option == "use_karras_sigmas"
    assert np.array_equal(plan.timesteps, plain.timesteps) == ignored


@pytest.mark.parametrize("options,match", [
    (dict(sigma_min=0.0), r"sigma_min=0.0 must be a positive number"),
    (dict(sigma_max="10"), r"sigma_max='10' must be a positive number"),
    (dict(sigma_min=5.0, sigma_max=1.0), r"sigma_min=5.0 must be below sigma_max=1.0"),
])
def test_bad_sigma_range_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_config(dict(CONFIGS["sd1"], use_karras_sigmas=True, **options))


def saved_config(cls_name, overrides, tmp_path, base=None):
    """A config as diffusers' save_config writes it for `cls_name` (SD 1.5's values)."""
    scheduler = getattr(diffusers, cls_name).from_config(base or CONFIGS["sd1"], **overrides)
    scheduler.save_config(tmp_path)
    return json.loads((tmp_path / "scheduler_config.json").read_text())


@pytest.mark.parametrize("name", DIFFUSERS)
def test_saved_config_of_every_class_gives_its_sampler(name, tmp_path):
    """A checkpoint's scheduler_config.json written by each diffusers class (with its
    algorithm_type, solver_type, ...): the default sampler is that class's, and it runs as
    diffusers runs it (DEIS and DPM-Solver SDE configs were refused before: algorithm_type)."""
    raw = saved_config(*DIFFUSERS[name], tmp_path)
    assert sampling.default_sampler(raw) == name
    compare_with_diffusers(name, raw, 6)


# Each solver family's config (its solver_type and algorithm_type) read by every other family's
# sampler: diffusers replaces another family's solver_type by the class's default (midpoint,
# bh2, logrho), and the sampler's name chooses the algorithm.
SOLVERS = ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s", "unipc", "deis"]


@pytest.mark.parametrize("saved_by,other", [(a, b) for a in SOLVERS for b in SOLVERS if a != b])
def test_config_saved_by_another_solver_matches_diffusers(saved_by, other, tmp_path):
    raw = saved_config(*DIFFUSERS[saved_by], tmp_path)
    raw["solver_type"] = {"dpmpp_2m": "midpoint", "dpmpp_2m_sde": "midpoint", "dpmpp_2s": "midpoint",
                          "unipc": "bh2", "deis": "logrho"}[saved_by]  # written by every class
    if other == "deis" and raw.get("algorithm_type") == "sde-dpmsolver++":
        # diffusers' DEIS refuses an SDE config; jaxsd's deis runs DEIS, as its name says
        raw = dict(raw, algorithm_type="dpmsolver++")
    # DPMSolverSinglestep saves lower_order_final=False (its default), which UniPC then reads
    compare_with_diffusers(other, raw, 6, diffusers_last_step_inf=(
        other == "unipc" and raw.get("lower_order_final") is False))


@pytest.mark.parametrize("cls_name,algorithm,expected", [
    ("DPMSolverMultistepScheduler", "sde-dpmsolver++", "dpmpp_2m_sde"),
    ("DPMSolverMultistepScheduler", "deis", "dpmpp_2m"),       # diffusers: deis -> dpmsolver++
    ("DPMSolverSinglestepScheduler", "deis", "dpmpp_2s"),
    ("DEISMultistepScheduler", "dpmsolver++", "deis"),         # diffusers: -> deis
    ("DPMSolverMultistepScheduler", "dpmsolver", None),        # DPM-Solver (noise form): none here
    ("DPMSolverMultistepScheduler", "sde-dpmsolver", None),
    ("DPMSolverSinglestepScheduler", "sde-dpmsolver++", None),  # diffusers' SDE singlestep
    ("DEISMultistepScheduler", "sde-dpmsolver++", None),       # diffusers refuses it too
])
def test_default_sampler_reads_algorithm_type(cls_name, algorithm, expected):
    config = dict(CONFIGS["sd1"], _class_name=cls_name, algorithm_type=algorithm)
    ScheduleConfig.from_config(config)  # a value diffusers has is read
    if expected is None:
        with pytest.raises(ValueError, match=re.escape(f"{cls_name}(algorithm_type='{algorithm}') has no jaxsd sampler")):
            sampling.default_sampler(config)
    else:
        assert sampling.default_sampler(config) == expected


def test_unknown_algorithm_type_is_refused():
    with pytest.raises(ValueError, match=r"algorithm_type='dpmsolver\+\+\+' is not supported; choose one of"):
        ScheduleConfig.from_config(dict(CONFIGS["sd1"], algorithm_type="dpmsolver+++"))


def test_ddim_eta_one_zero_snr_is_finite():
    """DDIM with eta = 1 on a zero-terminal-SNR schedule: at the first step a_t = 0, so
    1 - a_prev - sigma_t^2 is exactly 0 and its float32 value can come out negative; diffusers'
    sqrt then gives NaN (here at 13 of the step counts 1..30, 2 and 10 among the finite ones).
    jaxsd clamps the argument at 0: finite at every count, and where diffusers is finite the two
    agree within the rounding of that root, sqrt(one float32 ulp of 1) = 2.4e-4 of the scale."""
    raw = dict(CONFIGS["sd1"], rescale_betas_zero_snr=True, timestep_spacing="trailing",
               prediction_type="v_prediction")
    cfg = ScheduleConfig.from_config(raw)
    compared = 0
    for n in range(1, 31):
        out = np.asarray(sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="ddim", num_steps=n,
                                         schedule=cfg, key=KEY, eta=1.0).latents)
        assert np.isfinite(out).all(), f"{n} steps"
        noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape) for i in range(n)])
        ref, _ = diffusers_loop("ddim", raw, n, LATENTS, noises, eta=1.0)
        if np.isfinite(ref[-1]).all():
            compared += 1
            err = np.abs(out - ref[-1]).max() / max(1.0, np.abs(ref[-1]).max())
            assert err <= 3e-4, f"{n} steps: relative error {err:.2e}"
    assert compared >= 10
