"""UniPC and DEIS: two more exponential-integrator multistep solvers (UniPC order 2, DEIS 1-3).

UniPC (Zhao et al. 2023, arXiv 2302.04867): a multistep predictor (UniP) plus a corrector (UniC)
that reuses the model output at the predicted point to refine it, at no extra evaluation.
DEIS (Zhang & Chen 2023, arXiv 2204.13902): an Adams-Bashforth method in eps with polynomial
extrapolation in rho = sigma/alpha ("logrho"). Both get the unscaled sample and an integer
timestep, like DPM-Solver; all coefficients are computed here in float64.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsd.sampling import schedule as S
from jaxsd.sampling.common import (Plan, dynamic_threshold, eps_coefficients, make_plan, require,
                                   threshold_consts, vp_alpha_sigma,
                                   x0_coefficients)
from jaxsd.sampling.dpm_solver import (MultistepState, dpm_timesteps_and_sigmas, init_multistep_state)


@struct.dataclass
class UniPCState:
    """State of UniPC-2 (bh2, data prediction)."""

    x: jnp.ndarray  # [B, H, W, C] current sample: the predictor's output (diffusers' `latents`)
    x_last: jnp.ndarray  # [B, H, W, C] the previous (corrected) sample, where the last step began
    m_prev: jnp.ndarray  # [B, H, W, C] x0 prediction of the previous evaluation
    m_prev2: jnp.ndarray  # [B, H, W, C] x0 prediction of the one before
    last_order: jnp.ndarray  # [] int32, order of the last predictor step (the corrector's order)
    count: jnp.ndarray  # [] int32, evaluations done (diffusers' lower_order_nums)


def init_unipc_state(x):
    z = jnp.zeros_like(x)
    zero = jnp.zeros((), jnp.int32)
    return UniPCState(x=x, x_last=x, m_prev=z, m_prev2=z, last_order=zero, count=zero)


def _uni_b(h, bh1):
    """UniPC's right-hand side b for order 2 (Zhao et al. 2023 Alg. 2 / diffusers' loop)."""
    hh = -h  # data prediction
    h_phi_1 = np.expm1(hh)
    B_h = hh if bh1 else np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b1 = h_phi_k / B_h
    b2 = (h_phi_k / hh - 1 / 2) * 2 / B_h
    return h_phi_1, B_h, b1, b2


def unipc_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """UniPCMultistepScheduler(solver_order=2, predict_x0=True, solver_type=bh2 or bh1)."""
    require(cfg, "unipc", "UniPCMultistepScheduler", sigmas=True, rescale=True, threshold=True)
    solver_type = cfg.solver_type or "bh2"
    S._check_choice("solver_type", solver_type, ("bh1", "bh2"))
    cfg_t = dataclasses.replace(cfg, lambda_min_clipped=-math.inf, use_lu_lambdas=False)
    t, s, _ = dpm_timesteps_and_sigmas(cfg_t, num_steps, spacing=cfg.timestep_spacing or "linspace",
                                       unipc=True)
    N = num_steps
    a, sv = vp_alpha_sigma(s)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(a) - np.log(sv)
        # shift(v, k)[i] = v[i - k] (NaN before the start), as a length-N array
        shift = lambda v, k: np.concatenate([np.full(k, np.nan), v])[:N]
        # Predictor, step i: s_i -> s_{i+1}. UniP-2 with rho = 1/2 (diffusers' fixed choice).
        h = lam[1:] - lam[:-1]
        h_phi_1, B_h, _, _ = _uni_b(h, solver_type == "bh1")
        rk = (shift(lam, 1) - lam[:-1]) / h  # (lambda_{i-1} - lambda_i) / h
        P_x = sv[1:] / sv[:-1]
        P_m = -a[1:] * h_phi_1  # order 1 (= DPM-Solver++(1) / DDIM)
        P_m_2 = P_m + a[1:] * B_h * 0.5 / rk  # order 2: - alpha B_h rho_p (m_{i-1} - m_i) / rk
        P_m1_2 = -a[1:] * B_h * 0.5 / rk
        # Corrector at evaluation i: redo s_{i-1} -> s_i with the model output at s_i (UniC).
        hc = lam[:-1] - shift(lam, 1)  # lambda_i - lambda_{i-1}
        ac = a[:-1]
        hc_phi_1, Bc_h, b1, b2 = _uni_b(hc, solver_type == "bh1")
        rkc = (shift(lam, 2) - shift(lam, 1)) / hc  # (lambda_{i-2} - lambda_{i-1}) / h
        # Order 2: solve [[1, 1], [rk, 1]] rho = [b1, b2]; order 1: rho_last = 1/2.
        rho0 = (b1 - b2) / (1 - rkc)
        rho1 = b1 - rho0
        C_x = sv[:-1] / shift(sv, 1)
        C_m_1 = -ac * Bc_h * 0.5
        C_m1_1 = -ac * hc_phi_1 + ac * Bc_h * 0.5
        C_m_2 = -ac * Bc_h * rho1
        C_m1_2 = -ac * hc_phi_1 + ac * Bc_h * (rho1 + rho0 / rkc)
        C_m2_2 = -ac * Bc_h * rho0 / rkc
    lof = True if cfg.lower_order_final is None else cfg.lower_order_final
    i = np.arange(N)
    cap = np.minimum(2, N - i) if lof else np.full(N, 2)
    corrector = ~np.isin(i - 1, np.asarray(cfg.disable_corrector, np.int64))
    clean = lambda v: np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, a[:-1], sv[:-1])
    consts = dict(x0_x=x0_x, x0_out=x0_out, cap=cap, corrector=corrector.astype(float),
                  **threshold_consts(cfg, N),
                  P_x=P_x, P_m=P_m, P_m_2=clean(np.where(cap == 2, P_m_2, 0)),
                  P_m1_2=clean(np.where(cap == 2, P_m1_2, 0)),
                  C_x=clean(C_x), C_m_1=clean(C_m_1), C_m1_1=clean(C_m1_1), C_m_2=clean(C_m_2),
                  C_m1_2=clean(C_m1_2), C_m2_2=clean(C_m2_2))
    return make_plan(t, np.ones(N), consts, a[:-1], sv[:-1], 1.0)


def unipc_step(state: UniPCState, model_output, c, noise) -> UniPCState:
    """UniC corrects the current sample with this evaluation, then UniP predicts the next one."""
    del noise
    x = state.x
    m = dynamic_threshold(c["x0_x"] * x + c["x0_out"] * model_output, c)  # x0 at the (uncorrected) sample
    # UniC (Zhao et al. 2023 eq. 8), skipped on the first evaluation and where disabled.
    two = state.last_order == 2
    x_c = (c["C_x"] * state.x_last + jnp.where(two, c["C_m_2"], c["C_m_1"]) * m
           + jnp.where(two, c["C_m1_2"], c["C_m1_1"]) * state.m_prev
           + jnp.where(two, c["C_m2_2"], 0.0) * state.m_prev2)
    x = jnp.where((state.count >= 1) & (c["corrector"] == 1), x_c, x)
    # UniP (eq. 6): order min(2, steps left, evaluations so far + 1).
    order = jnp.minimum(c["cap"].astype(jnp.int32), state.count + 1)
    p2 = order == 2
    x_next = (c["P_x"] * x + jnp.where(p2, c["P_m_2"], c["P_m"]) * m
              + jnp.where(p2, c["P_m1_2"], 0.0) * state.m_prev)
    return UniPCState(x=x_next, x_last=x, m_prev=m, m_prev2=state.m_prev, last_order=order,
                      count=state.count + 1)


# --- DEIS ---------------------------------------------------------------------------------------


def deis_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DEISMultistepScheduler("logrho", solver_order 1, 2 or 3). Its last sigma is sigma_min, not
    0 (as in diffusers): the result keeps the noise of the smallest training timestep."""
    require(cfg, "deis", "DEISMultistepScheduler", sigmas=True, threshold=True, orders=(1, 2, 3))
    cfg_t = dataclasses.replace(cfg, lambda_min_clipped=-math.inf, use_lu_lambdas=False,
                                final_sigmas_type="sigma_min")
    t, s, _ = dpm_timesteps_and_sigmas(cfg_t, num_steps, spacing=cfg.timestep_spacing or "linspace",
                                       unipc=True)
    N = num_steps
    a, sv = vp_alpha_sigma(s)
    nan = np.full(1, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.log(a[1:] / sv[1:]) - np.log(a[:-1] / sv[:-1])
        # First order (= DDIM): x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps
        A1, B1 = a[1:] / a[:-1], -sv[1:] * np.expm1(h)
        # Orders 2 and 3, Zhang & Chen 2023 eq. 14 with Lagrange extrapolation of eps in
        # rho = sigma/alpha: x_t = alpha_t (x / alpha_s0 + sum_j c_j eps_j), c_j = the integral
        # of the j-th Lagrange basis polynomial (in log rho) over [rho_s0, rho_t].
        rho = sv / a
        r_t, r0 = rho[1:], rho[:-1]
        r1, r2 = np.concatenate([nan, rho[:-2]]), np.concatenate([nan, nan, rho[:-3]])[:N]
        L = np.log
        ind2 = lambda t_, b, c: t_ * (-L(c) + L(t_) - 1) / (L(b) - L(c))
        c1 = ind2(r_t, r0, r1) - ind2(r0, r0, r1)
        c2 = ind2(r_t, r1, r0) - ind2(r0, r1, r0)

        def ind3(t_, b, c, d):  # diffusers' ind_fn of multistep_deis_third_order_update
            return (t_ * (L(c) * (L(d) - L(t_) + 1) - L(d) * L(t_) + L(d) + L(t_) ** 2 - 2 * L(t_) + 2)
                    / ((L(b) - L(c)) * (L(b) - L(d))))
        d1 = ind3(r_t, r0, r1, r2) - ind3(r0, r0, r1, r2)
        d2 = ind3(r_t, r1, r2, r0) - ind3(r0, r1, r2, r0)
        d3 = ind3(r_t, r2, r0, r1) - ind3(r0, r2, r0, r1)
    order = 2 if cfg.solver_order is None else cfg.solver_order
    lof = (True if cfg.lower_order_final is None else cfg.lower_order_final) and N < 15
    i = np.arange(N)
    # the highest order evaluation i may use; the step lowers it while history is short
    cap = np.full(N, order)
    if lof:
        cap[N - 2:] = np.minimum(cap[N - 2:], [2, 1][-min(N, 2):])
    eps_x, eps_out = _deis_eps(cfg.prediction_type, a[:-1], sv[:-1])
    # x0 = (p x + q output) / r, in diffusers' order of operations: with thresholding, eps is
    # recovered from x0 by a subtraction that cancels, which would amplify other roundings.
    one, zero = np.ones(N), np.zeros(N)
    p, q, r = {"epsilon": (one, -sv[:-1], a[:-1]), "v_prediction": (a[:-1], -sv[:-1], one),
               "sample": (zero, one, one)}[cfg.prediction_type]
    clean = lambda v, k: np.where(cap >= k, np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    consts = dict(eps_x=eps_x, eps_out=eps_out, cap=cap, A1=A1, B1=B1,
                  x0_p=p, x0_q=q, x0_r=r, alpha=a[:-1], sigma=sv[:-1], **threshold_consts(cfg, N),
                  A2=clean(a[1:] / a[:-1], 2), B0_2=clean(a[1:] * c1, 2), B1_2=clean(a[1:] * c2, 2),
                  B0_3=clean(a[1:] * d1, 3), B1_3=clean(a[1:] * d2, 3), B2_3=clean(a[1:] * d3, 3))
    del i
    return make_plan(t, np.ones(N), consts, a[:-1], sv[:-1], 1.0)


def _deis_eps(prediction_type, alpha, sigma):
    # diffusers' DEIS converts every output to x0 and back: eps = (x - alpha x0) / sigma.
    if prediction_type == "sample":
        x0_x, x0_out = x0_coefficients(prediction_type, alpha, sigma)
        return (1 - alpha * x0_x) / sigma, -alpha * x0_out / sigma
    return eps_coefficients(prediction_type, alpha, sigma)


def deis_step(state: MultistepState, model_output, c, noise) -> MultistepState:
    """DEIS of order min(cap, evaluations so far + 1): first order without history and, for
    < 15 steps, on the last evaluation (second order on the one before)."""
    del noise
    x = state.x
    e = jax.lax.cond(  # eps_theta(x_t, t); thresholded: from the thresholded x0, as diffusers
        c["thr"] > 0,
        lambda: (x - c["alpha"] * dynamic_threshold((c["x0_p"] * x + c["x0_q"] * model_output) / c["x0_r"], c))
        / c["sigma"],
        lambda: c["eps_x"] * x + c["eps_out"] * model_output)
    order = jnp.minimum(c["cap"].astype(jnp.int32), state.count + 1)
    first = c["A1"] * x + c["B1"] * e
    second = c["A2"] * x + c["B0_2"] * e + c["B1_2"] * state.m_prev
    third = c["A2"] * x + c["B0_3"] * e + c["B1_3"] * state.m_prev + c["B2_3"] * state.m_prev2
    x_new = jnp.where(order == 1, first, jnp.where(order == 2, second, third))
    return MultistepState(x=x_new, m_prev=e, m_prev2=state.m_prev, anchor=x, count=state.count + 1)


init_deis_state = init_multistep_state
