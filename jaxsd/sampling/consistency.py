"""LCM and TCD: samplers for consistency-distilled models (LCM, LCM-LoRA, TCD-LoRA; 1-8 steps).

Both visit a few of the timesteps the model was distilled on, N_orig = original_inference_steps
of them (k = T // N_orig apart): t in {k - 1, 2k - 1, ..., N_orig k - 1}, of which N evenly
spaced indices are taken, from the top. At each, the model's output gives x0 as usual; then

    LCM (Luo et al. 2023, eq. 9 and Alg. 1):   denoised = c_skip(t) x_t + c_out(t) x0,
        x_{t'} = sqrt(a_{t'}) denoised + sqrt(1 - a_{t'}) z     (z fresh noise; none at the end)
    TCD (Zheng et al. 2024, eq. 8-9), gamma in [0, 1]:  s = floor((1 - gamma) t'),
        x_s   = sqrt(a_s) x0 + sqrt(1 - a_s) eps                 (a DDIM step to s <= t')
        x_{t'} = sqrt(a_{t'} / a_s) x_s + sqrt(1 - a_{t'} / a_s) z   (re-noise back to t')

a_t is alpha_bar_t. gamma = 0 makes TCD a deterministic DDIM on LCM's timesteps. diffusers passes
gamma to TCDScheduler.step as `eta` (pipelines pass their own `eta`, 0 by default), and so does
jaxsd: `sample(..., eta=gamma)`, traced.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxsd.sampling import schedule as S
from jaxsd.sampling.common import (Plan, dynamic_threshold, eps_coefficients, make_plan, require,
                                   threshold_consts, x0_coefficients)
from jaxsd.sampling.ddpm_family import LatentState

SIGMA_DATA = 0.5  # LCM's boundary-condition constant (Song et al. 2023, consistency models)


def consistency_timesteps(cfg: S.ScheduleConfig, num_steps: int, sampler: str) -> np.ndarray:
    """LCM/TCD's N timesteps, descending (diffusers' LCMScheduler.set_timesteps, strength 1)."""
    T, n_orig = cfg.num_train_timesteps, cfg.original_inference_steps
    if cfg.timesteps is not None:
        return np.asarray(cfg.timesteps).astype(np.int64)
    if n_orig > T:
        raise ValueError(f"sampler {sampler!r}: original_inference_steps={n_orig} exceeds "
                         f"num_train_timesteps={T}")
    if num_steps > n_orig:
        raise ValueError(f"sampler {sampler!r} takes at most original_inference_steps={n_orig} steps "
                         f"(its timesteps are a subset of those the model was distilled on); "
                         f"got num_steps={num_steps}")
    k = T // n_orig
    origin = (np.arange(1, n_orig + 1) * k - 1)[::-1]  # the distillation timesteps, descending
    index = np.floor(np.linspace(0, n_orig, num=num_steps, endpoint=False)).astype(np.int64)
    return origin[index]


def _plan_start(cfg, num_steps, sampler, diffusers_class):
    # TCDScheduler has thresholding / clip_sample / timestep_scaling config keys but its step
    # never reads them: refused for tcd rather than silently ignored.
    lcm = sampler == "lcm"
    require(cfg, sampler, diffusers_class, rescale=True, clip=lcm, threshold=lcm,
            custom=("timesteps",),
            consistency=("original_inference_steps",) + (("timestep_scaling",) if lcm else ()))
    t = consistency_timesteps(cfg, num_steps, sampler)
    ab = S.alphas_cumprod(cfg)
    a_t = ab[t]
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    clip = bool(cfg.clip_sample) and not cfg.thresholding  # LCM/TCD: clip_sample False by default
    common = dict(x0_x=x0_x, x0_out=x0_out, **threshold_consts(cfg, len(t)),
                  clip=np.full(len(t), cfg.clip_sample_range if clip else np.inf))
    return t, ab, a_t, common


# --- LCM -------------------------------------------------------------------------------------


def lcm_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """LCMScheduler: consistency function at t, then re-noise to the next timestep."""
    t, ab, a_t, consts = _plan_start(cfg, num_steps, "lcm", "LCMScheduler")
    # c_skip(t) = sd^2 / ((st)^2 + sd^2), c_out(t) = st / sqrt((st)^2 + sd^2), s = timestep_scaling
    # (float32, as diffusers multiplies the integer timestep tensor by the Python float).
    st = (t.astype(np.float32) * np.float32(cfg.timestep_scaling)).astype(np.float64)
    last = np.arange(len(t)) == len(t) - 1
    a_prev = np.where(last, 1.0, ab[np.append(t[1:], 0)])  # the last step returns `denoised`
    consts.update(c_skip=SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2),
                  c_out=st / np.sqrt(st**2 + SIGMA_DATA**2), a_prev=a_prev)
    return make_plan(t, np.ones(len(t)), consts, np.sqrt(a_t), np.sqrt(1 - a_t), 1.0)


def lcm_step(state: LatentState, model_output, c, noise) -> LatentState:
    """Luo et al. 2023 Alg. 1 (multistep consistency sampling), one step."""
    x = state.x
    x0 = jnp.clip(c["x0_x"] * x + c["x0_out"] * model_output, -c["clip"], c["clip"])
    x0 = dynamic_threshold(x0, c)
    denoised = c["c_out"] * x0 + c["c_skip"] * x  # f(x_t, t), the consistency function
    x = jnp.sqrt(c["a_prev"]) * denoised + jnp.sqrt(1 - c["a_prev"]) * noise
    return LatentState(x=x)


# --- TCD -------------------------------------------------------------------------------------


def tcd_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """TCDScheduler: a DDIM step to s = floor((1 - gamma) t'), then re-noise from s to t'.

    s depends on the traced gamma, so each evaluation carries the whole alpha_bar table [E, T]
    (4 kB per step for T = 1000) and the step looks a_s up in it.
    """
    t, ab, a_t, consts = _plan_start(cfg, num_steps, "tcd", "TCDScheduler")
    E = len(t)
    t_prev = np.append(t[1:], 0)  # diffusers: the next timestep, 0 after the last
    eps_x, eps_out = eps_coefficients(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    consts.update(eps_x=eps_x, eps_out=eps_out, t_prev=t_prev.astype(np.float64),
                  a_prev=ab[t_prev], last=(np.arange(E) == E - 1).astype(np.float64),
                  table=np.broadcast_to(ab, (E, len(ab))))
    return make_plan(t, np.ones(E), consts, np.sqrt(a_t), np.sqrt(1 - a_t), 1.0)


def tcd_step(state: LatentState, model_output, c, noise) -> LatentState:
    """Zheng et al. 2024 (Trajectory Consistency Distillation) Alg. 4, one step; gamma = c["eta"]."""
    x, gamma = state.x, c["eta"]
    x0 = c["x0_x"] * x + c["x0_out"] * model_output  # no clipping or thresholding in TCD
    eps = c["eps_x"] * x + c["eps_out"] * model_output
    s = jnp.floor((1 - gamma) * c["t_prev"]).astype(jnp.int32)  # diffusers: float32, floored
    a_s = c["table"][jnp.clip(s, 0, c["table"].shape[0] - 1)]
    x_s = jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps  # pred_noised_sample
    renoise = (gamma > 0) & (c["last"] == 0)
    x_prev = jnp.sqrt(c["a_prev"] / a_s) * x_s + jnp.sqrt(1 - c["a_prev"] / a_s) * noise
    return LatentState(x=jnp.where(renoise, x_prev, x_s))
