"""The sampling loop: every sampler, every step, one `jax.lax.scan` in one jitted program.

    latents = sample(model_fn, noise, sampler="dpmpp_2m", num_steps=25, schedule=cfg, key=key).latents

`model_fn(x, t, *model_args)` is the denoiser: x is exactly the UNet input diffusers would pass
(`scheduler.scale_model_input(latents, t)`), t the timestep it would pass (a float32 scalar,
fractional for Karras-style schedules), and `model_args` any traced values it needs (text
embeddings, guidance scale). One scan iteration is one model evaluation.

What is static (a change recompiles): model_fn, sampler, num_steps (through the plan's length),
the shapes and return_trajectory. What is traced (a change
reuses the compiled program): the schedule's numbers, model_args, eta, key, first_step (img2img).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.sampling import consistency as cm
from jaxsd.sampling import ddpm_family as ddpm
from jaxsd.sampling import dpm_solver as dpm
from jaxsd.sampling import k_diffusion as kd
from jaxsd.sampling import unipc_deis as ud
from jaxsd.sampling.common import Plan
from jaxsd.sampling import schedule as S
from jaxsd.sampling.schedule import ScheduleConfig


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler: how to plan its steps on the host, and its pure step function."""

    name: str  # jaxsd's name, as used by `sample(sampler=...)`
    diffusers: str  # the diffusers scheduler it reproduces, with its non-default arguments
    plan: Callable[[ScheduleConfig, int], Plan]  # host side, NumPy float64
    init: Callable[[jax.Array], Any]  # latents -> initial state (a flax.struct dataclass)
    step: Callable[..., Any]  # (state, model_output, c, noise) -> state, pure
    stochastic: bool = False  # draws fresh Gaussian noise at every evaluation
    order: int = 1  # the order of the method as diffusers configures it by default
    default_betas: tuple = S.DDPM_BETAS  # beta_start, beta_end, beta_schedule a config may omit


SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    Sampler("ddim", "DDIMScheduler", ddpm.ddim_plan, ddpm.init_latent_state, ddpm.ddim_step,
            stochastic=True),  # the noise is multiplied by eta (0 by default)
    Sampler("ddpm", "DDPMScheduler", ddpm.ddpm_plan, ddpm.init_latent_state, ddpm.ddpm_step,
            stochastic=True),
    Sampler("pndm", "PNDMScheduler", ddpm.pndm_plan, ddpm.init_pndm_state,
            ddpm.pndm_step, order=4),
    Sampler("lms", "LMSDiscreteScheduler", kd.lms_plan, kd.init_lms_state, kd.lms_step, order=4),
    Sampler("euler", "EulerDiscreteScheduler", kd.euler_plan, kd.init_k_state, kd.k_step,
            stochastic=True),  # the noise is multiplied by the churn (0 by default)
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", kd.euler_a_plan, kd.init_k_state,
            kd.k_step, stochastic=True),
    Sampler("heun", "HeunDiscreteScheduler", kd.heun_plan, kd.init_k_state, kd.k_step, order=2,
            default_betas=S.SD_BETAS),
    Sampler("dpm2", "KDPM2DiscreteScheduler", kd.dpm2_plan, kd.init_k_state, kd.k_step, order=2,
            default_betas=S.SD_BETAS),
    Sampler("dpm2_a", "KDPM2AncestralDiscreteScheduler", kd.dpm2_a_plan, kd.init_k_state,
            kd.k_step, stochastic=True, order=2, default_betas=S.SD_BETAS),
    Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", dpm.dpmpp_2m_plan,
            dpm.init_multistep_state, dpm.dpm_multistep_step, order=2),
    Sampler("dpmpp_2m_sde", 'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")',
            dpm.dpmpp_2m_sde_plan, dpm.init_multistep_state, dpm.dpm_multistep_step,
            stochastic=True, order=2),
    Sampler("dpmpp_2s", "DPMSolverSinglestepScheduler", dpm.dpmpp_2s_plan,
            dpm.init_multistep_state, dpm.dpm_singlestep_step, order=2),
    Sampler("dpmpp_sde", "DPMSolverSDEScheduler", dpm.dpmpp_sde_plan, kd.init_k_state,
            dpm.dpmpp_sde_step, stochastic=True, order=2, default_betas=S.SD_BETAS),
    Sampler("unipc", "UniPCMultistepScheduler", ud.unipc_plan, ud.init_unipc_state, ud.unipc_step, order=2),
    Sampler("deis", "DEISMultistepScheduler", ud.deis_plan, ud.init_deis_state, ud.deis_step, order=2),
    Sampler("lcm", "LCMScheduler", cm.lcm_plan, ddpm.init_latent_state, cm.lcm_step,
            stochastic=True, default_betas=S.LCM_BETAS),
    Sampler("tcd", "TCDScheduler", cm.tcd_plan, ddpm.init_latent_state, cm.tcd_step,
            stochastic=True, default_betas=S.LCM_BETAS),  # fresh noise when gamma (eta) > 0
]}


def get_sampler(name: str) -> Sampler:
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler={name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


# The diffusers scheduler class a checkpoint's scheduler_config.json names -> the jaxsd sampler
# that reproduces it (DPMSolverMultistep depends on its algorithm_type).
SAMPLER_OF_SCHEDULER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "dpm2", "KDPM2AncestralDiscreteScheduler": "dpm2_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "DPMSolverSinglestepScheduler": "dpmpp_2s",
    "DPMSolverSDEScheduler": "dpmpp_sde", "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis", "LCMScheduler": "lcm", "TCDScheduler": "tcd",
}


# The algorithm_type values each class runs as jaxsd samplers (diffusers' __init__ turns "deis"
# into "dpmsolver++" for the DPM-Solvers and "dpmsolver"/"dpmsolver++" into "deis" for DEIS).
# jaxsd has no DPM-Solver (noise-prediction) samplers, nor the SDE form of the singlestep one.
SAMPLER_OF_ALGORITHM = {
    "DPMSolverMultistepScheduler": {"dpmsolver++": "dpmpp_2m", "deis": "dpmpp_2m",
                                    "sde-dpmsolver++": "dpmpp_2m_sde"},
    "DPMSolverSinglestepScheduler": {"dpmsolver++": "dpmpp_2s", "deis": "dpmpp_2s"},
    "DEISMultistepScheduler": {"deis": "deis", "dpmsolver": "deis", "dpmsolver++": "deis"},
}


def default_sampler(scheduler_config: dict) -> str:
    """The jaxsd sampler that reproduces the checkpoint's own diffusers scheduler."""
    name = scheduler_config.get("_class_name")
    if name not in SAMPLER_OF_SCHEDULER:
        raise ValueError(f"the checkpoint's scheduler _class_name={name!r} has no jaxsd sampler; "
                         f"known: {sorted(SAMPLER_OF_SCHEDULER)}. Pass scheduler=... explicitly")
    if name in SAMPLER_OF_ALGORITHM:
        by_algorithm = SAMPLER_OF_ALGORITHM[name]
        algorithm = scheduler_config.get("algorithm_type", "deis" if name == "DEISMultistepScheduler"
                                         else "dpmsolver++")
        if algorithm not in by_algorithm:
            raise ValueError(f"the checkpoint's scheduler {name}(algorithm_type={algorithm!r}) has no "
                             f"jaxsd sampler; jaxsd runs {name} with algorithm_type in "
                             f"{sorted(by_algorithm)}")
        return by_algorithm[algorithm]
    return SAMPLER_OF_SCHEDULER[name]


@functools.lru_cache(maxsize=256)
def make_plan(sampler: str, num_steps: int, schedule: ScheduleConfig) -> Plan:
    """The sampler's per-evaluation constants for this schedule (host, NumPy; cached)."""
    s = get_sampler(sampler)
    T = schedule.num_train_timesteps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps!r} must be an integer in [1, {T}] "
                         "(the schedule's num_train_timesteps)")
    explicit = S.explicit_steps(schedule)
    if explicit is not None and num_steps != explicit:
        which = "timesteps" if schedule.timesteps is not None else "sigmas"
        raise ValueError(f"num_steps={num_steps} does not match the schedule's explicit {which} "
                         f"list, which makes {explicit} steps")
    return s.plan(S.with_betas(schedule, s.default_betas), int(num_steps))


def refusal(sampler: str, schedule: ScheduleConfig, num_steps: int = 25) -> str | None:
    """Why ``sampler`` cannot run ``schedule`` (its diffusers class lacks an option the schedule
    uses, e.g. zero terminal SNR or Karras sigmas), or None when it can."""
    try:
        make_plan(sampler, num_steps, schedule)
    except ValueError as error:
        return str(error)
    return None


def check_eta(sampler: str, eta) -> None:
    """Only DDIM (its eta) and TCD (its gamma, which diffusers also passes as `eta`) take one
    (diffusers passes eta only to a scheduler whose step takes it): a nonzero one for another
    sampler is refused, not ignored, as is a TCD gamma outside [0, 1]. A traced eta is not checked."""
    s = get_sampler(sampler)
    if isinstance(eta, jax.core.Tracer):
        return
    if s.name == "tcd" and not np.all((np.asarray(eta) >= 0) & (np.asarray(eta) <= 1)):
        raise ValueError(f"eta={eta!r} is TCD's gamma and must be in [0, 1] (0: deterministic; "
                         "the TCD authors use 0.3)")
    if s.name not in ("ddim", "tcd") and np.any(np.asarray(eta) != 0):
        raise ValueError(f"eta={eta!r} is DDIM's (and TCD's gamma): sampler {s.name!r} has none "
                         f"(diffusers' {s.diffusers} takes no eta); leave it 0 or use 'ddim' or 'tcd'")


def step_noise(key: jax.Array, i, shape) -> jax.Array:
    """The Gaussian noise a stochastic sampler uses at evaluation i (float32).

    ``key`` is one key for the whole batch, or one key per image ([B] keys, shape[0] == B): then
    image b's noise depends on its own key only, and equals what a batch of one with that key
    draws (JAX's counter-based generator numbers the values by their flat index)."""
    if jnp.ndim(key) == 0:
        return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    one = lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:], jnp.float32)
    return jax.vmap(one)(key)


def add_noise(plan: Plan, init_latents: jax.Array, noise: jax.Array, first_step) -> jax.Array:
    """img2img: noise `init_latents` to the level of evaluation `first_step` (traced is fine),
    as diffusers' scheduler.add_noise does at the first kept timestep."""
    a = jnp.asarray(plan.noise_a)[first_step]
    b = jnp.asarray(plan.noise_b)[first_step]
    return a * init_latents.astype(jnp.float32) + b * noise.astype(jnp.float32)


def first_step_for_strength(plan: Plan, num_steps: int, strength) -> Any:
    """diffusers' img2img get_timesteps: skip t_start * scheduler.order evaluations.

    A Python float gives exactly diffusers' integer (prefer this: pass the result to `sample` as
    a traced int). A traced strength is evaluated in float32 and can differ from diffusers'
    float64 `int(num_steps * strength)` by one step (8 of 10,100 (N, strength) pairs, e.g.
    N = 50, strength = 0.58: diffusers 28, float32 29)."""
    if isinstance(strength, (int, float)):
        init_timestep = min(int(num_steps * strength), num_steps)
        return max(num_steps - init_timestep, 0) * plan.order
    init_timestep = jnp.minimum(jnp.floor(num_steps * strength), num_steps).astype(jnp.int32)
    return jnp.maximum(num_steps - init_timestep, 0) * plan.order


def _cutoff(T: int, fraction: float, name: str) -> int:
    """SDXL's hand-off point: the training timestep where a fraction of the denoising is done,
    int(round(T - fraction T)) as diffusers computes it (float64, round half to even)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"{name}={fraction!r} must be a number strictly between 0 and 1 (the fraction "
                         f"of the denoising done by the first model)")
    return int(round(T - fraction * T))


def last_step_for_denoising_end(plan: Plan, num_train_timesteps: int, denoising_end: float) -> int:
    """diffusers' SDXL ``denoising_end``: run the evaluations whose timestep is >= the cutoff
    (the base of an "ensemble of experts"; its latents go to the refiner unfinished)."""
    cutoff = _cutoff(num_train_timesteps, denoising_end, "denoising_end")
    return int(sum(float(t) >= cutoff for t in plan.timesteps))


def first_step_for_denoising_start(plan: Plan, num_train_timesteps: int, denoising_start: float) -> int:
    """diffusers' SDXL img2img ``denoising_start`` (get_timesteps): run the evaluations whose
    timestep is < the cutoff, one more for a second-order sampler when their count is even."""
    cutoff = _cutoff(num_train_timesteps, denoising_start, "denoising_start")
    n = int(sum(float(t) < cutoff for t in plan.timesteps))
    if plan.order == 2 and n % 2 == 0:
        n += 1
    return len(plan.timesteps) - n


class Sampled(NamedTuple):
    latents: jax.Array  # [B, H, W, C] float32, the final sample
    trajectory: jax.Array | None  # [E, B, H, W, C] latents after every evaluation, if asked


def sample(model_fn: Callable, latents: jax.Array, *, sampler: str, num_steps: int,
           schedule: ScheduleConfig, key: jax.Array | None = None, model_args: tuple = (),
           eta=0.0, init_latents: jax.Array | None = None, first_step=0, last_step=None,
           add_noise: bool = True, return_trajectory: bool = False, progress=None,
           after_step: Callable | None = None, after_step_args: tuple = ()) -> Sampled:
    """Runs a whole diffusers-equivalent sampling loop as one jitted lax.scan.

    :param model_fn: `model_fn(x, t, *model_args) -> model output` shaped like x (any dtype; the
        sampler casts it to float32). Static: pass the same function object to reuse the
        compiled program; put traced values in `model_args`, not in a fresh closure.
    :param latents: [B, H, W, C] unit Gaussian noise (diffusers' `latents` before it is scaled by
        `init_noise_sigma`); for img2img, the noise that `add_noise` mixes into `init_latents`.
    :param sampler: a name in `SAMPLERS`.
    :param num_steps: the number of inference steps N (evaluations: N, 2N - 1, N + 1 or N + 9).
    :param schedule: the checkpoint's `ScheduleConfig`.
    :param key: PRNG key for the stochastic samplers (evaluation i uses `step_noise(key, i, ...)`),
        or [B] keys, one per image.
    :param eta: DDIM's eta, or TCD's gamma (traced). Only 'ddim' and 'tcd' take one (diffusers
        passes eta only to a scheduler whose step takes it); a nonzero eta elsewhere is refused.
    :param init_latents: img2img: the encoded image latents; `first_step` evaluations are skipped.
    :param first_step: evaluations to skip (traced); see `first_step_for_strength`.
    :param last_step: stop before this evaluation (traced; default all): SDXL's
        ``denoising_end``, see `last_step_for_denoising_end`. The state is returned as it is
        (for Euler: the noisy x at that level, not a prediction of the clean image).
    :param add_noise: False: `init_latents` are already at the level of `first_step` (SDXL's
        refiner continuing the base's latents, `first_step_for_denoising_start`); used as they are.
    :param return_trajectory: also return the latents after every evaluation.
    :param after_step: `after_step(x, i, *after_step_args) -> x`, applied to the latents after
        evaluation i (static, like model_fn). Inpainting with an ordinary 4-channel UNet uses it
        to paste the re-noised known region back after every step, as diffusers does.
    :param progress: None (one lax.scan), or an object with `.update(n)` (e.g. a tqdm bar): then
        the same steps run one compiled call each and the bar advances between them (the
        results agree with the scan's to float32 rounding); a tqdm bar shows "compiling..."
        first. Both ways are cached by JAX's persistent compilation cache when it is on.
    """
    s = get_sampler(sampler)
    check_eta(sampler, eta)
    plan = make_plan(sampler, num_steps, schedule)
    if init_latents is not None and "prk" in plan.consts and plan.consts["prk"].any() and not (
            isinstance(first_step, (int, np.integer)) and first_step == 0):
        raise ValueError(
            "sampler 'pndm' with skip_prk_steps=False starts with a Runge-Kutta warm-up that only "
            f"runs from the first timestep; img2img and inpainting start later (first_step={first_step!r}; "
            "diffusers would run the warm-up with the first timesteps' constants there). Set "
            "skip_prk_steps=True in the scheduler config or use another sampler")
    if key is None:
        key = jax.random.key(0)
    learned_variance = bool(np.any(plan.consts.get("learned", 0)))  # ddpm: the model returns 2C channels
    arrays = dict(timesteps=plan.timesteps, c_in=plan.c_in, consts=plan.consts,
                  noise_a=plan.noise_a, noise_b=plan.noise_b,
                  init_noise_sigma=np.float32(plan.init_noise_sigma))
    if not add_noise and init_latents is None:
        raise ValueError("add_noise=False continues from init_latents; pass them")
    last_step = plan.timesteps.shape[0] if last_step is None else last_step
    static = dict(sampler=s.name, after_step=after_step, learned_variance=learned_variance)
    if progress is None:
        return _sample_jit(model_fn, tuple(model_args), latents, init_latents, arrays, key,
                           jnp.float32(eta), first_step, last_step, return_trajectory=return_trajectory,
                           add_noise=add_noise, after_step_args=tuple(after_step_args), **static)
    return _sample_stepwise(progress, model_fn, tuple(model_args), latents, init_latents, arrays,
                            key, jnp.float32(eta), first_step, last_step, add_noise, return_trajectory,
                            tuple(after_step_args), static)


def _sample_stepwise(progress, model_fn, model_args, latents, init_latents, arrays, key, eta,
                     first_step, last_step, add_noise, return_trajectory, after_step_args, static) -> Sampled:
    """`_sample_jit`'s loop with the same step function, one compiled call per evaluation, so
    that a progress bar advances between calls.

    Why not one scan with a host callback inside that ticks the bar: JAX never writes a program
    with host callbacks to its persistent compilation cache, so every process would compile
    the whole loop again. Here both programs (the first state, one evaluation) are cacheable,
    and they compile while the bar says "compiling...". A step is one UNet call
    or two, so the host round trip per step costs nothing visible; Ctrl-C lands between steps.
    """
    if isinstance(latents, jax.core.Tracer):
        raise ValueError("progress= needs concrete arrays: a sample() with a progress bar cannot "
                         "run inside jax.jit (leave progress=None there)")
    with _ctrl_c_between_steps() as interrupted:
        return _stepwise_loop(progress, model_fn, model_args, latents, init_latents, arrays, key,
                              eta, int(first_step), int(last_step), add_noise, return_trajectory,
                              after_step_args, static, interrupted)


def _stepwise_loop(progress, model_fn, model_args, latents, init_latents, arrays, key, eta, first, last,
                   add_noise, return_trajectory, after_step_args, static, interrupted) -> Sampled:
    E = arrays["timesteps"].shape[0]
    describe = getattr(progress, "set_postfix_str", None)
    if describe is not None:
        describe("compiling...")
    state = _initial_state_jit(latents, init_latents, arrays, first, sampler=static["sampler"],
                               add_noise=add_noise)
    state = _split_like(state, latents)
    static = dict(static, model_fn=model_fn)
    step = functools.partial(_evaluate_jit, **static)
    # Compile ahead of time (JAX keeps the program for the calls below), so that the bar shows
    # the compilation as its own phase and its clock then times the steps only.
    _evaluate_jit.lower(model_args, state, np.int32(first), arrays, key, eta, after_step_args,
                        **static).compile()
    if interrupted():
        raise KeyboardInterrupt
    if describe is not None:
        describe("")
    if hasattr(progress, "reset"):
        progress.reset(total=E)
    progress.update(first)  # img2img: the evaluations it skips
    trajectory = [state.x] * first
    for i in range(first, last):
        state = step(model_args, state, np.int32(i), arrays, key, eta, after_step_args)
        jax.block_until_ready(state.x)
        if interrupted():
            raise KeyboardInterrupt
        if return_trajectory:
            trajectory.append(state.x)
        progress.update(1)
    trajectory += [state.x] * (E - max(last, first))  # denoising_end: the evaluations not run
    progress.update(E - max(last, first))
    return Sampled(latents=state.x, trajectory=jnp.stack(trajectory) if return_trajectory else None)


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Ctrl-C during the step loop becomes a KeyboardInterrupt raised between two steps.

    Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; in a loop of
    JAX calls that is often inside a finalizer or a callback, where Python prints "Exception
    ignored" and carries on. So, while the loop runs (compilation included; main thread, Python's
    own SIGINT handler in place), a handler only notes the signal, and the loop raises after the
    compilation or the step it was on.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: False
        return
    noted = []
    signal.signal(signal.SIGINT, lambda *_: noted.append(True))
    try:
        yield lambda: bool(noted)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _split_like(state, latents):
    """Data parallel (latents split over devices along the batch): the sampler's per-image state
    (saved derivatives, previous outputs) split the same way. Its initial zeros come out of
    `_initial_state_jit` whole on every device, its later values split, and a program compiled
    for one placement refuses the other (the scan never sees the difference)."""
    sharding = getattr(latents, "sharding", None)
    if sharding is None or sharding.is_fully_replicated:
        return state
    per_image = lambda a: a.ndim == latents.ndim and a.shape[0] == latents.shape[0]
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding) if per_image(a) else a, state)


def _check_output(out_shape, x_shape, sampler, learned_variance):
    """At trace time: the model's output must be shaped like the latents, or [prediction |
    variance] (2C channels) exactly when ddpm's variance_type is learned / learned_range."""
    doubled = tuple(x_shape[:-1]) + (2 * x_shape[-1],)
    if learned_variance and tuple(out_shape) != doubled:
        raise ValueError(f"variance_type learned / learned_range needs a model output of shape {doubled} "
                         f"([prediction | variance], 2C channels); model_fn returned {tuple(out_shape)}")
    if not learned_variance and tuple(out_shape) != tuple(x_shape):
        hint = (" (a model that predicts its variance in C more channels needs sampler 'ddpm' with "
                "variance_type learned or learned_range)" if tuple(out_shape) == doubled else "")
        raise ValueError(f"model_fn returned shape {tuple(out_shape)}; sampler {sampler!r} needs the "
                         f"latents' shape {tuple(x_shape)}{hint}")


def _initial_state(latents, init_latents, arrays, first_step, *, sampler, add_noise=True):
    """The sampler's state before evaluation 0 (text-to-image) or `first_step` (img2img)."""
    latents = latents.astype(jnp.float32)
    if init_latents is None:
        x = latents * arrays["init_noise_sigma"]
    elif not add_noise:  # already noised to this level (the SDXL refiner's hand-off)
        x = init_latents.astype(jnp.float32)
    else:
        x = (arrays["noise_a"][first_step] * init_latents.astype(jnp.float32)
             + arrays["noise_b"][first_step] * latents)
    return SAMPLERS[sampler].init(x)


def _evaluate(model_fn, model_args, state, i, t, c_in, c, key, eta, after_step_args, *,
              sampler, after_step, learned_variance):
    """Evaluation i: one model call and the sampler's step, then `after_step`."""
    s = SAMPLERS[sampler]
    # Scheduler arithmetic stays float32 whatever the model's dtype (diffusers PR #4254).
    out = model_fn(c_in * state.x, t, *model_args).astype(jnp.float32)
    _check_output(out.shape, state.x.shape, sampler, learned_variance)
    noise = step_noise(key, i, state.x.shape) if s.stochastic else None
    state = s.step(state, out, dict(c, eta=eta), noise)
    if after_step is not None:
        state = state.replace(x=after_step(state.x, i, *after_step_args))
    return state


@functools.partial(jax.jit, static_argnames=("model_fn", "sampler", "return_trajectory", "add_noise",
                                             "after_step", "learned_variance"))
def _sample_jit(model_fn, model_args, latents, init_latents, arrays, key, eta, first_step, last_step, *,
                sampler, return_trajectory, add_noise=True, after_step=None, after_step_args=(),
                learned_variance=False):
    static = dict(sampler=sampler, after_step=after_step, learned_variance=learned_variance)

    def body(state, xs):
        i, t, c_in, c = xs
        # img2img skips the first evaluations, denoising_end the last; lax.cond runs only the
        # taken branch.
        state = jax.lax.cond((i >= first_step) & (i < last_step), lambda st: _evaluate(
            model_fn, model_args, st, i, t, c_in, c, key, eta, after_step_args, **static),
            lambda st: st, state)
        return state, (state.x if return_trajectory else None)

    E = arrays["timesteps"].shape[0]
    xs = (jnp.arange(E), arrays["timesteps"], arrays["c_in"], arrays["consts"])
    state0 = _initial_state(latents, init_latents, arrays, first_step, sampler=sampler, add_noise=add_noise)
    state, trajectory = jax.lax.scan(body, state0, xs)
    return Sampled(latents=state.x, trajectory=trajectory)


# The same two pieces as programs of their own, for the step-by-step loop with a progress bar.
_initial_state_jit = jax.jit(_initial_state, static_argnames=("sampler", "add_noise"))


@functools.partial(jax.jit, static_argnames=("model_fn", "sampler", "after_step", "learned_variance"))
def _evaluate_jit(model_args, state, i, arrays, key, eta, after_step_args, *, model_fn, sampler,
                  after_step, learned_variance):
    c = jax.tree_util.tree_map(lambda a: a[i], arrays["consts"])
    return _evaluate(model_fn, model_args, state, i, arrays["timesteps"][i], arrays["c_in"][i], c,
                     key, eta, after_step_args, sampler=sampler, after_step=after_step,
                     learned_variance=learned_variance)
