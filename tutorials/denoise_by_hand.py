"""Tutorial: Stable Diffusion's denoising loop, written out by hand.

    python tutorials/denoise_by_hand.py ["a prompt"]          # offline, about a minute on 2 CPU cores

A latent diffusion model is three networks and a loop. This script opens jaxsd's built-in
`tiny-shapes` model (the same VAE, CLIP text encoder and UNet classes as Stable Diffusion, at a
tiny size: docs/tiny_model.md) and draws one image with nothing but those networks, NumPy and
a Python `for` loop: no scheduler class, no pipeline. At the end it asks the pipeline for the same
image and checks that the two agree, so every line below is the real thing.

The steps:
    1. text   -> token ids -> CLIP -> one 64-wide vector per token         [2, 77, 64]
    2. noise  z_T ~ N(0, I) in the VAE's latent space                       [1, 16, 16, 4]
    3. 25 times: the UNet predicts the noise in z_t, with and without the prompt;
       guidance pushes the prediction towards the prompt; a DDIM step removes some noise
    4. latents -> the VAE's decoder -> pixels                               [1, 64, 64, 3]
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import jaxsd

prompt = sys.argv[1] if len(sys.argv) > 1 else "a large red circle on a blue background"
pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")

# -------------------------------------------------------------------------------------------
# 1. The prompt, as CLIP sees it.
#
# The tokenizer turns text into at most 77 ids: a start token, the words' byte-pair pieces, an
# end token, then padding. Classifier-free guidance needs a second, empty prompt: the model's
# idea of "any image", from which the prompt's direction is measured.
ids = jaxsd.tokenize(pipe.tokenizer, ["", prompt])                      # [2, 77] int32
print("token ids of the prompt:", ids[1][:12], "...")
text = pipe.text_encoder.apply({"params": pipe.text_params}, jnp.asarray(ids))
context = text.last_hidden_state                                          # [2, 77, 64]
print("CLIP output (the UNet's context):", context.shape)

# -------------------------------------------------------------------------------------------
# 2. The noise schedule, and the starting point.
#
# Training added noise in 1000 small steps, beta_t from 0.00085 to 0.012 on a square-root scale
# ("scaled_linear", as SD). What matters is the cumulative product abar_t = prod (1 - beta_s):
#     z_t = sqrt(abar_t) * z_0 + sqrt(1 - abar_t) * eps,        eps ~ N(0, I)
# At t = 999, abar is 0.0047: z_T is almost pure noise, which is where sampling starts.
betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
abar = np.cumprod(1.0 - betas)

# 25 of the 1000 timesteps, evenly spaced, shifted by SD's steps_offset = 1 ("leading" spacing,
# what the model's scheduler_config.json asks for): 961, 921, ..., 41, 1.
num_steps = 25
timesteps = np.arange(num_steps)[::-1] * (1000 // num_steps) + 1

f = pipe.vae_factor                                                       # 4: pixels per latent
z = jax.random.normal(jax.random.key(0), (1, 64 // f, 64 // f, 4))        # [1, 16, 16, 4] NHWC

# -------------------------------------------------------------------------------------------
# 3. The loop.
#
# The UNet eps_theta(z_t, t, context) predicts the noise in z_t. From it, DDIM (Song et al.,
# 2021, eq. 12, with eta = 0) estimates the clean latents and steps to the previous timestep:
#     z0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
#     z_prev = sqrt(abar_prev) z0_hat + sqrt(1 - abar_prev) eps
# Guidance (Ho & Salimans, 2022) runs the UNet on the empty and the real prompt together and
# extrapolates: eps = eps_empty + w (eps_prompt - eps_empty), w = 7.5.
w = 7.5
unet = jax.jit(lambda x, t, c: pipe.unet.apply({"params": pipe.unet_params}, x, t, c))
for i, t in enumerate(timesteps):
    eps_empty, eps_prompt = jnp.split(unet(jnp.concatenate([z, z]), jnp.full((2,), t), context), 2)
    eps = eps_empty + w * (eps_prompt - eps_empty)
    # the last step lands on abar_0, not 1 (set_alpha_to_one = False in SD's config)
    abar_t, abar_prev = abar[t], abar[t - 1000 // num_steps] if i + 1 < num_steps else abar[0]
    z0_hat = (z - np.sqrt(1 - abar_t) * eps) / np.sqrt(abar_t)
    z = np.sqrt(abar_prev) * z0_hat + np.sqrt(1 - abar_prev) * eps
    if i % 8 == 0 or i + 1 == num_steps:
        print(f"step {i + 1:2d}/{num_steps}  t = {t:3d}  latents std {float(z.std()):.3f}")

# -------------------------------------------------------------------------------------------
# 4. Back to pixels.
#
# The UNet worked on latents scaled to unit variance; the VAE wants them unscaled. Its decoder
# quadruples the resolution (f = 4 here, 8 in SD) and returns pixels in [-1, 1].
vae = pipe.vae
pixels = vae.apply({"params": pipe.vae_params}, z / vae.config.scaling_factor, method=vae.decode)
image = np.asarray(jnp.clip((pixels[0] + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)   # [64, 64, 3]
out = Path("outputs")
out.mkdir(exist_ok=True)
Image.fromarray(image).save(out / "denoise_by_hand.png")
print("wrote", out / "denoise_by_hand.png")

# -------------------------------------------------------------------------------------------
# The same image from the pipeline: same noise, the DDIM sampler, 25 steps, w = 7.5.
same = pipe.text_to_image(prompt, scheduler="ddim", num_steps=num_steps, guidance_scale=w,
                          latents=jax.random.normal(jax.random.key(0), (1, 16, 16, 4)))[0]
difference = np.abs(same.astype(int) - image.astype(int)).max()
print(f"largest difference from the pipeline's image: {difference} / 255")
assert difference <= 1, "the hand-written loop should match the pipeline to rounding"
