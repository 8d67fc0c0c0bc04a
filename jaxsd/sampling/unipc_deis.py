"""UniPC and DEIS: two more exponential-integrator multistep solvers, orders 1-3.

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
    """State of UniPC (bh1/bh2, data prediction, order 1-3)."""

    x: jnp.ndarray  # [B, H, W, C] current sample: the predictor's output (diffusers' `latents`)
    x_last: jnp.ndarray  # [B, H, W, C] the previous (corrected) sample, where the last step began
    m_prev: jnp.ndarray  # [B, H, W, C] x0 prediction of the previous evaluation
    m_prev2: jnp.ndarray  # [B, H, W, C] x0 prediction of the one before
    m_prev3: jnp.ndarray  # [B, H, W, C] and the one before that (the order-3 corrector)
    last_order: jnp.ndarray  # [] int32, order of the last predictor step (the corrector's order)
    count: jnp.ndarray  # [] int32, evaluations done (diffusers' lower_order_nums)


def init_unipc_state(x):
    z = jnp.zeros_like(x)
    one = jnp.ones((), jnp.int32)
    return UniPCState(x=x, x_last=x, m_prev=z, m_prev2=z, m_prev3=z, last_order=one,
                      count=jnp.zeros((), jnp.int32))


def _uni_b(h, bh1, order):
    """UniPC's h phi_1, B(h) and right-hand side b_1..b_order (Zhao et al. 2023 Alg. 2; the loop
    of diffusers' multistep_uni_p_bh_update), for data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    B_h = hh if bh1 else np.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, B_h, b


def _uni_rhos(rks, b, corrector):
    """rho solving sum_k rho_k rk_k^(j-1) = b_j (predictor: the first order - 1 rows; corrector:
    with rk = 1 for the new output, all rows), with diffusers' fixed 1/2 at the lowest order."""
    q = len(rks)
    if corrector:
        if q == 0:
            return np.array([0.5])
        R = np.array([[r ** j for r in list(rks) + [1.0]] for j in range(q + 1)])
        return np.linalg.solve(R, np.array(b[:q + 1]))
    if q == 1:
        return np.array([0.5])
    R = np.array([[r ** j for r in rks] for j in range(q)])
    return np.linalg.solve(R, np.array(b[:q]))


def unipc_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """UniPCMultistepScheduler(predict_x0=True, solver_type bh2 or bh1, solver_order 1, 2 or 3).

    For every evaluation and every order it may run at, the predictor's coefficients on
    (m, m_prev, m_prev2) and the corrector's on (m, m_prev, m_prev2, m_prev3) (m: the x0
    predictions, newest first); the step picks the row of the order it reaches.
    """
    require(cfg, "unipc", "UniPCMultistepScheduler", sigmas=True, rescale=True, threshold=True,
            orders=(1, 2, 3))
    bh1 = S.solver_type_for(cfg, "unipc") == "bh1"
    cfg_t = dataclasses.replace(cfg, lambda_min_clipped=-math.inf, use_lu_lambdas=False)
    t, s, _ = dpm_timesteps_and_sigmas(cfg_t, num_steps, spacing=cfg.timestep_spacing or "linspace",
                                       unipc=True)
    N, order = num_steps, (2 if cfg.solver_order is None else cfg.solver_order)
    a, sv = vp_alpha_sigma(s)
    P, C = np.zeros((N, 3, 3)), np.zeros((N, 3, 4))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.log(a) - np.log(sv)
        for i in range(N):
            # UniP (Zhao et al. 2023 eq. 6), step i: s_i -> s_{i+1}, with m_{i-j} at rk_j.
            h = lam[i + 1] - lam[i]
            h_phi_1, B_h, b = _uni_b(h, bh1, 3)
            for p in range(1, min(order, i + 1) + 1):
                rks = [(lam[i - j] - lam[i]) / h for j in range(1, p)]
                P[i, p - 1, 0] = -a[i + 1] * h_phi_1
                # A step to sigma = 0 (h = inf) above order 1 makes diffusers' rk = 0 and its
                # result NaN (with lower_order_final=False): the first-order update here.
                if p > 1 and np.isfinite(h):
                    rho = _uni_rhos(rks, b, corrector=False)
                    for j in range(1, p):  # - alpha B_h rho_j (m_{i-j} - m_i) / rk_j
                        P[i, p - 1, j] = -a[i + 1] * B_h * rho[j - 1] / rks[j - 1]
                        P[i, p - 1, 0] += a[i + 1] * B_h * rho[j - 1] / rks[j - 1]
            if i == 0:
                continue
            # UniC (eq. 8) at evaluation i: redo s_{i-1} -> s_i with the new output m_i.
            h = lam[i] - lam[i - 1]
            h_phi_1, B_h, b = _uni_b(h, bh1, 3)
            for q in range(1, min(order, i) + 1):
                rks = [(lam[i - 1 - j] - lam[i - 1]) / h for j in range(1, q)]
                rho = _uni_rhos(rks, b, corrector=True)
                C[i, q - 1, 0] = -a[i] * B_h * rho[-1]  # the new output m_i
                C[i, q - 1, 1] = -a[i] * h_phi_1 + a[i] * B_h * rho[-1]  # m_{i-1}
                for j in range(1, q):
                    C[i, q - 1, j + 1] = -a[i] * B_h * rho[j - 1] / rks[j - 1]
                    C[i, q - 1, 1] += a[i] * B_h * rho[j - 1] / rks[j - 1]
        P_x = sv[1:] / sv[:-1]
        C_x = np.concatenate([[0.0], sv[1:-1] / sv[:-2]])
    lof = True if cfg.lower_order_final is None else cfg.lower_order_final
    i = np.arange(N)
    cap = np.minimum(order, N - i) if lof else np.full(N, order)
    corrector = ~np.isin(i - 1, np.asarray(cfg.disable_corrector, np.int64))
    clean = lambda v: np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, a[:-1], sv[:-1])
    consts = dict(x0_x=x0_x, x0_out=x0_out, cap=cap, corrector=corrector.astype(float),
                  **threshold_consts(cfg, N), P_x=clean(P_x), P=clean(P), C_x=clean(C_x), C=clean(C))
    return make_plan(t, np.ones(N), consts, a[:-1], sv[:-1], 1.0)


def unipc_step(state: UniPCState, model_output, c, noise) -> UniPCState:
    """UniC corrects the current sample with this evaluation, then UniP predicts the next one."""
    del noise
    x = state.x
    m = dynamic_threshold(c["x0_x"] * x + c["x0_out"] * model_output, c)  # x0 at the (uncorrected) sample
    # UniC (Zhao et al. 2023 eq. 8) of the last step's order, skipped on the first evaluation
    # and where disabled.
    k = c["C"][state.last_order - 1]  # [4]
    x_c = (c["C_x"] * state.x_last + k[0] * m + k[1] * state.m_prev + k[2] * state.m_prev2
           + k[3] * state.m_prev3)
    x = jnp.where((state.count >= 1) & (c["corrector"] == 1), x_c, x)
    # UniP (eq. 6): order min(solver_order, steps left, evaluations so far + 1).
    order = jnp.minimum(c["cap"].astype(jnp.int32), state.count + 1)
    k = c["P"][order - 1]  # [3]
    x_next = c["P_x"] * x + k[0] * m + k[1] * state.m_prev + k[2] * state.m_prev2
    return UniPCState(x=x_next, x_last=x, m_prev=m, m_prev2=state.m_prev, m_prev3=state.m_prev2,
                      last_order=order, count=state.count + 1)


# --- DEIS ---------------------------------------------------------------------------------------


def deis_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DEISMultistepScheduler("logrho", solver_order 1, 2 or 3). Its last sigma is sigma_min, not
    0 (as in diffusers): the result keeps the noise of the smallest training timestep."""
    require(cfg, "deis", "DEISMultistepScheduler", sigmas=True, threshold=True, orders=(1, 2, 3))
    S.solver_type_for(cfg, "deis")  # logrho, the only one (another family's value becomes it)
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
