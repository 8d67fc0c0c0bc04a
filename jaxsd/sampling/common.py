"""What every sampler shares: the host-side `Plan`, and turning a model output into x0.

A sampler is two functions:

    plan(cfg, num_steps) -> Plan                  NumPy float64, outside jit, once per schedule
    step(state, model_output, c, noise) -> state  jnp float32, pure, inside the lax.scan

One scan iteration is one UNet evaluation, exactly one call of diffusers' `scheduler.step`
(Heun-style samplers take two per step; PNDM takes num_steps + 1). `c` is this evaluation's slice
of `Plan.consts` (every array there has a leading axis of length `Plan.timesteps.shape[0]`), plus
the traced options the loop adds (`c["eta"]`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.sampling.schedule import ScheduleConfig


class Plan(NamedTuple):
    """Everything a sampler precomputes; all arrays have a leading evaluation axis [E]."""

    timesteps: np.ndarray  # [E] float32, the timestep diffusers passes to the UNet at each evaluation
    c_in: np.ndarray  # [E] float32, UNet input = c_in * latents (diffusers' scale_model_input)
    consts: dict  # name -> [E] (or [E, k]) float32 arrays, sliced per evaluation for `step`
    noise_a: np.ndarray  # [E] img2img: add_noise(x0, noise) = noise_a * x0 + noise_b * noise,
    noise_b: np.ndarray  # [E]   evaluated at the first kept evaluation (diffusers' add_noise)
    init_noise_sigma: float  # text-to-image latents = init_noise_sigma * unit Gaussian noise
    order: int  # diffusers' scheduler.order: img2img skips t_start * order evaluations


def make_plan(timesteps, c_in, consts, noise_a, noise_b, init_noise_sigma, order=1) -> Plan:
    """Casts everything to float32 (schedules are built in float64, sampling runs in float32)."""
    f32 = lambda a: np.asarray(a, np.float64).astype(np.float32)
    return Plan(f32(timesteps), f32(c_in), {k: f32(v) for k, v in consts.items()}, f32(noise_a),
                f32(noise_b), float(init_noise_sigma), order)


def x0_coefficients(prediction_type: str, alpha, sigma):
    """x0 = a * x + b * model_output for x = alpha * x0 + sigma * eps (variance preserving).

    epsilon:       x0 = (x - sigma eps) / alpha            (Ho et al. 2020 eq. 15)
    v_prediction:  x0 = alpha x - sigma v, v = alpha eps - sigma x0   (Salimans & Ho 2022 sec. 4)
    sample:        x0 = model_output
    Returns (a, b) as float64 arrays shaped like alpha.
    """
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    return np.zeros_like(alpha), np.ones_like(alpha)


def eps_coefficients(prediction_type: str, alpha, sigma):
    """eps = a * x + b * model_output, from eps = (x - alpha x0) / sigma with x0 as above."""
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if prediction_type == "epsilon":
        return np.zeros_like(alpha), np.ones_like(alpha)
    if prediction_type == "v_prediction":
        return sigma, alpha  # eps = sigma x + alpha v
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 / sigma, -alpha / sigma


def k_x0_coefficients(prediction_type: str, sigma):
    """x0 = a * x + b * model_output in Karras' form x = x0 + sigma eps (x = x_vp / alpha).

    epsilon: x0 = x - sigma eps;  v: x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1).
    """
    sigma = np.asarray(sigma, np.float64)
    alpha = 1 / np.sqrt(sigma**2 + 1)  # the VP alpha of this sigma
    a, b = x0_coefficients(prediction_type, alpha, sigma * alpha)
    return a * alpha, b


def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the VP process for Karras' sigma: alpha = 1/sqrt(1+sigma^2)."""
    alpha = 1 / np.sqrt(np.asarray(sigma, np.float64) ** 2 + 1)
    return alpha, sigma * alpha


def threshold_consts(cfg: ScheduleConfig, E: int) -> dict:
    """Per-evaluation constants of dynamic thresholding ([E] each; `thr` 0 when it is off)."""
    return dict(thr=np.full(E, 1.0 if cfg.thresholding else 0.0),
                thr_ratio=np.full(E, cfg.dynamic_thresholding_ratio),
                thr_max=np.full(E, cfg.sample_max_value))


def dynamic_threshold(x0: jax.Array, c: dict) -> jax.Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3; diffusers' _threshold_sample).

    Per sample: s = clip(quantile(|x0|, ratio), 1, sample_max_value), then x0 = clip(x0, -s, s) / s
    (linear-interpolated quantile over all of a sample's values, as torch.quantile). Only the
    taken branch of the cond runs, so with thresholding off it costs nothing.
    """
    def apply(x0):
        B = x0.shape[0]
        s = jnp.quantile(jnp.abs(x0.reshape(B, -1)), c["thr_ratio"], axis=1)  # [B]
        s = jnp.minimum(jnp.maximum(s, 1.0), c["thr_max"]).reshape((B,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s

    return jax.lax.cond(c["thr"] > 0, apply, lambda x0: x0, x0)


def require(cfg: ScheduleConfig, sampler: str, diffusers_class: str, *, prediction_types=None,
            sigmas=False, rescale=False, clip=False, threshold=False, custom=(),
            orders=(2,), consistency=(), churn=False) -> None:
    """Raises if `cfg` asks `sampler` for something its diffusers class does not have.

    diffusers itself would silently ignore most of these (its from_config drops keys the class
    does not know); jaxsd raises so that a config never means something it does not do.
    """
    where = f"sampler {sampler!r} (diffusers {diffusers_class})"
    valid = prediction_types or ("epsilon", "v_prediction", "sample")
    if cfg.prediction_type not in valid:
        raise ValueError(f"{where} does not support prediction_type={cfg.prediction_type!r}; "
                         f"it supports {list(valid)}")
    if not sigmas:
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if getattr(cfg, key):
                raise ValueError(f"{where} has no {key}; set {key}=False or use one of the "
                                 "samplers that offer it (euler, heun, lms, dpm2, dpm2_a, "
                                 "dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, dpmpp_sde, unipc, deis)")
    if cfg.rescale_betas_zero_snr and not rescale:
        raise ValueError(f"{where} has no rescale_betas_zero_snr; set it False or use ddim, ddpm, "
                         "euler, euler_a, dpmpp_2m, dpmpp_2m_sde, unipc, lcm or tcd")
    if cfg.clip_sample and not clip:
        raise ValueError(f"{where} has no clip_sample; set clip_sample=False")
    for key in ("timesteps", "sigmas"):
        if getattr(cfg, key) is not None:
            if key not in custom:
                takes = {"timesteps": "euler, heun, ddpm, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, lcm, tcd",
                         "sigmas": "euler"}[key]
                raise ValueError(f"{where} takes no explicit {key} list (its set_timesteps has no "
                                 f"{key}=); samplers that do: {takes}")
            for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                           "use_lu_lambdas"):
                if getattr(cfg, option, False):
                    raise ValueError(f"{where}: an explicit {key} list cannot be combined with "
                                     f"{option}=True (diffusers refuses it too)")
    order = 2 if cfg.solver_order is None else cfg.solver_order
    if order not in orders:  # only samplers without a solver_order get here (it is 1, 2 or 3)
        raise ValueError(f"{where} has no solver_order (got solver_order={order!r}; 2, the multistep "
                         "solvers' default, is accepted and means nothing here); the samplers with "
                         "solver_order 1, 2 and 3: dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, unipc, deis")
    if cfg.thresholding and not threshold:
        raise ValueError(f"{where} has no thresholding (dynamic thresholding); set thresholding=False "
                         "or use ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, unipc, deis or lcm")
    if not churn:
        for key, default in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", float("inf")), ("s_noise", 1.0)):
            if getattr(cfg, key) != default:
                raise ValueError(f"{where} has no {key} (Karras churn is an argument of "
                                 f"EulerDiscreteScheduler.step only); leave it at {default} or use 'euler'")
    for key, default, users in (("original_inference_steps", 50, "'lcm' or 'tcd'"),
                                ("timestep_scaling", 10.0, "'lcm'")):
        if key not in consistency and getattr(cfg, key) != default:
            raise ValueError(f"{where} has no {key}; leave it at {default} or use the sampler {users}")
