"""Shared helpers for the sampler tests: a fake denoiser in JAX and torch, and diffusers' loop."""
from __future__ import annotations

import importlib

import numpy as np
import torch

import diffusers

# jaxsd sampler name -> (diffusers class, from_config overrides)
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # The sampler's name chooses the algorithm, whatever algorithm_type the config was saved with.
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

# Samplers whose diffusers class has use_karras_sigmas.
KARRAS = ("lms", "euler", "heun", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s",
          "dpmpp_sde", "unipc", "deis")

# SD 1.5's scheduler/scheduler_config.json and SD 2.1 (768, v-prediction)'s.
SD1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
       "trained_betas": None, "clip_sample": False}
SD2_V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
         "num_train_timesteps": 1000, "prediction_type": "v_prediction",
         "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
         "trained_betas": None}
CONFIGS = {
    "sd1": SD1,
    "sd2_v": SD2_V,
    "trailing": dict(SD1, timestep_spacing="trailing"),
    "karras": dict(SD1, use_karras_sigmas=True),
    # Not SD: the DDPM paper's linear betas over a longer training schedule, and Nichol &
    # Dhariwal's cosine schedule, where 1 - alpha_bar at small t is smallest (~4e-5).
    "linear_1100": {"beta_schedule": "linear", "num_train_timesteps": 1100, "steps_offset": 1},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
}


def jax_model(x, t):
    """A fixed nonlinear function of x and t standing in for the UNet (elementwise)."""
    import jax.numpy as jnp

    t = jnp.asarray(t, jnp.float32)
    return jnp.tanh(0.7 * x + 0.3 * jnp.sin(t * 0.013)) + 0.05 * x * jnp.cos(t * 0.007)


def torch_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.7 * x + 0.3 * torch.sin(t * 0.013)) + 0.05 * x * torch.cos(t * 0.007)


def _scheduler_class(cls_name):
    """The diffusers class (DPMSolverSDEScheduler needs torchsde, in the test extra; its
    Brownian-tree noise is replaced by injected noise in diffusers_loop)."""
    return getattr(diffusers, cls_name)


def diffusers_loop(name, config, num_steps, latents_nhwc, noises_nhwc=None, eta=0.0, step_kwargs=None,
                   model=None, **explicit):
    """diffusers' pipeline loop with the fake model; returns (trajectory [E, NHWC], timesteps).

    Stochastic samplers get `noises_nhwc[i]` at evaluation i, by replacing randn_tensor in the
    scheduler's module (and DPMSolverSDE's Brownian-tree noise sampler). `explicit`: timesteps=
    or sigmas= for set_timesteps instead of num_steps. `step_kwargs`: more arguments of
    scheduler.step (Euler's s_churn, s_tmin, s_tmax, s_noise). `model`: another torch fake model.
    """
    cls_name, overrides = DIFFUSERS[name]
    cls = _scheduler_class(cls_name)
    module = importlib.import_module(cls.__module__)
    sched = cls.from_config(config, **overrides)
    if explicit:
        sched.set_timesteps(**explicit)
    else:
        sched.set_timesteps(num_steps)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
    current = {}
    fake_randn = lambda *args, **kwargs: current["noise"].clone()
    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = fake_randn
    if name == "dpmpp_sde":
        sched.noise_sampler = lambda sigma, sigma_next: current["noise"]
    try:
        x = to_t(latents_nhwc) * sched.init_noise_sigma
        trajectory, timesteps = [], []
        for i, t in enumerate(sched.timesteps):
            current["noise"] = to_t(noises_nhwc[i]) if noises_nhwc is not None else None
            x_in = sched.scale_model_input(x, t)
            timesteps.append(float(t))
            out = (model or torch_model)(x_in, t)
            kwargs = {"eta": eta} if name in ("ddim", "tcd") else {}  # TCD: eta is its gamma
            kwargs.update(step_kwargs or {})
            x = sched.step(out, t, x, **kwargs).prev_sample
            trajectory.append(x.numpy().transpose(0, 2, 3, 1))
    finally:
        if saved is not None:
            module.randn_tensor = saved
    return np.stack(trajectory), np.array(timesteps)
