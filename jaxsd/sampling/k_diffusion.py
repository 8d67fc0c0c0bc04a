"""Karras-style samplers: Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral and LMS.

They integrate the probability-flow ODE of Karras et al. 2022 (eq. 4 with sigma(t) = t),
dx/dsigma = (x - D(x; sigma)) / sigma, in the variable x = x_vp / alpha whose noise level is
sigma = sqrt((1 - a) / a). The UNet is called on c_in x = x / sqrt(sigma^2 + 1) (the VP sample)
with the (possibly fractional) timestep whose sigma this is (`schedule.sigma_to_t`).

One step function serves the first five: an evaluation is either a whole step (stage 0) or, for
the two-evaluation samplers, the second half of one (stage 1) that restarts from the sample saved
by stage 0. Ancestral samplers add fresh noise, `noise_std * noise`; Euler with churn adds
`churn * noise` before the step instead (Karras et al. 2022 Alg. 2 line 5).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsd.sampling import schedule as S
from jaxsd.sampling.common import Plan, k_x0_coefficients, make_plan, require


@struct.dataclass
class KState:
    """State of a Karras-style sampler."""

    x: jnp.ndarray  # [B, H, W, C] current sample at noise level sigma (diffusers' `latents`)
    x_saved: jnp.ndarray  # [B, H, W, C] sample at the start of a two-evaluation step
    d_saved: jnp.ndarray  # [B, H, W, C] Heun: derivative dx/dsigma of the first evaluation


def init_k_state(x):
    return KState(x=x, x_saved=x, d_saved=jnp.zeros_like(x))


def k_step(state: KState, model_output, c, noise) -> KState:
    """One evaluation of Euler / Euler a / Heun / DPM2 / DPM2 a (Karras et al. 2022 Alg. 1-2)."""
    x = state.x
    if noise is not None:  # Euler's churn (Alg. 2 l. 5): x_hat = x + sqrt(s_hat^2 - s^2) s_noise z
        x = x + c["churn"] * noise
    denoised = jnp.clip(c["x0_x"] * x + c["x0_out"] * model_output, -c["clip"], c["clip"])
    d = (x - denoised) / c["sigma_in"]  # dx/dsigma at the evaluated point (Karras eq. 4)
    second = c["stage"] == 1
    # Heun (Alg. 1 line 8): average the two slopes; DPM2 uses the midpoint slope alone.
    d_step = jnp.where(second & (c["average"] == 1), (state.d_saved + d) / 2, d)
    x_from = jnp.where(second, state.x_saved, x)
    x_new = x_from + d_step * c["dt"]
    if noise is not None:  # ancestral: re-inject noise of std sigma_up
        x_new = x_new + c["noise_std"] * noise
    return KState(x=x_new, x_saved=jnp.where(second, state.x_saved, x), d_saved=d)


def _k_sigmas(cfg, num_steps, *, karras_config_range=True, round_custom=False, final_sigma=0.0,
              log_linear=False):
    """Timesteps [N] and sigmas [N + 1] (last = final_sigma) as diffusers' k-schedulers set them.

    `log_linear` (Euler's interpolation_type="log_linear"): the N + 1 sigmas are evenly spaced in
    log sigma from sigma_max to sigma_min, the training range, while the timesteps keep their
    spacing; diffusers appends final_sigma after them, but its N steps never reach it, so the
    last step ends at sigma_min.
    `karras_config_range=False`: Karras sigmas span the training sigmas even where the config
    gives sigma_min / sigma_max (diffusers' LMSDiscrete and DPMSolverSDE; schedule.convert_sigmas).
    """
    spacing = cfg.timestep_spacing or "linspace"
    t = S.spaced_timesteps(spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset,
                           integer=False)
    sig_train = S.train_sigmas(cfg)
    if cfg.sigmas is not None:  # explicit sigmas, the final one included: timesteps follow them
        sigmas = np.asarray(cfg.sigmas, np.float64).astype(np.float32).astype(np.float64)
        t = S.sigma_to_t(sigmas[:-1], sig_train)
        init = sigmas.max() if spacing != "leading" else np.sqrt(sigmas.max() ** 2 + 1)
        return t, sigmas, init
    if cfg.timesteps is not None:  # explicit timesteps replace the spacing
        t = np.asarray(cfg.timesteps, np.float64).astype(np.float32).astype(np.float64)
    if log_linear:  # torch.linspace(log s_min32, ...) in float32, then exp in float32
        f32 = np.float32
        logs = np.log(sig_train.astype(f32))
        sigmas = np.exp(np.linspace(logs[-1], logs[0], num_steps + 1).astype(f32)).astype(np.float64)
    else:
        sigmas = S.interp_sigmas(t, sig_train)
    custom = S.convert_sigmas(cfg, sigmas, num_steps, karras_config_range=karras_config_range)
    if custom is not None:
        sigmas = custom
        t = S.sigma_to_t(sigmas, sig_train)
        if round_custom and cfg.use_karras_sigmas:
            t = t.round()
    if custom is not None or not log_linear:
        sigmas = np.append(sigmas, final_sigma)
    sigmas = sigmas.astype(np.float32).astype(np.float64)
    # diffusers: latents start at sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing.
    init = sigmas.max() if spacing != "leading" else np.sqrt(sigmas.max() ** 2 + 1)
    return t, sigmas, init


def _k_consts(prediction_type, sigma_in, dt, *, stage=None, average=0, noise_std=0.0, clip=np.inf,
              churn=0.0):
    E = len(sigma_in)
    x0_x, x0_out = k_x0_coefficients(prediction_type, sigma_in)
    full = lambda v: np.broadcast_to(np.asarray(v, np.float64), (E,))
    return dict(x0_x=x0_x, x0_out=x0_out, sigma_in=sigma_in, dt=dt,
                stage=full(0 if stage is None else stage), average=full(average),
                noise_std=full(noise_std), clip=full(clip), churn=full(churn))


def _c_in(sigma):
    return 1 / np.sqrt(np.asarray(sigma) ** 2 + 1)



def euler_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """EulerDiscreteScheduler: Karras et al. 2022 Alg. 2 (without churn, s_churn = 0: Euler's method)."""
    require(cfg, "euler", "EulerDiscreteScheduler", sigmas=True, rescale=True,
            custom=("timesteps", "sigmas"), churn=True)
    S._check_choice("interpolation_type", cfg.interpolation_type, ("linear", "log_linear"))
    S._check_choice("timestep_type", cfg.timestep_type, ("discrete", "continuous"))
    final = (cfg.final_sigmas_type or "zero")
    S._check_choice("final_sigmas_type", final, ("zero", "sigma_min"))
    last = S.train_sigmas(cfg)[0] if final == "sigma_min" else 0.0
    t, s, init = _k_sigmas(cfg, num_steps, final_sigma=last,
                           log_linear=cfg.interpolation_type == "log_linear")
    if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        # EDM-style models take c_noise = log(sigma) / 4 (Karras et al. 2022 Table 1), not t.
        # diffusers takes one timestep per sigma but the last: with log_linear, whose final
        # sigma it never reached, that is N + 1 steps, the last one to final_sigma.
        if cfg.interpolation_type == "log_linear" and not S.custom_sigmas(cfg) and cfg.sigmas is None:
            s = np.append(s, np.float32(last))
        t = np.float32(0.25) * np.log(s[:-1].astype(np.float32))
    # Churn (Alg. 2 lines 4-5): gamma = min(s_churn / N, sqrt 2 - 1) where s_tmin <= sigma <= s_tmax,
    # sigma_hat = (1 + gamma) sigma; the step runs from sigma_hat. As diffusers, the model has
    # already seen x at sigma (it churns after the evaluation), and v-prediction's x0 keeps sigma.
    sigma = s[:-1]
    gamma = np.where((cfg.s_tmin <= sigma) & (sigma <= cfg.s_tmax),
                     min(cfg.s_churn / (len(s) - 1), 2**0.5 - 1), 0.0)
    s_hat = (sigma.astype(np.float32) * np.float32(gamma + 1)).astype(np.float64)
    consts = _k_consts(cfg.prediction_type, s_hat, s[1:] - s_hat,
                       churn=cfg.s_noise * np.sqrt(np.maximum(s_hat**2 - sigma**2, 0)))
    if cfg.prediction_type == "v_prediction":
        consts["x0_x"], consts["x0_out"] = k_x0_coefficients("v_prediction", sigma)
    return make_plan(t, _c_in(sigma), consts, np.ones(len(t)), sigma, init)


def euler_a_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """EulerAncestralDiscreteScheduler (k-diffusion's sample_euler_ancestral, eta = 1)."""
    require(cfg, "euler_a", "EulerAncestralDiscreteScheduler",
            prediction_types=("epsilon", "v_prediction"), rescale=True)
    t, s, init = _k_sigmas(cfg, num_steps)
    s_from, s_to = s[:-1], s[1:]
    # Split the step to s_to into a deterministic step to sigma_down and fresh noise of std
    # sigma_up, with sigma_down^2 + sigma_up^2 = s_to^2 (the ancestral step of DDPM in sigma form).
    s_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    s_down = np.sqrt(s_to**2 - s_up**2)
    consts = _k_consts(cfg.prediction_type, s_from, s_down - s_from, noise_std=s_up)
    return make_plan(t, _c_in(s_from), consts, np.ones(num_steps), s_from, init)


def _interleave(first, second):
    """[f0, s0, f1, s1, ..., f_{N-1}]: N first-stage and N - 1 second-stage evaluations."""
    out = np.empty(len(first) + len(second), np.float64)
    out[0::2], out[1::2] = first, second
    return out


def heun_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """HeunDiscreteScheduler: Karras et al. 2022 Alg. 1; the last step (to sigma = 0) is Euler."""
    require(cfg, "heun", "HeunDiscreteScheduler", sigmas=True, clip=True, custom=("timesteps",))
    t, s, init = _k_sigmas(cfg, num_steps)
    N = num_steps
    s_k, s_next = s[:-1], s[1:]
    stage = _interleave(np.zeros(N), np.ones(N - 1))
    sigma_in = _interleave(s_k, s_next[:-1])  # stage 1 evaluates at sigma_{k+1}
    dt = _interleave(s_next - s_k, (s_next - s_k)[:-1])
    clip = cfg.clip_sample_range if cfg.clip_sample else np.inf
    consts = _k_consts(cfg.prediction_type, sigma_in, dt, stage=stage, average=1, clip=clip)
    timesteps = _interleave(t, t[1:])
    return make_plan(timesteps, _c_in(sigma_in), consts, np.ones(len(stage)), sigma_in, init, 2)


def dpm2_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """KDPM2DiscreteScheduler: DPM-Solver-2 (Lu et al. 2022 Alg. 1) with the midpoint in log sigma."""
    require(cfg, "dpm2", "KDPM2DiscreteScheduler", prediction_types=("epsilon", "v_prediction"),
            sigmas=True)
    t, s, init = _k_sigmas(cfg, num_steps, round_custom=True)
    N = num_steps
    s_k, s_next = s[:-1], s[1:]
    s_mid = np.sqrt(s_k * s_next)  # exp of the mean of log sigma_k and log sigma_{k+1}
    t_mid = S.sigma_to_t(s_mid[:-1], S.train_sigmas(cfg))
    stage = _interleave(np.zeros(N), np.ones(N - 1))
    sigma_in = _interleave(s_k, s_mid[:-1])
    # stage 0: Euler to the midpoint; stage 1: the whole step with the midpoint's slope.
    dt = _interleave(s_mid - s_k, (s_next - s_k)[:-1])
    consts = _k_consts(cfg.prediction_type, sigma_in, dt, stage=stage)
    noise_b = _interleave(s_k, s_next[:-1])
    return make_plan(_interleave(t, t_mid), _c_in(sigma_in), consts, np.ones(len(stage)),
                     noise_b, init, 2)


def dpm2_a_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """KDPM2AncestralDiscreteScheduler: DPM2 to sigma_down, then noise of std sigma_up."""
    require(cfg, "dpm2_a", "KDPM2AncestralDiscreteScheduler",
            prediction_types=("epsilon", "v_prediction"), sigmas=True)
    t, s, init = _k_sigmas(cfg, num_steps, round_custom=True)
    N = num_steps
    s_k, s_next = s[:-1], s[1:]
    s_up = np.sqrt(s_next**2 * (s_k**2 - s_next**2) / s_k**2)
    s_down = np.sqrt(s_next**2 - s_up**2)
    s_mid = np.sqrt(s_k * s_down)  # midpoint in log sigma between sigma_k and sigma_down
    s_mid[-1] = 0.0  # the last step goes straight to sigma = 0
    t_mid = S.sigma_to_t(s_mid[:-1], S.train_sigmas(cfg))
    stage = _interleave(np.zeros(N), np.ones(N - 1))
    sigma_in = _interleave(s_k, s_mid[:-1])
    dt = _interleave(s_mid - s_k, (s_down - s_k)[:-1])
    noise_std = _interleave(np.zeros(N), s_up[:-1])
    consts = _k_consts(cfg.prediction_type, sigma_in, dt, stage=stage, noise_std=noise_std)
    noise_b = _interleave(s_k, s_next[:-1])
    return make_plan(_interleave(t, t_mid), _c_in(sigma_in), consts, np.ones(len(stage)),
                     noise_b, init, 2)


# --- LMS -------------------------------------------------------------------------------------


@struct.dataclass
class LMSState:
    """State of the linear multistep sampler."""

    x: jnp.ndarray  # [B, H, W, C] current sample
    derivatives: jnp.ndarray  # [4, B, H, W, C] past slopes dx/dsigma, newest first (zeros unused)


def init_lms_state(x):
    return LMSState(x=x, derivatives=jnp.zeros((4,) + x.shape, x.dtype))


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> np.ndarray:
    """Adams-Bashforth weights in sigma: integrals over [sigma_i, sigma_{i+1}] of the Lagrange
    basis polynomials through sigma_i, ..., sigma_{i-order+1} (Karras et al. 2022 sec. 3 cites
    LMS; k-diffusion's `linear_multistep_coeff`). Exact polynomial integration here; diffusers
    uses scipy.integrate.quad, which is exact to rounding for these cubic integrands. [4]."""
    coeffs = np.zeros(4)
    nodes = [sigmas[i - k] for k in range(order)]
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        poly = np.poly1d(others, r=True) / np.prod([nodes[j] - o for o in others])
        integral = poly.integ()
        coeffs[j] = integral(sigmas[i + 1]) - integral(sigmas[i])
    return coeffs


def lms_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """LMSDiscreteScheduler (order 4): the weights are computed here, once, outside jit."""
    require(cfg, "lms", "LMSDiscreteScheduler", sigmas=True)
    t, s, init = _k_sigmas(cfg, num_steps, karras_config_range=False)
    x0_x, x0_out = k_x0_coefficients(cfg.prediction_type, s[:-1])
    # diffusers uses order min(i + 1, 4) by the step's index, whatever history exists (img2img).
    coeffs = np.stack([lms_coefficients(s, i, min(i + 1, 4)) for i in range(num_steps)])
    consts = dict(x0_x=x0_x, x0_out=x0_out, sigma=s[:-1], coeffs=coeffs)
    return make_plan(t, _c_in(s[:-1]), consts, np.ones(num_steps), s[:-1], init)


def lms_step(state: LMSState, model_output, c, noise) -> LMSState:
    """x_{i+1} = x_i + sum_j coeffs_j d_{i-j}, d = (x - D(x)) / sigma."""
    del noise
    x = state.x
    d = (x - (c["x0_x"] * x + c["x0_out"] * model_output)) / c["sigma"]
    derivatives = jnp.concatenate([d[None], state.derivatives[:3]])
    return LMSState(x=x + jnp.einsum("k,k...->...", c["coeffs"], derivatives),
                    derivatives=derivatives)
