# %% [markdown]
# # Performance: what jit, lax.scan and bfloat16 buy
#
# The same picture, drawn several ways, timed as this tutorial runs: without `jit`, with the UNet
# jitted inside a Python loop, as jaxsd's one compiled `lax.scan`; cold (compiling) and warm; in
# float32 and bfloat16; one image at a time and in batches. Then one step of a UNet with Stable
# Diffusion 1.5's real configuration, where the work is large enough for the hardware to matter.
# Every figure in the final table was measured by this run, on the machine it names.
#
# Run it as a script (`python tutorials/performance.py`, about seven minutes on two busy CPU
# cores) or open it as a notebook. On a busy machine the times grow; the table prints the load
# average.

# %%
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsd
from jaxsd.models.unet import SD15, UNet
from jaxsd.sampling import loop, schedule

machine = f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs ({platform.machine()})"
print("device:", machine, "| jax", jax.__version__)
print("load average before:", os.getloadavg()[0])
table = []                    # (what, seconds per image, note)
out = Path("outputs")
out.mkdir(exist_ok=True)


def seconds(fn, repeats=5):
    """Median wall time of fn() over `repeats` calls, waiting for the device to finish."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


prompt, steps = "a large red circle on a blue background", 25

# %% [markdown]
# ## Cold and warm
#
# The first call of a jitted function traces it to a graph, and XLA compiles the graph for the
# device; later calls with arguments of the same shapes and dtypes run the compiled program
# directly. jaxsd's whole sampling loop (25 guided UNet calls, the sampler's arithmetic) is one
# such program, so the first picture pays the compilation and the second does not.

# %%
pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
cold = seconds(lambda: pipe.text_to_image(prompt, num_steps=steps), repeats=1)
warm = seconds(lambda: pipe.text_to_image(prompt, num_steps=steps))
print(f"first call {cold:.2f} s, then {warm:.3f} s: compiling costs {cold - warm:.1f} s")
table += [("one lax.scan, cold (first call: compiles)", cold, ""),
          ("one lax.scan, warm", warm, "")]

# %% [markdown]
# ## What triggers a recompile
#
# The compiled program is specialised to the *static* things: array shapes and dtypes, and the
# Python values jaxsd marks static (the sampler, whether guidance runs). Everything else is an
# input to the same program. So a new prompt, seed or guidance scale runs warm; a new step count
# (the scan's length), batch size or image size, another sampler, or guidance switched off
# (`guidance_scale=1` runs the UNet once per step instead of twice) compiles again, once, and is
# then cached for the rest of the process.

# %%
compiled = loop._sample_jit._cache_size
cases = [("new prompt", dict(prompt="a small green square on a white background")),
         ("new seed", dict(seed=5)),
         ("new guidance scale", dict(guidance_scale=5.0)),
         ("new step count", dict(num_steps=20)),
         ("new batch size", dict(batch_size=2)),
         ("guidance off", dict(guidance_scale=1.0))]
for what, change in cases:
    kwargs = dict(num_steps=steps) | change
    text = kwargs.pop("prompt", prompt)
    before = compiled()
    took = seconds(lambda: pipe.text_to_image(text, **kwargs), repeats=1)
    print(f"  {what:20s} {took:6.2f} s   {'recompiled' if compiled() > before else 'warm'}")

# %% [markdown]
# ## Without `jit`
#
# Called without `jit`, a flax module runs operation by operation: each convolution, norm and
# matmul is dispatched from Python on its own, with its intermediate written out to memory. With
# `jit`, XLA sees the whole UNet at once and fuses what it can: GroupNorm, SiLU, the residual
# adds and the time-embedding add run inside the neighbouring kernels instead of as separate
# passes over memory. The loop below is DDIM by hand (as in the *Denoising by
# hand* tutorial), first with the raw UNet, then with it jitted; the sampler arithmetic
# between the calls stays in NumPy in both.

# %%
cfg = pipe.schedule
abar = schedule.alphas_cumprod(cfg)
timesteps = schedule.spaced_timesteps(cfg.timestep_spacing or "leading", steps, 1000, cfg.steps_offset)
ids = jnp.asarray(jaxsd.tokenize(pipe.tokenizer, ["", prompt]))
context = pipe.text_encoder.apply({"params": pipe.text_params}, ids).last_hidden_state   # [2, 77, 64]


def ddim_by_hand(unet_fn, n=steps):
    """n DDIM steps of the first n timesteps, the UNet called through unet_fn."""
    z = np.asarray(jax.random.normal(jax.random.key(0), (1, 16, 16, 4)))
    for i, t in enumerate(timesteps[:n]):
        e, p = np.split(np.asarray(unet_fn(np.concatenate([z, z]), np.full((2,), t), context)), 2)
        out = e + 7.5 * (p - e)
        a = abar[t]
        a_prev = abar[t - 1000 // steps] if t >= 1000 // steps else abar[0]
        if cfg.prediction_type == "v_prediction":
            z0, eps = np.sqrt(a) * z - np.sqrt(1 - a) * out, np.sqrt(a) * out + np.sqrt(1 - a) * z
        else:
            eps = out
            z0 = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)
        z = np.sqrt(a_prev) * z0 + np.sqrt(1 - a_prev) * eps
    return z


raw = lambda x, t, c: pipe.unet.apply({"params": pipe.unet_params}, x, t, c)
first_eager = seconds(lambda: ddim_by_hand(raw, n=1), repeats=1)   # each operation compiles on first use
eager = seconds(lambda: ddim_by_hand(raw, n=1), repeats=1) * steps   # one warm step, times 25
jitted = jax.jit(raw)
ddim_by_hand(jitted, n=1)                                                    # compile
python_loop = seconds(lambda: ddim_by_hand(jitted))
scan_latents = seconds(lambda: pipe.text_to_image(prompt, num_steps=steps, output="latents"))
print(f"no jit: first step {first_eager:.1f} s, then {eager / steps:.2f} s a step, {eager:.1f} s per image")
print(f"jitted UNet in a Python loop: {python_loop:.3f} s; one lax.scan to the same latents: {scan_latents:.3f} s")
table += [("no jit (op by op), Python loop", eager, "a warm step times 25 (the first step: "
           f"{first_eager:.0f} s, compiling each operation)"),
          ("jitted UNet, Python loop", python_loop, "latents only; sampler arithmetic in NumPy"),
          ("one lax.scan, warm, latents only", scan_latents, "the same work as the line above")]

# %% [markdown]
# Compare the last two lines: the same 25 guided steps to the same latents (no text encoding, no
# VAE decoding), as a Python loop around a jitted UNet and as one `lax.scan`. On a CPU they come
# out close, either way round within the noise of a shared machine: a step of this model is about
# 20 ms of arithmetic, and a Python-side dispatch costs well under a millisecond. What the scan
# removes is exactly that per-step cost: the host never waits between steps, the latents never
# travel back to Python. On a GPU, where a small model's step takes a millisecond or two,
# dispatch and synchronisation are a large part of each step, and the scan wins clearly.

# %% [markdown]
# ## float32 and bfloat16
#
# `dtype=jnp.bfloat16` stores the weights and runs the networks in bfloat16: half the memory and,
# on GPUs and TPUs, the fast matrix units. The sampler's arithmetic stays float32 whatever the
# model's dtype: near the end of sampling the update of a step is a small difference of large
# numbers (sigma goes to 0 and the latents barely change), and bfloat16's 8 bits of mantissa would
# round it away. jaxsd casts the UNet's output to float32 before the sampler sees it, as diffusers
# does. On a CPU without bfloat16 matrix instructions it is seldom much faster, and it can be
# slower (the conversions cost time); the table says what this machine does.

# %%
pipe_bf16 = jaxsd.StableDiffusion.from_pretrained("tiny-shapes", dtype=jnp.bfloat16)
image32 = pipe.text_to_image(prompt, num_steps=steps)
image16 = pipe_bf16.text_to_image(prompt, num_steps=steps)                   # compile
bf16 = seconds(lambda: pipe_bf16.text_to_image(prompt, num_steps=steps))
difference = np.abs(image32.astype(int) - image16.astype(int))
print(f"bfloat16: {bf16:.3f} s (float32 {warm:.3f} s); pixels differ by {difference.mean():.1f} / 255 on average")
table.append(("one lax.scan, warm, bfloat16", bf16, f"mean pixel difference {difference.mean():.1f} / 255"))
grid = jaxsd.image_grid([image32[0], image16[0]], labels=["float32", "bfloat16"], scale=3)
grid.save(out / "performance_bfloat16.png")
grid

# %% [markdown]
# ## Batch size
#
# A batch runs the same program over more images at once. Per image it is cheaper while the
# device has idle capacity (on a GPU, until the matrix units are full); on two CPU cores a
# 16 x 16 latent already keeps them busy, so the gain is small.

# %%
for batch in (1, 8):
    pipe.text_to_image(prompt, num_steps=steps, batch_size=batch)           # compile
    per_image = seconds(lambda: pipe.text_to_image(prompt, num_steps=steps, batch_size=batch)) / batch
    print(f"batch {batch:2d}: {per_image:.3f} s per image")
    table.append((f"one lax.scan, warm, batch {batch}", per_image, "per image"))

# %% [markdown]
# ## Stable Diffusion 1.5's UNet, one step
#
# `tiny-shapes` is small enough that overheads matter; SD 1.5's UNet (860 million parameters,
# about 0.8 TFLOP per call at a 64 x 64 latent, that is 512 x 512 pixels) is where the arithmetic
# dominates. Here it is with random weights (the speed does not depend on their values), one call
# on one latent, jitted, cold and warm, in float32.

# %%
unet15 = UNet(SD15)
shapes15 = jax.eval_shape(unet15.init, jax.random.key(0), *unet15.example_inputs())["params"]
leaves, treedef = jax.tree_util.tree_flatten(shapes15)
keys = jax.random.split(jax.random.key(0), len(leaves))
params15 = jax.tree_util.tree_unflatten(treedef, [0.02 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
print(f"SD 1.5 UNet: {sum(x.size for x in leaves) / 1e6:.0f} M parameters")
x15 = jax.random.normal(jax.random.key(1), (1, 64, 64, 4))
text15 = jax.random.normal(jax.random.key(2), (1, 77, 768))
call = jax.jit(lambda p, x, c: unet15.apply({"params": p}, x, jnp.array([500]), c))
first = seconds(lambda: call(params15, x15, text15), repeats=1)
step = seconds(lambda: call(params15, x15, text15), repeats=2)
print(f"float32: first call {first:.1f} s (compiles), then {step:.2f} s per call")
table += [("SD 1.5 UNet, one call, 512 px, cold", first, "compiles"),
          ("SD 1.5 UNet, one call, 512 px, warm", step, f"about {0.85 / step:.3f} TFLOP/s")]

# %% [markdown]
# ## The table
#
# Seconds per image for `tiny-shapes` (25 steps, guidance 7.5, 64 x 64), seconds per call for SD
# 1.5's UNet, as measured above.

# %%
print(f"device: {machine}; load average after: {os.getloadavg()[0]:.2f}")
print(f"| {'what':46s} | {'seconds':>8s} | note |")
print(f"| {'-' * 46} | {'-' * 8} | --- |")
for what, s, note in table:
    print(f"| {what:46s} | {s:8.3f} | {note} |")

# %% [markdown]
# ## On a GPU
#
# A GPU changes the proportions, not the lessons: compilation still happens once per shape, the
# scan still removes the host from the loop, and bfloat16 becomes the fast path. jaxsd's measured
# figures live in `benchmarks/RESULTS.md`, side by side with diffusers on the same machine. So far
# they are CPU figures only (SD 1.5's UNet, one guided step: jaxsd 1.08-1.20x diffusers' time on a
# 2-core AMD EPYC); no GPU figure has been measured yet, and none is quoted here.
