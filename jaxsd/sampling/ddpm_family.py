"""DDPM, DDIM and PNDM: samplers on the discrete training timesteps, x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps.

a_t is alpha_bar_t (alphas_cumprod). The model is called on x itself (no input scaling) with the
integer timestep t. Each step goes from t to the previous timestep t' (a_{t'} = final alpha past 0).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsd.sampling import schedule as S
from jaxsd.sampling.common import (Plan, dynamic_threshold, eps_coefficients, make_plan, require,
                                   threshold_consts, x0_coefficients)


@struct.dataclass
class LatentState:
    """State of a one-step sampler: just the latents."""

    x: jnp.ndarray  # [B, H, W, C] float32, the current sample x_t (diffusers' `latents`)


def init_latent_state(x):
    return LatentState(x=x)


def _alpha_plan(cfg, num_steps, default_spacing="leading"):
    spacing = cfg.timestep_spacing or default_spacing
    t = S.spaced_timesteps(spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset)
    if cfg.timesteps is not None:  # DDPM's custom_timesteps (DDIM refuses them in require)
        t = np.asarray(cfg.timesteps).astype(np.int64)
    ab = S.alphas_cumprod(cfg)
    return t, ab


def _alpha_noise(ab_t):
    # diffusers' add_noise: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (Ho et al. 2020 eq. 4).
    return np.sqrt(ab_t), np.sqrt(1 - ab_t)


# --- DDIM ------------------------------------------------------------------------------------


def ddim_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DDIMScheduler. Note: diffusers steps from t to t - T // N even for trailing spacing."""
    require(cfg, "ddim", "DDIMScheduler", rescale=True, clip=True, threshold=True)
    t, ab = _alpha_plan(cfg, num_steps)
    final = 1.0 if (cfg.set_alpha_to_one is None or cfg.set_alpha_to_one) else ab[0]
    t_prev = t - cfg.num_train_timesteps // num_steps
    a_t = ab[t]
    a_prev = np.where(t_prev >= 0, ab[np.maximum(t_prev, 0)], final)
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    eps_x, eps_out = eps_coefficients(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    clip = (cfg.clip_sample is None or cfg.clip_sample) and not cfg.thresholding  # threshold first
    consts = dict(
        x0_x=x0_x, x0_out=x0_out, eps_x=eps_x, eps_out=eps_out, **threshold_consts(cfg, len(t)),
        clip=np.full(len(t), cfg.clip_sample_range if clip else np.inf),
        a_prev=a_prev,
        # DDIM eq. 16 with eta = 1: sigma_t^2 = (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)
        variance=(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev),
    )
    return make_plan(t, np.ones(len(t)), consts, *_alpha_noise(a_t), 1.0)


def ddim_step(state: LatentState, model_output, c, noise) -> LatentState:
    """Song et al. 2021 (DDIM) eq. 12, with sigma_t = eta * sqrt(variance) (eq. 16)."""
    x = state.x
    x0 = jnp.clip(c["x0_x"] * x + c["x0_out"] * model_output, -c["clip"], c["clip"])
    x0 = dynamic_threshold(x0, c)
    eps = c["eps_x"] * x + c["eps_out"] * model_output
    std = c["eta"] * jnp.sqrt(c["variance"])
    # x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z. With eta = 1 and
    # a_t = 0 (zero terminal SNR) the root's argument is exactly 0, and float32 rounding can make
    # it negative (diffusers: NaN at some step counts); it is never negative, so clamp at 0.
    direction = jnp.sqrt(jnp.maximum(1 - c["a_prev"] - std**2, 0.0))
    x = jnp.sqrt(c["a_prev"]) * x0 + direction * eps + std * noise
    return LatentState(x=x)


# --- DDPM ------------------------------------------------------------------------------------

DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
_LEARNED = {"learned": 1, "learned_range": 2}  # the model predicts the variance in C more channels


def ddpm_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DDPMScheduler: ancestral sampling of the posterior q(x_{t'} | x_t, x0) on N timesteps."""
    require(cfg, "ddpm", "DDPMScheduler", rescale=True, clip=True, threshold=True,
            custom=("timesteps",))
    variance_type = cfg.variance_type or "fixed_small"
    S._check_choice("variance_type", variance_type, DDPM_VARIANCE_TYPES)
    # (a model with 2C output channels goes with the learned types; ddpm_step splits it)
    t, ab = _alpha_plan(cfg, num_steps)
    t_prev = np.append(t[1:], -1)  # the next timestep in the list, -1 after the last
    a_t = ab[t]
    a_prev = np.where(t_prev >= 0, ab[np.maximum(t_prev, 0)], 1.0)
    beta_t = 1 - a_t / a_prev  # the effective beta of this (possibly strided) step
    # Ho et al. 2020 eq. 7: mean = c0 x0 + c1 x_t, beta_tilde = (1 - a_prev)/(1 - a_t) beta_t
    c0 = np.sqrt(a_prev) * beta_t / (1 - a_t)
    c1 = np.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t)
    small = np.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    std = np.sqrt(beta_t) if variance_type == "fixed_large" else np.sqrt(small)
    std = np.where(t > 0, std, 0.0)  # no noise on the step that starts at t = 0
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    clip = (cfg.clip_sample is None or cfg.clip_sample) and not cfg.thresholding  # threshold first
    consts = dict(x0_x=x0_x, x0_out=x0_out, c0=c0, c1=c1, std=std, **threshold_consts(cfg, len(t)),
                  clip=np.full(len(t), cfg.clip_sample_range if clip else np.inf),
                  # learned variances (Nichol & Dhariwal 2021 eq. 15): the log variance between
                  # log beta_tilde and log beta, or the variance itself
                  learned=np.full(len(t), _LEARNED.get(variance_type, 0)), noisy=(t > 0) * 1.0,
                  log_small=np.log(small), log_beta=np.log(np.maximum(beta_t, 1e-20)))
    return make_plan(t, np.ones(len(t)), consts, *_alpha_noise(a_t), 1.0)


def ddpm_step(state: LatentState, model_output, c, noise) -> LatentState:
    """Ho et al. 2020 Alg. 2 in the posterior-mean form (eq. 7) with a predicted x0.

    A model that also predicts its variance returns 2C channels [prediction | v] (variance_type
    "learned": v is the variance; "learned_range": v in [-1, 1] interpolates the log variance,
    Nichol & Dhariwal 2021 eq. 15)."""
    x = state.x
    C = x.shape[-1]
    std = c["std"]
    if model_output.shape[-1] == 2 * C:  # a static shape: [prediction | variance]
        model_output, v = model_output[..., :C], model_output[..., C:]
        frac = (v + 1) / 2
        log_var = frac * c["log_beta"] + (1 - frac) * c["log_small"]
        learned_std = jnp.where(c["learned"] == 1, jnp.sqrt(v), jnp.exp(0.5 * log_var))
        std = jnp.where(c["learned"] > 0, c["noisy"] * learned_std, std)
    x0 = jnp.clip(c["x0_x"] * x + c["x0_out"] * model_output, -c["clip"], c["clip"])
    x0 = dynamic_threshold(x0, c)
    return LatentState(x=c["c0"] * x0 + c["c1"] * x + std * noise)


# --- PNDM: Runge-Kutta warm-up (PRK) then PLMS -----------------------------------------------


@struct.dataclass
class PNDMState:
    """State of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models")."""

    x: jnp.ndarray  # [B, H, W, C] the current sample
    outputs: jnp.ndarray  # [4, B, H, W, C] past model outputs, newest first (diffusers' ets)
    x_start: jnp.ndarray  # [B, H, W, C] the sample a multi-evaluation step starts from
    acc: jnp.ndarray  # [B, H, W, C] PRK: the Runge-Kutta sum 1/6 e1 + 1/3 e2 + 1/3 e3 so far
    count: jnp.ndarray  # [] int32, evaluations done so far (diffusers' counter)


def init_pndm_state(x):
    return PNDMState(x=x, outputs=jnp.zeros((4,) + x.shape, x.dtype), x_start=x,
                     acc=jnp.zeros_like(x), count=jnp.zeros((), jnp.int32))


# Weights of (this output, outputs[0..3]) by count (rows 0..4): count 0 uses the output as is;
# count 1 averages it with the first (a 2nd-order Heun-like restart from x_start); from count 2
# on the output is stored first and the Adams-Bashforth weights of orders 2, 3, 4 apply.
PLMS_WEIGHTS = np.array([
    [1, 0, 0, 0, 0],
    [1 / 2, 1 / 2, 0, 0, 0],
    [0, 3 / 2, -1 / 2, 0, 0],
    [0, 23 / 12, -16 / 12, 5 / 12, 0],
    [0, 55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


def _transfer(cfg, alpha, t_from, t_to):
    """Liu et al. 2022 eq. 11, the DDIM step as a "transfer" phi, as x' = k_x x + k_out output:
    x' = sqrt(a'/a) x - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a'))."""
    a, a_prev = alpha(t_from), alpha(t_to)
    g = (a_prev - a) / (a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev))
    eps_x, eps_out = eps_coefficients(cfg.prediction_type, np.sqrt(a), np.sqrt(1 - a))
    return np.sqrt(a_prev / a) - g * eps_x, -g * eps_out


def pndm_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """PNDMScheduler. skip_prk_steps=True (SD's config): PLMS alone, N + 1 evaluations, the second
    timestep repeated. skip_prk_steps=False (diffusers' default): the first three steps are
    Runge-Kutta steps of four evaluations each (PRK), then PLMS: N + 9 evaluations."""
    require(cfg, "pndm", "PNDMScheduler", prediction_types=("epsilon", "v_prediction"))
    spacing = cfg.timestep_spacing or "leading"
    T = cfg.num_train_timesteps
    ts = S.spaced_timesteps(spacing, num_steps, T, cfg.steps_offset)[::-1]  # ascending
    ab = S.alphas_cumprod(cfg)
    final = ab[0] if not cfg.set_alpha_to_one else 1.0
    r = T // num_steps
    alpha = lambda tt: np.where(tt >= 0, ab[np.clip(tt, 0, T - 1)], final)
    if cfg.skip_prk_steps:
        t = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]  # descending, t_1 twice
        k_x, k_out = _transfer(cfg, alpha, t, t - r)
        # diffusers' second evaluation (count 1) redoes the first step: from t + r to t.
        k_x1, k_out1 = _transfer(cfg, alpha, np.minimum(t + r, T - 1), t)
        zeros = np.zeros(len(t))
        consts = dict(k_x=k_x, k_out=k_out, k_x1=k_x1, k_out1=k_out1, prk=zeros,
                      rk_start=zeros, rk_in=zeros, rk_out=zeros, rk_acc=zeros)
        return make_plan(t, np.ones(len(t)), consts, *_alpha_noise(ab[t]), 1.0)

    if num_steps < 4:
        raise ValueError(f"sampler 'pndm' with skip_prk_steps=False (its Runge-Kutta warm-up takes "
                         f"three steps, then PLMS) needs num_steps >= 4, got num_steps={num_steps} "
                         "(diffusers fails there too); use skip_prk_steps=True or more steps")
    # PRK: step k goes from s_k = ts[-1-k] to ts[-2-k] in four evaluations at diffusers'
    # timesteps (s, m, m, e) with m = e + h, h = r // 2; each evaluation j moves x_start (the
    # sample at s) with the transfer from s to its own target, and the fourth uses the classic
    # RK4 combination 1/6 e0 + 1/3 e1 + 1/3 e2 + 1/6 e3 (Liu et al. 2022 eq. 13).
    h = r // 2
    t_eval, t_start, t_to, j = [], [], [], []
    for k in range(3):
        s_k, e_k = ts[-1 - k], ts[-2 - k]
        evals = [s_k, e_k + h, e_k + h, e_k]
        t_eval += evals
        t_start += [s_k] * 4
        # diffusers: target = t_eval - h on even counters, t_eval on odd ones.
        t_to += [evals[0] - h, evals[1], evals[2] - h, evals[3]]
        j += [0, 1, 2, 3]
    t_plms = ts[:-3][::-1]  # descending, from ts[-4]
    t = np.concatenate([t_eval, t_plms]).astype(np.int64)
    k_x, k_out = _transfer(cfg, alpha, np.concatenate([t_start, t_plms]),
                           np.concatenate([t_to, t_plms - r]))
    n_rk, n = 12, len(t)
    j = np.array(j)
    rk = lambda values: np.concatenate([values, np.zeros(n - n_rk)])
    consts = dict(
        k_x=k_x, k_out=k_out, k_x1=np.zeros(n), k_out1=np.zeros(n),  # no PLMS restart after PRK
        prk=rk(np.ones(n_rk)),
        rk_start=rk(j == 0),  # x_start = x; the output joins `outputs` (diffusers' ets)
        rk_in=rk(np.array([1 / 6, 1 / 3, 1 / 3, 0])[j]),  # added to the running RK sum
        rk_out=rk(np.array([1, 1, 1, 1 / 6])[j]),  # weight of this output in the update
        rk_acc=rk(j == 3),  # the fourth evaluation adds the sum (and clears it)
    )
    return make_plan(t, np.ones(n), consts, *_alpha_noise(ab[t]), 1.0)


def pndm_step(state: PNDMState, model_output, c, noise) -> PNDMState:
    """Liu et al. 2022 Alg. 2 (PLMS), with diffusers' warmup: PRK (Alg. 1) or, with
    skip_prk_steps, the restart of the first two evaluations."""
    del noise
    n = state.count
    prk = c["prk"] > 0
    stored = jnp.concatenate([model_output[None], state.outputs[:3]])
    # PLMS: count 1 (the restart) does not store its output; PRK stores the first of every four.
    outputs = jnp.where(prk, jnp.where(c["rk_start"] > 0, stored, state.outputs),
                        jnp.where(n == 1, state.outputs, stored))
    w = jnp.asarray(PLMS_WEIGHTS, jnp.float32)[jnp.minimum(n, 4)]
    plms = w[0] * model_output + jnp.einsum("k,k...->...", w[1:], outputs)
    rk = c["rk_acc"] * state.acc + c["rk_out"] * model_output
    combined = jnp.where(prk, rk, plms)
    x_start = jnp.where(prk, jnp.where(c["rk_start"] > 0, state.x, state.x_start),
                        jnp.where(n == 0, state.x, state.x_start))
    x = jnp.where(prk | (n == 1), x_start, state.x)
    k_x = jnp.where(~prk & (n == 1), c["k_x1"], c["k_x"])
    k_out = jnp.where(~prk & (n == 1), c["k_out1"], c["k_out"])
    acc = jnp.where(c["rk_acc"] > 0, 0.0, state.acc + c["rk_in"] * model_output)
    return PNDMState(x=k_x * x + k_out * combined, outputs=outputs, x_start=x_start, acc=acc,
                     count=n + 1)
