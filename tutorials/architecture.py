# %% [markdown]
# # Inside the model
#
# Stable Diffusion is three networks. This tutorial opens each one of jaxsd's built-in
# `tiny-shapes` model and looks inside: what the VAE does to a picture and to a photograph, what
# the text encoder makes of a prompt, how the UNet is built and what one call of it returns. Then
# it runs the sampling loop by hand once more, this time with the LMS sampler and its
# coefficients computed here, and checks the result against jaxsd's `lms` sampler.
#
# `tiny-shapes` has SD's architecture at a small size (64 x 64 pixels, 16 x 16 latents, 64-wide
# text vectors); SD 1.5's sizes are given beside it. Run it as a script (`python
# tutorials/architecture.py`, about two minutes on two CPU cores) or open it as a notebook.

# %%
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

import jaxsd
from jaxsd.sampling import schedule

pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
out = Path("outputs")
out.mkdir(exist_ok=True)


def count(tree) -> int:
    """Number of parameters in a pytree of arrays."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


print(f"parameters: text encoder {count(pipe.text_params):,}, UNet {count(pipe.unet_params):,}, "
      f"VAE {count(pipe.vae_params):,}")

# %% [markdown]
# ## 1. The VAE: pixels <-> latents
#
# The UNet never sees pixels. The VAE's encoder maps a picture [H, W, 3] in [-1, 1] to a Gaussian
# over latents [H/f, W/f, 4] (f = 4 here, 8 in SD), and its decoder maps latents back. Diffusion
# runs on latents multiplied by `scaling_factor`, chosen so that they have unit variance.
#
# Two pictures go through it: a shape scene of the kind it was trained on, drawn with PIL, and a
# real photograph (scikit-image's `astronaut`), shrunk to 128 x 128.

# %%
import skimage.data

scene = Image.new("RGB", (64, 64), (40, 60, 200))
ImageDraw.Draw(scene).polygon([(32, 10), (54, 50), (10, 50)], fill=(250, 220, 30))
photo = Image.fromarray(skimage.data.astronaut()).resize((128, 128), Image.LANCZOS)

vae, f = pipe.vae, pipe.vae_factor


def round_trip(picture):
    """picture -> (latent mean [h, w, 4], decoded picture uint8 [H, W, 3])."""
    pixels = jnp.asarray(np.asarray(picture), jnp.float32)[None] / 127.5 - 1.0      # [1, H, W, 3]
    posterior = vae.apply({"params": pipe.vae_params}, pixels, method=vae.encode)
    latents = posterior.mean                                                         # [1, H/f, W/f, 4]
    decoded = vae.apply({"params": pipe.vae_params}, latents, method=vae.decode)
    return np.asarray(latents[0]), np.asarray(jnp.clip((decoded[0] + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


for name, picture in (("scene", scene), ("photo", photo)):
    latents, decoded = round_trip(picture)
    ratio = np.asarray(picture).size / latents.size
    error = np.abs(decoded.astype(int) - np.asarray(picture).astype(int)).mean()
    print(f"{name}: pixels {np.asarray(picture).shape} -> latents {latents.shape} ({ratio:.0f}x fewer numbers); "
          f"mean error after decoding {error:.1f} / 255")

# %% [markdown]
# The four latent channels, each shown as a grey picture (stretched to its own range), then the
# decoded result. The latents are a small picture themselves: the shape's outline is visible in
# every channel, and the channels split colour and brightness between them. On the photograph the
# decoder can only paint what it learned from shapes: flat areas in its few colours.

# %%
rows, labels = [], []
for name, picture in (("scene", scene), ("photo", photo.resize((64, 64), Image.LANCZOS))):
    latents, decoded = round_trip(picture)
    channels = [(latents[..., c] - latents[..., c].min()) / np.ptp(latents[..., c]) for c in range(4)]
    channels = [np.asarray(Image.fromarray((255 * ch).astype(np.uint8)).resize((64, 64), Image.NEAREST))
                for ch in channels]
    rows += [np.asarray(picture)] + [np.stack([ch] * 3, -1) for ch in channels] + [decoded]
    labels += [name] + [f"latent channel {c}" for c in range(4)] + ["decoded"]
grid = jaxsd.image_grid(rows, labels=labels, columns=6, scale=2)
grid.save(out / "architecture_vae.png")
grid

# %% [markdown]
# ## 2. The text encoder: a prompt -> 77 vectors
#
# CLIP's tokenizer splits the prompt into byte-pair pieces, adds a start and an end token and
# pads to 77. The encoder (a causal transformer: each position attends only to itself and the
# positions before it) returns one vector per position, [77, D] (D = 64 here, 768 in SD 1.5).
# The UNet reads all 77.

# %%
prompt = "a large red circle on a blue background, top left"
ids = jaxsd.tokenize(pipe.tokenizer, [prompt])[0]
length = int(np.argmax(ids == pipe.tokenizer.eos_token_id)) + 1
print("pieces:", pipe.tokenizer.convert_ids_to_tokens(ids[:length].tolist()))
print("ids:   ", ids[:length].tolist(), f"... then {77 - length} padding ids")


def encode(prompts):
    ids = jnp.asarray(jaxsd.tokenize(pipe.tokenizer, prompts))
    return pipe.text_encoder.apply({"params": pipe.text_params}, ids)


hidden = encode([prompt]).last_hidden_state
print("hidden states:", hidden.shape)

# %% [markdown]
# Which positions move when one word changes? Change "red" to "green" and measure how far each
# position's vector moves. Because the attention is causal, the positions before the changed word
# do not move at all; the word itself and everything after it do, the padding included: the
# padding positions attend to the whole prompt, and they carry part of its meaning to the UNet.

# %%
a, b = encode([prompt, prompt.replace("red", "green")]).last_hidden_state
moved = np.linalg.norm(np.asarray(a - b), axis=-1)                       # [77]
pieces = pipe.tokenizer.convert_ids_to_tokens(ids[:length + 2].tolist())
for k, piece in enumerate(pieces):
    print(f"  position {k:2d}  {piece:>14s}  moved {moved[k]:6.3f}")
print(f"  positions {length + 2}-76 (padding): mean {moved[length + 2:].mean():.3f}")
assert moved[:3].max() == 0, "positions before the changed word cannot move (causal attention)"

# %% [markdown]
# The end token's vector is CLIP's summary of the whole prompt (`pooler_output`: the hidden state
# at the first end token). Cosine similarity between the summaries of a few prompts: prompts that
# share words sit closer.

# %%
prompts = ["a red circle on a blue background", "a red square on a blue background",
           "a green circle on a blue background", "a yellow triangle on a white background", ""]
pooled = np.asarray(encode(prompts).pooler_output)                       # [5, 64]
unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
similarity = unit @ unit.T
print(" " * 42 + "".join(f"{k:>7d}" for k in range(len(prompts))))
for k, p in enumerate(prompts):
    print(f"{k} {repr(p):40s}" + "".join(f"{s:7.2f}" for s in similarity[k]))

# %% [markdown]
# ## 3. The UNet: (noisy latents, t, text) -> the noise
#
# Its configuration, the same fields as diffusers' `UNet2DConditionModel` config (SD 1.5 in the
# last column):

# %%
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_attention=(True, True, True, False), heads=8, cross_attention_dim=768,
            in_channels=4, out_channels=4, norm_num_groups=32, time_embedding_dim=1280)
cfg = pipe.unet.config
print(f"{'field':22s} {'tiny-shapes':>22s} {'SD 1.5':>22s}")
for field in ("block_out_channels", "layers_per_block", "down_attention", "heads", "cross_attention_dim",
              "in_channels", "out_channels", "norm_num_groups", "time_embedding_dim"):
    print(f"{field:22s} {str(getattr(cfg, field)):>22s} {str(SD15.get(field, '')):>22s}")

# %% [markdown]
# Parameters per block. jaxsd names the blocks flatly: `down_<level>_res_<i>` (ResNet blocks),
# `down_<level>_attn_<i>` (spatial transformers: self-attention, cross-attention to the text,
# feed-forward), `down_<level>_downsample`, then `mid_*`, then `up_*` in reverse.

# %%
groups = {}
for name, subtree in pipe.unet_params.items():
    group = ("_".join(name.split("_")[:2]) if name.startswith(("down", "up"))
             else "mid" if name.startswith("mid") else name)
    groups[group] = groups.get(group, 0) + count(subtree)
total = count(pipe.unet_params)
for group, n in groups.items():
    print(f"  {group:10s} {n:9,d}  {100 * n / total:5.1f}%")

# %% [markdown]
# One call, with every block's output recorded (flax's `capture_intermediates`). The down path
# halves the resolution twice (16 -> 8 -> 4); the up path doubles it back. The skip connections
# are what makes it a U: the output of `conv_in` and of every down block is kept and concatenated
# to the input of one up ResNet block, so the fine detail of the way down reaches the way up.

# %%
z = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
context = encode([prompt]).last_hidden_state
prediction, state = pipe.unet.apply({"params": pipe.unet_params}, z, jnp.array([500]), context,
                                    capture_intermediates=True, mutable=["intermediates"])
for name, record in state["intermediates"].items():
    if name != "__call__":
        print(f"  {name:18s} -> {tuple(record['__call__'][0].shape)}")
print("output:", prediction.shape, f"std {float(prediction.std()):.3f} (unit-variance noise would be 1)")

# %% [markdown]
# ## 4. The loop by hand, with LMS
#
# The *Denoising by hand* tutorial writes the loop with DDIM. The Stable Diffusion article
# this tutorial follows used LMS, the linear multistep sampler of k-diffusion (Karras et al., 2022):
# in the noise level $\sigma$ the sampling ODE is $dx/d\sigma = (x - \hat x_0(x, \sigma)) / \sigma$,
# and LMS integrates it like Adams-Bashforth: the slope is a polynomial through the last four
# slopes, and each step integrates that polynomial from $\sigma_i$ to $\sigma_{i+1}$:
#
# $$x_{i+1} = x_i + \sum_{j=0}^{3} c_{ij}\, d_{i-j}, \qquad c_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} \prod_{k \ne j} \frac{\tau - \sigma_{i-k}}{\sigma_{i-j} - \sigma_{i-k}}\, d\tau$$
#
# (fewer terms in the first three steps, when fewer slopes exist).

# %%
sched = pipe.schedule
if sched.rescale_betas_zero_snr:
    # diffusers' LMSDiscreteScheduler has no zero-terminal-SNR schedule (sigma_max would be
    # infinite), so jaxsd's 'lms' refuses one; the lesson runs on the unrescaled schedule.
    import dataclasses
    sched = dataclasses.replace(sched, rescale_betas_zero_snr=False)
num_steps, w = 25, 7.5
spacing = sched.timestep_spacing or "linspace"                            # diffusers' LMS default
timesteps = schedule.spaced_timesteps(spacing, num_steps, 1000, sched.steps_offset, integer=False)
abar = schedule.alphas_cumprod(sched)                                     # [1000]
sigmas_train = np.sqrt((1 - abar) / abar)                                 # sigma_t, t = 0..999
sigmas = np.append(np.interp(timesteps, np.arange(1000), sigmas_train), 0.0)  # [26], descending to 0
# float32, as diffusers stores them: the coefficients below must see the same numbers
sigmas = sigmas.astype(np.float32).astype(np.float64)


def lms_coefficient(i, j, order):
    """c_ij: the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial j
    through sigma_i, ..., sigma_{i-order+1}, integrated exactly (it is a polynomial)."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.poly1d(others, r=True) / np.prod([sigmas[i - j] - s for s in others])
    antiderivative = basis.integ()
    return antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])


for i in (0, 1, 2, 3, 24):
    order = min(i + 1, 4)
    print(f"step {i:2d}: sigma {sigmas[i]:7.3f} -> {sigmas[i + 1]:6.3f}, coefficients "
          + " ".join(f"{lms_coefficient(i, j, order):+.4f}" for j in range(order)))

# %% [markdown]
# The loop itself. The UNet wants its input on the variance-preserving scale, $x/\sqrt{\sigma^2+1}$,
# and the timestep; from its output and $x$ we get $\hat x_0$ (for a v-predicting UNet,
# $\hat x_0 = x/(\sigma^2+1) - \sigma\, v/\sqrt{\sigma^2+1}$), then the slope.

# %%
embeddings = encode(["", "a large red circle on a blue background"]).last_hidden_state   # [2, 77, 64]
unet = jax.jit(lambda x, t, c: pipe.unet.apply({"params": pipe.unet_params}, x, t, c))
noise = jax.random.normal(jax.random.key(1), (1, 16, 16, 4))
# diffusers' start: sigma_max for linspace/trailing spacing, sqrt(sigma_max^2 + 1) for leading
x = noise * (sigmas[0] if spacing != "leading" else np.sqrt(sigmas[0] ** 2 + 1))
slopes = []                                                              # newest first
for i in range(num_steps):
    s = sigmas[i]
    x_in = x / np.sqrt(s**2 + 1)
    out_empty, out_prompt = jnp.split(unet(jnp.concatenate([x_in, x_in]), jnp.full((2,), timesteps[i]),
                                           embeddings), 2)
    out_guided = out_empty + w * (out_prompt - out_empty)
    if sched.prediction_type == "v_prediction":
        x0_hat = x / (s**2 + 1) - s * out_guided / np.sqrt(s**2 + 1)
    else:
        x0_hat = x - s * out_guided
    slopes.insert(0, (x - x0_hat) / s)
    order = min(i + 1, 4)
    x = x + sum(lms_coefficient(i, j, order) * slopes[j] for j in range(order))
by_hand = pipe.decode(x)[0]

original = pipe.schedule
pipe.schedule = sched
library = pipe.text_to_image("a large red circle on a blue background", scheduler="lms", num_steps=num_steps,
                             guidance_scale=w, latents=noise)[0]
pipe.schedule = original
difference = np.abs(by_hand.astype(int) - library.astype(int)).max()
print(f"LMS by hand vs jaxsd's 'lms': largest difference {difference} / 255")
assert difference <= 1, "the hand-written LMS loop should match the library to rounding"
grid = jaxsd.image_grid([by_hand, library], labels=["LMS by hand", "jaxsd 'lms'"], scale=3)
grid.save(out / "architecture_lms.png")
grid

# %% [markdown]
# The two agree, which is the point of this section: the coefficients above are all there is to
# LMS. The picture itself is poor, a ragged red blob where the prompt asks for a large circle
# at the top left, not the shapes of the *Quickstart*: `tiny-shapes` was trained to start from pure noise (zero terminal SNR, sigma
# infinite), and this schedule starts at sigma 14.6, where the model expects to see about 7% of
# the picture in its input. It does not find it, and its first predictions go astray. On the
# model's own schedule only the samplers whose diffusers class can express it run (the
# *Schedulers* tutorial).
