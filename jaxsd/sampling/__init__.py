"""Sampling: every diffusers sampler as a pure step function, and the loop as one ``lax.scan``.

It sees the denoiser only as ``model_fn(x, t, *model_args)``: nothing here knows about UNets or
checkpoints. Read in this order:

    schedule.py     betas, timesteps and sigmas from scheduler_config.json (NumPy, on the host)
    common.py       the Plan every sampler fills, and the coefficients they share
    ddpm_family.py  ddim, ddpm, pndm                          (discrete timesteps, alphas_cumprod)
    k_diffusion.py  euler, euler_a, heun, dpm2, dpm2_a, lms   (Karras sigmas, scaled UNet input)
    dpm_solver.py   dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, dpmpp_sde
    unipc_deis.py   unipc, deis
    consistency.py  lcm, tcd                                  (consistency-distilled models)
    loop.py         names -> samplers, and the whole loop as one jitted ``jax.lax.scan``
"""
from jaxsd.sampling.loop import (SAMPLER_OF_SCHEDULER, SAMPLERS, Sampled, Sampler, add_noise, check_eta,
                                 default_sampler, first_step_for_denoising_start, first_step_for_strength,
                                 get_sampler, last_step_for_denoising_end, make_plan, refusal, sample,
                                 step_noise)
from jaxsd.sampling.schedule import SD1_CONFIG, SD2_V_CONFIG, ScheduleConfig

__all__ = ["SAMPLERS", "SAMPLER_OF_SCHEDULER", "Sampled", "Sampler", "ScheduleConfig", "SD1_CONFIG",
           "SD2_V_CONFIG", "add_noise", "check_eta", "default_sampler", "first_step_for_denoising_start",
           "first_step_for_strength", "get_sampler", "last_step_for_denoising_end", "make_plan", "refusal",
           "sample", "step_noise"]
