"""Samplers, one module per family. Read `common.py` first, then any family:

ddpm_family.py  ddim, ddpm, pndm           (discrete timesteps, alphas_cumprod)
k_diffusion.py  euler, euler_a, heun, dpm2, dpm2_a, lms   (Karras sigmas, scaled UNet input)
dpm_solver.py   dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, dpmpp_sde
unipc_deis.py   unipc, deis

`jaxsd/sampling.py` maps names to them and runs the loop.
"""
