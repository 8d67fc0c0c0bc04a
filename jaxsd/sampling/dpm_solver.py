"""DPM-Solver++ samplers: 2M, 2M SDE, 2S (singlestep) and diffusers' DPMSolverSDE ("DPM++ SDE").

DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095) solves the diffusion ODE in data prediction
x0_theta and half-log-SNR lambda = log(alpha_t / sigma_t) exactly for the linear part:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_theta(x_s, s),  h = lambda_t - lambda_s
(first order = DDIM), plus a correction from a second model output for order 2. The UNet gets
the unscaled sample and an integer timestep; (alpha_t, sigma_t) are the VP ones of Karras' sigma.
All step coefficients are computed here in float64; the step is a linear combination.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsd.sampling import schedule as S
from jaxsd.sampling.common import (Plan, dynamic_threshold, k_x0_coefficients, make_plan, require,
                                   threshold_consts, vp_alpha_sigma, x0_coefficients)
from jaxsd.sampling.k_diffusion import KState, _interleave, _k_sigmas


@struct.dataclass
class MultistepState:
    """State of a multistep solver (DPM-Solver++ 2M / 3M, 2S, DEIS)."""

    x: jnp.ndarray  # [B, H, W, C] current sample x_{t_i} (diffusers' `latents`)
    m_prev: jnp.ndarray  # [B, H, W, C] the previous evaluation's x0 prediction
    m_prev2: jnp.ndarray  # [B, H, W, C] the one before (third order only)
    anchor: jnp.ndarray  # [B, H, W, C] 2S: the sample a second-order step starts from
    count: jnp.ndarray  # [] int32, evaluations done (diffusers' lower_order_nums)


def init_multistep_state(x):
    z = jnp.zeros_like(x)
    return MultistepState(x=x, m_prev=z, m_prev2=z, anchor=x, count=jnp.zeros((), jnp.int32))


def dpm_timesteps_and_sigmas(cfg, num_steps, *, spacing, singlestep=False, unipc=False):
    """Timesteps [N] (integers) and sigmas [N + 1] as DPMSolver{Multi,Single}stepScheduler set them.

    `unipc`: UniPC/DEIS variant (a "sigma_min" final sigma that repeats the last custom sigma,
    and their own rounding of custom timesteps)."""
    T = cfg.num_train_timesteps
    sig_train = S.train_sigmas(cfg)
    lambdas = -np.log(sig_train)  # log(alpha/sigma_vp) = -log(Karras sigma)
    clipped = int(np.searchsorted(lambdas[::-1], cfg.lambda_min_clipped))
    last = T - clipped
    N = num_steps
    if singlestep or spacing == "linspace":
        t = np.linspace(0, last - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(N + 1) * (last // (N + 1))).round()[::-1][:-1] + cfg.steps_offset
    else:  # trailing
        t = np.arange(last, 0, -T / N).round() - 1
    if cfg.timesteps is not None:  # explicit timesteps (Karras & co. are refused with them)
        t = np.asarray(cfg.timesteps).astype(np.int64)
    rounds = cfg.beta_schedule != "squaredcos_cap_v2" or singlestep or unipc
    custom = S.convert_sigmas(cfg, sig_train[::-1], N)
    if not singlestep and cfg.use_lu_lambdas:
        # Lu et al. 2022b: steps uniform in log sigma (diffusers' "lu lambdas", rho = 1).
        custom = np.exp(np.linspace(np.log(sig_train[-1]), np.log(sig_train[0]), N))
    if custom is not None:
        t = S.sigma_to_t(custom, sig_train)
        # Karras and Lu timesteps are rounded; the others truncated by the int64 cast.
        t = t.round() if (cfg.use_karras_sigmas or cfg.use_lu_lambdas) and rounds else np.trunc(t)
        sigmas = custom
    else:
        sigmas = S.interp_sigmas(t, sig_train)
    final = cfg.final_sigmas_type or "zero"
    S._check_choice("final_sigmas_type", final, ("zero", "sigma_min"))
    sigma_last = sig_train[0] if (custom is None or not unipc) else custom[-1]
    sigmas = np.append(sigmas, sigma_last if final == "sigma_min" else 0.0)
    return t.astype(np.int64), sigmas.astype(np.float32).astype(np.float64), final


def _lambda(sigma):
    alpha, sigma_vp = vp_alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return alpha, sigma_vp, np.log(alpha) - np.log(sigma_vp)


def _dpm_check(cfg, name, orders=(2,)):
    require(cfg, name, "DPMSolverMultistepScheduler" if name != "dpmpp_2s" else
            "DPMSolverSinglestepScheduler", sigmas=True, rescale=name != "dpmpp_2s",
            threshold=True, custom=("timesteps",), orders=orders)
    if S.solver_type_for(cfg, "dpm") != "midpoint":
        raise ValueError(f"sampler {name!r} implements solver_type='midpoint' only; "
                         f"got {cfg.solver_type!r}")


def _multistep_plan(cfg, num_steps, name, sde):
    """DPMSolverMultistepScheduler with the config's solver_order: 1, 2 (the default) or 3 (3M)."""
    _dpm_check(cfg, name, orders=(1, 2, 3))
    order = 2 if cfg.solver_order is None else cfg.solver_order
    t, s, final = dpm_timesteps_and_sigmas(cfg, num_steps, spacing=cfg.timestep_spacing or "linspace")
    N = num_steps
    a, sv, lam = _lambda(s)  # [N + 1]
    i = np.arange(N)
    prev = lambda v, k: np.concatenate([np.full(k, np.nan), v])[:len(v)]  # v[i - k]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[1:] - lam[:-1]
        r0 = (lam[:-1] - prev(lam[:-1], 1)) / h  # h_{i-1} / h_i
        r1 = (prev(lam[:-1], 1) - prev(lam[:-1], 2)) / h  # h_{i-2} / h_i
        if not sde:  # DPM-Solver++, Lu et al. 2022b Alg. 2 (and its third-order extension)
            A = sv[1:] / sv[:-1]
            B = -a[1:] * np.expm1(-h)  # c0: the first-order (DDIM) weight of D0 = m0
            c1 = a[1:] * (np.expm1(-h) / h + 1)  # weight of the first difference D1
            c2 = -a[1:] * ((np.expm1(-h) + h) / h**2 - 0.5)  # weight of the second, D2
            C = np.zeros(N)
        else:  # SDE-DPM-Solver++, Lu et al. 2022b eq. (18) / Appendix
            A = sv[1:] / sv[:-1] * np.exp(-h)
            B = a[1:] * (1 - np.exp(-2 * h))
            c1 = a[1:] * ((1 - np.exp(-2 * h)) / (-2 * h) + 1)
            c2 = a[1:] * ((1 - np.exp(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5)
            C = sv[1:] * np.sqrt(1 - np.exp(-2 * h))
        # second order (diffusers' "midpoint"): D1 = (m0 - m1) / r0, x_t = A x + B (D0 + D1 / 2)
        B0_2, B1_2 = B * (1 + 0.5 / r0), -B * 0.5 / r0
        # third order: D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),
        # D2 = (D1_0 - D1_1)/(r0+r1); x_t = A x + B m0 + c1 D1 + c2 D2, expanded in m0, m1, m2.
        P = c1 * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)  # weight of D1_0
        Q = -(c1 * r0 + c2) / (r0 + r1)  # weight of D1_1
        B0_3, B1_3, B2_3 = B + P / r0, -P / r0 + Q / r1, -Q / r1
    lof = True if cfg.lower_order_final is None else cfg.lower_order_final
    last_first_order = cfg.euler_at_final or (lof and N < 15) or final == "zero"
    # diffusers' order at step i, before the warm-up (count) caps it again inside the scan.
    cap = np.full(N, order)
    cap[(i == N - 2) & lof & (N < 15)] = np.minimum(order, 2)  # lower_order_second
    cap[(i == N - 1) & last_first_order] = 1
    cap = np.minimum(cap, i + 1)
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, a[:-1], sv[:-1])
    keep = lambda v, k: np.where(cap >= k, v, 0.0)
    consts = dict(x0_x=x0_x, x0_out=x0_out, A=A, B=B, C=C, cap=cap.astype(float),
                  **threshold_consts(cfg, N),
                  B0_2=keep(B0_2, 2), B1_2=keep(B1_2, 2),
                  B0_3=keep(B0_3, 3), B1_3=keep(B1_3, 3), B2_3=keep(B2_3, 3))
    return make_plan(t, np.ones(N), consts, a[:-1], sv[:-1], 1.0)


def dpmpp_2m_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"); solver_order=3 makes it 3M."""
    return _multistep_plan(cfg, num_steps, "dpmpp_2m", sde=False)


def dpmpp_2m_sde_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), the config's solver_order."""
    return _multistep_plan(cfg, num_steps, "dpmpp_2m_sde", sde=True)


def dpm_multistep_step(state: MultistepState, model_output, c, noise) -> MultistepState:
    """DPM-Solver++(2M / 3M): order min(plan's cap, evaluations so far + 1), as diffusers'
    lower_order_nums warm-up (so img2img starting mid-schedule warms up again)."""
    x = state.x
    m = dynamic_threshold(c["x0_x"] * x + c["x0_out"] * model_output, c)  # x0_theta(x_t, t)
    order = jnp.minimum(c["cap"].astype(jnp.int32), state.count + 1)
    b0 = jnp.where(order == 3, c["B0_3"], jnp.where(order == 2, c["B0_2"], c["B"]))
    b1 = jnp.where(order == 3, c["B1_3"], jnp.where(order == 2, c["B1_2"], 0.0))
    b2 = jnp.where(order == 3, c["B2_3"], 0.0)
    x_new = c["A"] * x + b0 * m + b1 * state.m_prev + b2 * state.m_prev2
    if noise is not None:
        x_new = x_new + c["C"] * noise
    return MultistepState(x=x_new, m_prev=m, m_prev2=state.m_prev, anchor=x, count=state.count + 1)


# --- DPM-Solver++(2S), singlestep --------------------------------------------------------------


def singlestep_orders(num_steps: int, order: int, lower_order_final: bool, final_zero: bool) -> np.ndarray:
    """diffusers' get_order_list: groups (1, 2) or (1, 2, 3), lower orders at the end."""
    N = num_steps
    # diffusers switches lower_order_final on when N is not a multiple of the order, and for
    # final_sigmas_type="zero".
    if lower_order_final or N % order or final_zero:
        if order == 3:
            tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[N % 3]
            orders = [1, 2, 3] * (N // 3 - (N % 3 == 0)) + tail
        elif order == 2:
            orders = [1, 2] * (N // 2 - 1) + [1, 1] if N % 2 == 0 else [1, 2] * (N // 2) + [1]
        else:
            orders = [1] * N
    else:
        orders = {1: [1], 2: [1, 2], 3: [1, 2, 3]}[order] * (N // order)
    if final_zero:
        orders[-1] = 1
    return np.array(orders)


def dpmpp_2s_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DPMSolverSinglestepScheduler(solver_order 1, 2 or 3, dpmsolver++, midpoint). It has no
    timestep_spacing nor steps_offset: like diffusers, it ignores them and always uses linspace."""
    _dpm_check(cfg, "dpmpp_2s", orders=(1, 2, 3))
    t, s, final = dpm_timesteps_and_sigmas(cfg, num_steps, spacing="linspace", singlestep=True)
    N = num_steps
    a, sv, lam = _lambda(s)
    orders = singlestep_orders(N, 2 if cfg.solver_order is None else cfg.solver_order,
                               bool(cfg.lower_order_final), final == "zero")
    back = lambda v, k: np.concatenate([np.full(k, np.nan), v])[:len(v)]  # v[i - k]
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = lam[1:] - lam[:-1]  # order 1: from s_i to s_{i+1}
        A1, B1 = sv[1:] / sv[:-1], -a[1:] * (np.exp(-h1) - 1)
        # order 2 (Lu et al. 2022b Alg. 1, DPM-Solver++(2S) with the intermediate point at the
        # previous grid point s_{i-1} -> s_i): h = lambda_{i+1} - lambda_{i-1}, r0 = h_0 / h,
        # x = (sigma_t/sigma_{s1}) x_{s1} - alpha_t (e^{-h}-1) (m1 + (m0 - m1) / (2 r0))
        s1, lam1 = back(sv[:-1], 1), back(lam[:-1], 1)
        h2 = lam[1:] - lam1
        r0 = (lam[:-1] - lam1) / h2
        E = -a[1:] * (np.exp(-h2) - 1)
        A2, Bm0_2, Bm1_2 = sv[1:] / s1, E * 0.5 / r0, E * (1 - 0.5 / r0)
        # order 3 (DPM-Solver-3 in its midpoint form, diffusers' singlestep third-order update):
        # from x at s_{i-2}, h = lambda_{i+1} - lambda_{i-2}, r0 = (lambda_i - lambda_{i-2}) / h,
        # x = (sigma_t/sigma_{s2}) x_{s2} - alpha_t (e^{-h}-1) m2 + alpha_t ((e^{-h}-1)/h + 1) (m0 - m2) / r0
        s2, lam2 = back(sv[:-1], 2), back(lam[:-1], 2)
        h3 = lam[1:] - lam2
        r0_3 = (lam[:-1] - lam2) / h3
        F = a[1:] * (np.expm1(-h3) / h3 + 1) / r0_3
        A3, Bm0_3, Bm2_3 = sv[1:] / s2, F, -a[1:] * np.expm1(-h3) - F
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, a[:-1], sv[:-1])
    only = lambda v, k: np.where(orders == k, np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    consts = dict(x0_x=x0_x, x0_out=x0_out, cap=orders, A1=A1, B1=B1, **threshold_consts(cfg, N),
                  A2=only(A2, 2), Bm0_2=only(Bm0_2, 2), Bm1_2=only(Bm1_2, 2),
                  A3=only(A3, 3), Bm0_3=only(Bm0_3, 3), Bm2_3=only(Bm2_3, 3))
    return make_plan(t, np.ones(N), consts, a[:-1], sv[:-1], 1.0)


def dpm_singlestep_step(state: MultistepState, model_output, c, noise) -> MultistepState:
    """A first-order step stores its start as the anchor; a second- or third-order one restarts
    from it (diffusers lowers the order while too few outputs exist, e.g. after img2img's start)."""
    del noise
    x = state.x
    m = dynamic_threshold(c["x0_x"] * x + c["x0_out"] * model_output, c)
    order = jnp.minimum(c["cap"].astype(jnp.int32), state.count + 1)
    anchor = jnp.where(order == 1, x, state.anchor)
    first = c["A1"] * anchor + c["B1"] * m
    second = c["A2"] * anchor + c["Bm0_2"] * m + c["Bm1_2"] * state.m_prev
    third = c["A3"] * anchor + c["Bm0_3"] * m + c["Bm2_3"] * state.m_prev2
    x_new = jnp.where(order == 1, first, jnp.where(order == 2, second, third))
    return MultistepState(x=x_new, m_prev=m, m_prev2=state.m_prev, anchor=anchor, count=state.count + 1)


# --- DPMSolverSDEScheduler ("DPM++ SDE") ------------------------------------------------------


def dpmpp_sde_plan(cfg: S.ScheduleConfig, num_steps: int) -> Plan:
    """DPMSolverSDEScheduler: k-diffusion's sample_dpmpp_sde (Lu et al. 2022b, ancestral,
    midpoint r = 1/2) as diffusers implements it: the second stage uses only the midpoint's x0.

    diffusers draws the noise from a Brownian tree (torchsde); jaxsd draws independent Gaussian
    noise per evaluation instead. Both are N(0, 1) per evaluation; trajectories match diffusers
    exactly only when the same noise is injected (as the tests do)."""
    require(cfg, "dpmpp_sde", "DPMSolverSDEScheduler",
            prediction_types=("epsilon", "v_prediction"), sigmas=True)
    t, s, init = _k_sigmas(cfg, num_steps, karras_config_range=False)
    N = num_steps
    s_k, s_next = s[:-1], s[1:]
    s_mid = np.sqrt(s_k * s_next)  # sigma at the midpoint in t = -log sigma

    def ancestral(s_from, s_to):
        # x' = (sigma_down/sigma) x + (1 - sigma_down/sigma) x0 + sigma_up z: the exact
        # DPM-Solver++(1) step to sigma_down = sqrt(s_to^2 - sigma_up^2), then fresh noise.
        up = np.minimum(s_to, np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
        down = np.sqrt(s_to**2 - up**2)
        return down / s_from, 1 - down / s_from, up

    a0, b0, up0 = ancestral(s_k, s_mid)
    a0[-1], b0[-1], up0[-1] = 0.0, 1.0, 0.0  # the step to sigma = 0 is plain Euler: x' = x0
    a1, b1, up1 = ancestral(s_k[:-1], s_next[:-1])
    sigma_in = _interleave(s_k, s_mid[:-1])
    x0_x, x0_out = k_x0_coefficients(cfg.prediction_type, sigma_in)
    consts = dict(x0_x=x0_x, x0_out=x0_out, stage=_interleave(np.zeros(N), np.ones(N - 1)),
                  a=_interleave(a0, a1), b=_interleave(b0, b1), noise_std=_interleave(up0, up1))
    t_mid = S.sigma_to_t(s_mid[:-1], S.train_sigmas(cfg))
    noise_b = _interleave(s_k, s_next[:-1])
    return make_plan(_interleave(t, t_mid), 1 / np.sqrt(sigma_in**2 + 1), consts,
                     np.ones(2 * N - 1), noise_b, init, 2)


def dpmpp_sde_step(state: KState, model_output, c, noise) -> KState:
    """Stage 0: x -> midpoint; stage 1: restart from the saved x with the midpoint's x0."""
    x = state.x
    denoised = c["x0_x"] * x + c["x0_out"] * model_output
    second = c["stage"] == 1
    x_from = jnp.where(second, state.x_saved, x)
    x_new = c["a"] * x_from + c["b"] * denoised + c["noise_std"] * noise
    return KState(x=x_new, x_saved=x_from, d_saved=state.d_saved)
