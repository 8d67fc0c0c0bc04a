# %% [markdown]
# # Schedulers are ODE (and SDE) solvers
#
# diffusers calls them schedulers, jaxsd calls them samplers: the part of the loop that decides,
# from the UNet's prediction, where the latents go next. This tutorial shows, on the built-in
# `tiny-shapes` model (`docs/tiny_model.md`), that they all solve one differential equation,
# each with its own numerical method.
#
# | part | what it shows |
# | --- | --- |
# | 1 | the change of variables that turns sampling into an ODE in the noise level $\sigma$ |
# | 2 | Euler's method on that ODE, by hand, checked against jaxsd's `euler` sampler |
# | 3 | all 15 ODE/SDE samplers from one seed: images, UNet evaluations, what the judge sees |
# | 4 | the inside of one scan: the latents after every evaluation |
# | 5 | accuracy against cost: error to a fine-grained solution, for first- and second-order methods |
#
# Run it as a script (`python tutorials/schedulers.py "a prompt"`, offline, about ten minutes on
# two CPU cores; the pictures go to `outputs/`) or open it as a notebook with jupytext.

# %%
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsd
from jaxsd.sampling import schedule
from jaxsd.training import evaluate, shapes

prompt = "a large yellow square on a purple background"     # in a notebook: edit this line
if "ipykernel" not in sys.modules and len(sys.argv) > 1:    # as a script: the first argument
    prompt = sys.argv[1]
pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
out = Path("outputs")
out.mkdir(exist_ok=True)

# %% [markdown]
# ## 1. From timesteps to noise levels
#
# Training noised the latents as $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\,
# \epsilon$. Divide by $\sqrt{\bar\alpha_t}$ and call the result $x$:
#
# $$x = z_0 + \sigma_t\, \epsilon, \qquad \sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}$$
#
# Now the clean latents carry no factor, and "how noisy" is one number, $\sigma$. Karras et al.
# (2022) show that the sampling process, with its randomness taken out, is the ordinary
# differential equation
#
# $$\frac{dx}{d\sigma} = \hat\epsilon(x, \sigma)$$
#
# where $\hat\epsilon$ is the model's estimate of the noise in $x$. Start at $x = \sigma_{max}
# \cdot noise$, integrate down to $\sigma = 0$, and $x$ is a clean latent. A scheduler is a
# method for that integration; the stochastic ones (DDPM, the "ancestral" ones, the SDE ones) add
# fresh noise along the way.
#
# This model's UNet does not predict $\epsilon$ itself but the "velocity"
# $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1 - \bar\alpha_t}\, z_0$ (Salimans & Ho, 2022), from the
# variance-preserving input $z_t = x / \sqrt{\sigma^2 + 1}$; the noise follows from the two:
# $\hat\epsilon = \sqrt{\bar\alpha_t}\, \hat v + \sqrt{1 - \bar\alpha_t}\, z_t$. It was trained on a
# schedule rescaled so that $\bar\alpha_{999} = 0$ exactly ("zero terminal SNR", Lin et al., 2024):
# the last timestep is pure noise, so $\sigma_{999}$ is infinite. diffusers' sigma-based schedulers,
# and jaxsd with them, put $\bar\alpha_{999} = 2^{-24}$ instead, which makes $\sigma_{max} = 4096$.

# %%
cfg = pipe.schedule                       # the model's scheduler_config.json, as a ScheduleConfig
print(f"prediction: {cfg.prediction_type}; zero terminal SNR: {cfg.rescale_betas_zero_snr}; "
      f"spacing: {cfg.timestep_spacing}")
abar_train = schedule.alphas_cumprod(cfg)                          # [1000], abar_t for t = 0..999
sigmas_train = schedule.train_sigmas(cfg)                          # [1000], sigma_t for t = 0..999
print(f"sigma_0 = {sigmas_train[0]:.4f}, sigma_500 = {sigmas_train[500]:.3f}, "
      f"sigma_998 = {sigmas_train[998]:.1f}, sigma_999 = {sigmas_train[-1]:.1f}")

# %% [markdown]
# ## 2. Euler's method, by hand
#
# The model's config asks for "trailing" timesteps: for 25 steps 999, 959, ..., 39, the first at
# the last training timestep, where the input is pure noise. Their sigmas, then a final 0. Each
# step takes the slope at the current point and walks along it:
#
# $$x_{i+1} = x_i + (\sigma_{i+1} - \sigma_i)\, \hat\epsilon(x_i, \sigma_i)$$
#
# with classifier-free guidance on the UNet's output, $out = out_{empty} + w\,(out_{prompt} -
# out_{empty})$, $w = 7.5$.

# %%
num_steps, w = 25, 7.5
timesteps = schedule.spaced_timesteps(cfg.timestep_spacing, num_steps, 1000, cfg.steps_offset)
sigmas = np.append(sigmas_train[timesteps], 0.0)                  # [26], 4096 -> 0
abar = 1 / (sigmas ** 2 + 1)                                      # abar_t, from sigma_t
ids = jnp.asarray(jaxsd.tokenize(pipe.tokenizer, ["", prompt]))
context = pipe.text_encoder.apply({"params": pipe.text_params}, ids).last_hidden_state   # [2, 77, 64]
unet = jax.jit(lambda x, t, c: pipe.unet.apply({"params": pipe.unet_params}, x, t, c))


def eps_hat(x, i):
    """The guided estimate of the noise in x at evaluation i."""
    z_t = x / np.sqrt(sigmas[i] ** 2 + 1)                          # back to the UNet's input scale
    out_empty, out_prompt = jnp.split(unet(jnp.concatenate([z_t, z_t]), jnp.full((2,), timesteps[i]),
                                           context), 2)
    out = np.asarray(out_empty + w * (out_prompt - out_empty), np.float64)
    if cfg.prediction_type == "v_prediction":
        return np.sqrt(abar[i]) * out + np.sqrt(1 - abar[i]) * z_t
    return out


noise = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
# diffusers starts a "trailing" schedule at sigma_max (a "leading" one at sqrt(sigma_max^2 + 1),
# the variance of z_T itself): the first UNet input is then the noise itself.
x = np.asarray(noise, np.float64) * (sigmas[0] if cfg.timestep_spacing != "leading"
                                     else np.sqrt(sigmas[0] ** 2 + 1))
for i in range(num_steps):
    x = x + (sigmas[i + 1] - sigmas[i]) * eps_hat(x, i)
by_hand = pipe.decode(jnp.asarray(x, jnp.float32))[0]             # at sigma = 0, x is z_0

library = pipe.text_to_image(prompt, scheduler="euler", num_steps=num_steps, guidance_scale=w,
                             latents=noise)[0]
difference = np.abs(by_hand.astype(int) - library.astype(int)).max()
print(f"Euler by hand vs jaxsd's 'euler': largest difference {difference} / 255")
assert difference <= 1, "the hand-written Euler loop should match the library to rounding"

# %% [markdown]
# The first step goes from $\sigma = 4096$ to $\sigma = 51.6$ in one stride. That is fine for
# Euler: from pure noise, $x + (\sigma_1 - \sigma_0)\hat\epsilon$ is almost exactly the model's
# guess of the clean latents plus $\sigma_1$ times the noise, the same point DDIM would reach.

# %% [markdown]
# ## 3. All 15 solvers, one seed
#
# jaxsd has 17 samplers; two of them, `lcm` and `tcd`, are for consistency-distilled models
# (LCM, LCM-LoRA, TCD), which jump to a clean estimate in one evaluation, and are left out here:
# the other 15 solve the diffusion ODE or SDE of an ordinary model like this one.
#
# Every sampler starts from the same noise. The deterministic ones solve the same ODE and land
# near each other; the stochastic ones (`ddpm`, `euler_a`, `dpm2_a`, `dpmpp_2m_sde`,
# `dpmpp_sde`) follow an SDE whose fresh noise takes them elsewhere. Heun, DPM2, DPM2 a and
# DPM++ SDE spend two UNet evaluations per step ($2N - 1$ in all), PNDM one extra. In jaxsd each
# call is one compiled `lax.scan`: the first call of a sampler compiles, the second only runs.
#
# Only seven of the fifteen can run this model's own schedule: the diffusers classes of the
# other eight have no `rescale_betas_zero_snr`, and jaxsd refuses to run a sampler on a schedule
# its reference cannot express (`make_plan` says which, below). To show them anyway, they run
# here on the schedule *without* the rescaling, marked with a star: the same timesteps, but every
# $\bar\alpha_t$ a little different from what the model was trained on, and a start at
# $\sigma = 14.6$ where the model expects pure noise.

# %%
solvers = [name for name in jaxsd.SAMPLERS if name not in ("lcm", "tcd")]
refused = {}
for name in solvers:
    try:
        jaxsd.make_plan(name, num_steps, cfg)
    except ValueError as error:
        refused[name] = str(error)
print(f"refused on this model's schedule: {sorted(refused) or 'none'}")
for name, why in list(refused.items())[:1]:
    print(f"  e.g. {why}")
unrescaled = dataclasses.replace(cfg, rescale_betas_zero_snr=False)

images, labels = [], []
print(f"{'sampler':14s} {'evals':>5s} {'seconds':>8s}  the judge sees")
for name in solvers:
    pipe.schedule = unrescaled if name in refused else cfg
    kwargs = {"scheduler": name, "num_steps": num_steps, "guidance_scale": w, "latents": noise}
    pipe.text_to_image(prompt, **kwargs)                           # compile
    start = time.perf_counter()
    image = pipe.text_to_image(prompt, **kwargs)[0]
    seconds = time.perf_counter() - start
    evals = jaxsd.make_plan(name, num_steps, pipe.schedule).timesteps.shape[0]
    j = evaluate.judge(image)
    seen = (f"{shapes.COLOR_NAMES[j.fg]} {shapes.SHAPES[j.shape]} on {shapes.COLOR_NAMES[j.bg]}"
            if j.fg >= 0 else f"only {shapes.COLOR_NAMES[j.bg]}")
    star = "*" if name in refused else ""
    print(f"{name + star:14s} {evals:5d} {seconds:8.2f}  {seen}")
    images.append(image)
    labels.append(f"{name}{star}, {evals} evals")
pipe.schedule = cfg
grid = jaxsd.image_grid(images, labels=labels, columns=8, scale=3,
                        title=f"every sampler, {num_steps} steps, one seed (* without zero SNR): {prompt}")
grid.save(out / "every_sampler.png")
grid

# %% [markdown]
# All seven samplers that can run the model's own schedule draw the large yellow square on
# purple, in the same place. The deterministic ones (ddim, euler, dpmpp_2m, unipc) solve the
# same ODE from the same noise. The stochastic ones (ddpm, euler_a, dpmpp_2m_sde) add fresh
# noise on the way; with this model and seed it changes only details of the outline. ddpm and
# euler_a give the same picture, being one update in two sets of variables, fed the same noise.
#
# The eight marked * run on the unrescaled schedule, which starts at $\sigma$ = 14.6 instead of
# 4096: the model, trained to start from pure noise, is asked about an input that should still
# hold 7% of a picture. Six of them still draw the square. PNDM and LMS, the two linear multistep
# methods, go astray: PNDM an orange square in a white halo on a mottled background (the judge,
# which reads the dominant colours, still calls it a yellow square on purple), LMS a red and
# white mess (a red cross on white, says the judge). A likely reason, not measured here: each of
# their steps extrapolates from the last four predictions, and the first ones, made on inputs
# the model never saw in training, are the worst.

# %% [markdown]
# ## 4. Inside one scan
#
# `output="trajectory"` returns the latents after every evaluation, `[E, B, 16, 16, 4]`. With
# DDIM they stay on the variance-preserving scale $z_t$, so each frame decodes directly: noise
# for the first few steps, then the colours, then the shape settling. (For the k-diffusion
# samplers the frames are $x = z_0 + \sigma \epsilon$; divide by $\sqrt{\sigma^2 + 1}$ first.)
# Each frame below is labelled with its step and the timestep $t$ the UNet was evaluated at in
# that step.

# %%
trajectory = pipe.text_to_image(prompt, scheduler="ddim", num_steps=num_steps, guidance_scale=w,
                                latents=noise, output="trajectory")                 # [25, 1, 16, 16, 4]
ddim_timesteps = jaxsd.make_plan("ddim", num_steps, cfg).timesteps                  # 999, 959, ..., 39
steps = range(0, num_steps, 3)
frames = [pipe.decode(trajectory[i])[0] for i in steps]
grid = jaxsd.image_grid(frames, labels=[f"step {i + 1}, t={int(ddim_timesteps[i])}" for i in steps],
                        scale=3, title="DDIM: the latents after every third step, decoded")
grid.save(out / "ddim_trajectory.png")
grid

# %% [markdown]
# ## 5. Accuracy against cost
#
# Take a fine solution of the ODE as the truth and measure how far each method lands from it
# with fewer steps; the error is the RMS difference of the final latents. The truth here is
# DPM-Solver++(2M) with 200 steps. How far is it from the exact solution? Halving the steps of a
# method of order $p$ divides its error by $2^p$, so the distance between its 100-step and
# 200-step solutions (printed first) is between once (first order) and three times (second
# order) the truth's own error. The model's "trailing" spacing starts every step count at
# $t = 999$, so the counts differ only in how finely they walk, not in where they start (with
# SD 1.5's "leading" spacing, 25 steps start at $t = 961$ and 100 at $t = 991$: Lin et al., 2024).

# %%
def final_latents(name, n):
    return pipe.text_to_image(prompt, scheduler=name, num_steps=n, guidance_scale=w, latents=noise,
                              output="latents")


truth = final_latents("dpmpp_2m", 200)
check = float(np.sqrt(np.mean(np.square(final_latents("dpmpp_2m", 100) - truth))))
print(f"RMS distance of DPM-Solver++(2M), 100 steps, from the truth: {check:.4f}")
counts = (10, 20, 40)
print(f"{'sampler':10s}" + "".join(f"{f'{n} steps':>19s}" for n in counts))
errors = {}
for name in ("euler", "dpmpp_2m"):
    cells = []
    for n in counts:
        evals = jaxsd.make_plan(name, n, cfg).timesteps.shape[0]
        errors[name, n] = float(np.sqrt(np.mean(np.square(final_latents(name, n) - truth))))
        cells.append(f"{errors[name, n]:.4f} ({evals:2d} evals)")
    print(f"{name:10s}" + "".join(f"{c:>19s}" for c in cells))
assert check < 0.5 * min(errors.values()), "the truth should be far closer to the exact solution than the coarse ones"
assert errors["euler", 40] < errors["euler", 20] < errors["euler", 10], "more steps should land closer"
assert errors["dpmpp_2m", 40] < errors["dpmpp_2m", 20] < errors["dpmpp_2m", 10], "more steps should land closer"
assert errors["dpmpp_2m", 40] < errors["euler", 40], "the second-order method should win by 40 steps"

# %% [markdown]
# What the table says, on this model (the figures are from the run that wrote this page; the
# ones marked "not run here" from a separate run of the same code):
#
# - At 10 steps both land far from the truth (Euler 0.99, DPM-Solver++(2M) 1.16, in units of
#   the latents' standard deviation, about 1). Doubling to 20 steps cuts the error ten times or
#   more (0.095 and 0.087), and from there DPM-Solver++(2M) is ahead (0.053 against 0.055 at 40
#   steps). Without guidance ($w = 1$, not run here) both are far closer at 10 steps, and
#   DPM-Solver++(2M) leads at every count (0.035 against 0.042 at 10 steps, 0.012 against 0.014
#   at 40): guidance 7.5 makes the model's successive guesses of $z_0$ change abruptly in the
#   first steps, and big steps follow them badly. That is a likely reason, not measured here.
# - Neither reaches its textbook rate from 20 to 40 steps (Euler's error falls 1.7 times, where a
#   first-order method's halves; DPM-Solver++(2M)'s 1.6 times, where a second-order one's
#   quarters), and the 100- and 200-step solutions are still 0.020 apart. Every step
#   count ends with one step from its last timestep (t = 99 for 10 steps, 24 for 40, 4 for 200)
#   straight to $\sigma = 0$, taking the UNet's guess $\hat z_0$ there as the answer. With timesteps
#   spaced evenly in $t$, that last $\sigma$ shrinks only like $1/\sqrt{n}$, so the error of this
#   final jump, about $\sigma_{last}^2$, shrinks like $1/n$ for every solver. This too is a
#   reading of the figures, not a measurement; the Karras et al. (2022) spacing
#   (`karras=True`) fixes the last $\sigma$ instead, but from $\sigma_{max}$ = 4096 it spends
#   two thirds of its steps above $\sigma$ = 15. On this model it helps Euler at 10 steps and
#   hurts at 20 and 40 (not run here: 0.85, 0.109, 0.067).
