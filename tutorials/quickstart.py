# %% [markdown]
# # Quickstart
#
# Text to image in a few lines, then every knob a Stable Diffusion user turns, each with a picture.
# Everything here runs offline on a CPU with `tiny-shapes`, the 64 x 64 model built into jaxsd
# (one coloured shape on a plain background; `docs/tiny_model.md`); the same
# calls draw with any SD 1.x/2.x checkpoint.
#
# Run it as a script (`python tutorials/quickstart.py`, about three minutes on two CPU cores; the
# pictures go to `outputs/`) or open it as a notebook with jupytext.
#
# ## Install
#
# ```bash
# pip install -e .                      # from a clone of jaxsd: CPU JAX, the built-in model
# pip install -e ".[gpu]"               # or with CUDA JAX, for an NVIDIA GPU
# ```
#
# jaxsd runs on the device JAX picks: the GPU or TPU when there is one, else the CPU.

# %%
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw

import jaxsd

print("JAX runs on:", jax.devices()[0].platform)
out = Path("outputs")
out.mkdir(exist_ok=True)

# %% [markdown]
# ## Text to image
#
# `from_pretrained` takes the name of the built-in model, a diffusers folder, a Hugging Face Hub
# id or an original single-file checkpoint. `text_to_image` returns uint8 pixels,
# `[batch, height, width, 3]`.

# %%
pipe = jaxsd.StableDiffusion.from_pretrained("tiny-shapes")
images = pipe.text_to_image("a red circle on a blue background", num_steps=25, seed=0, batch_size=4)
print(images.shape, images.dtype)
Image.fromarray(images[0]).save(out / "quickstart.png")
jaxsd.image_grid(images, scale=2)

# %% [markdown]
# Four pictures, each from its own starting noise. The prompt says neither size nor place, so
# those vary. Circles are this small model's hardest shape: their outlines come out a little
# lumpy, and on 32 seeds of this prompt the judge of `docs/tiny_model.md` calls 6% of them
# rounded squares ("Quality" there has the figures per shape and per attribute).

# %% [markdown]
# A real checkpoint works the same way. The lines below run only when SD 1.5's weights are
# already in the Hugging Face cache (they are 4 GB; `huggingface-cli download
# stable-diffusion-v1-5/stable-diffusion-v1-5` fetches them), and then take about a minute per
# image on a CPU, seconds on a GPU.

# %%
from huggingface_hub import try_to_load_from_cache

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
if isinstance(try_to_load_from_cache(SD15, "unet/config.json"), str):
    sd = jaxsd.StableDiffusion.from_pretrained(SD15)
    photo = sd.text_to_image("a photograph of an astronaut riding a horse", num_steps=25, seed=0)
    Image.fromarray(photo[0]).save(out / "quickstart_sd15.png")
else:
    print(f"{SD15} is not in the Hugging Face cache; skipping the real checkpoint")

# %% [markdown]
# ## What just happened: three networks
#
# **The text encoder** (CLIP's, frozen from OpenAI's or OpenCLIP's training) turns the prompt into
# 77 vectors, one per token position: the "context" every other step reads. It was trained to put
# a caption near its picture, so its vectors already say what the picture should hold.
#
# **The UNet** is the part that draws. It works in a small latent space, not on pixels: starting
# from pure Gaussian noise it predicts, at each of `num_steps` noise levels, the noise in its
# input given the context, and a sampler (the `scheduler`) uses that prediction to remove a
# little of it. Cross-attention layers are where the context enters: every latent pixel asks which
# words concern it.
#
# **The VAE** (a variational autoencoder) is why the UNet can work small: its encoder squeezes an
# image 8 times in each direction (4 times for `tiny-shapes`) into a few channels, and its decoder
# turns the UNet's final latents back into pixels. The *Inside the model* tutorial
# opens each of the three; *Denoising by hand* writes the loop out.

# %% [markdown]
# ## The knobs
#
# **Steps.** More steps walk from noise to image in smaller strides: slower, and up to a point
# closer to what the model can draw. Few steps leave noise or blur: here 2 steps do not even
# get the colours, 5 leave a mottled background, and from 10 on the picture hardly changes.

# %%
prompt = "a large yellow square on a purple background"
counts = [2, 5, 10, 25, 50]
by_steps = [pipe.text_to_image(prompt, num_steps=n, seed=1)[0] for n in counts]
grid = jaxsd.image_grid(by_steps, labels=[f"{n} steps" for n in counts], scale=2)
grid.save(out / "quickstart_steps.png")
grid

# %% [markdown]
# **Guidance.** Classifier-free guidance runs the UNet twice per step, with the prompt and with an
# empty one, and extrapolates from the second towards the first by `guidance_scale`. At 1 the
# prompt only whispers (this model, trained on nothing but such captions, draws the square even
# then); 5 to 10 is where SD is used; much higher oversaturates, here into a mottled mess.

# %%
scales = [1.0, 3.0, 7.5, 15.0]
by_scale = [pipe.text_to_image(prompt, num_steps=25, guidance_scale=g, seed=1)[0] for g in scales]
grid = jaxsd.image_grid(by_scale, labels=[f"guidance {g:g}" for g in scales], scale=2)
grid.save(out / "quickstart_guidance.png")
grid

# %% [markdown]
# **Seed.** The seed draws the starting noise; everything after it is deterministic. Same seed,
# same picture (on the same device and dtype); another seed, another picture of the same prompt.
# `batch_size` draws several at once, each from its own noise.

# %%
batch = pipe.text_to_image("a green triangle on a white background", num_steps=25, seed=7, batch_size=4)
again = pipe.text_to_image("a green triangle on a white background", num_steps=25, seed=7, batch_size=4)
assert (batch == again).all(), "the same seed gives the same pictures"
grid = jaxsd.image_grid(batch, labels=[f"seed 7, image {i}" for i in range(4)], scale=2)
grid.save(out / "quickstart_seeds.png")
grid

# %% [markdown]
# **Sampler.** `scheduler=` picks how the noise is removed, from the 17 diffusers samplers
# (`jaxsd.SAMPLERS`); the default is the one the checkpoint's `scheduler_config.json` names.
# Fifteen solve the same equation by different numerical methods (the *Schedulers as ODE
# solvers* tutorial); the stochastic ones add fresh noise on the way (here euler_a lands close
# to the rest; with most models and prompts it draws a different picture). The
# other two, `lcm` and `tcd`, are for consistency-distilled models (LCM, TCD), in 1-8 steps.
# `tiny-shapes` was trained on a zero-terminal-SNR schedule, which seven of the fifteen can run
# (ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, unipc; lcm and tcd can too); jaxsd
# refuses the others on it with an
# error that lists these, as their diffusers classes cannot express that schedule.

# %%
names = ["euler", "ddim", "dpmpp_2m", "unipc", "euler_a"]
by_sampler = [pipe.text_to_image(prompt, num_steps=25, scheduler=s, seed=1)[0] for s in names]
grid = jaxsd.image_grid(by_sampler, labels=names, scale=2)
grid.save(out / "quickstart_samplers.png")
grid

# %% [markdown]
# **Negative prompt.** Guidance extrapolates away from the empty prompt; a negative prompt takes
# its place, so the picture is pushed away from what it names as well as towards the prompt.
# "a circle" names no colour, and this seed draws an orange one; with the negative prompt
# "orange" the lumpy round shape stays and both colours change.

# %%
plain = pipe.text_to_image("a circle", num_steps=25, seed=0)[0]
negative = pipe.text_to_image("a circle", negative_prompt="orange", num_steps=25, seed=0)[0]
grid = jaxsd.image_grid([plain, negative], labels=["'a circle'", "... negative 'orange'"], scale=3)
grid.save(out / "quickstart_negative.png")
grid

# %% [markdown]
# **Image to image.** Start from a picture instead of pure noise: it is encoded to latents, noised
# part of the way (`strength`: 0 keeps it, 1 ignores it), and denoised towards the prompt. Here
# the picture is a rough sketch drawn with PIL.

# %%
sketch = Image.new("RGB", (64, 64), (250, 250, 250))
ImageDraw.Draw(sketch).ellipse((14, 14, 50, 50), fill=(200, 30, 30))
strengths = [0.3, 0.6, 0.9]
edits = [pipe.image_to_image(sketch, "a red circle on a green background", strength=s, num_steps=25,
                             seed=0)[0] for s in strengths]
grid = jaxsd.image_grid([np.asarray(sketch)] + edits,
                        labels=["the sketch"] + [f"strength {s}" for s in strengths], scale=2)
grid.save(out / "quickstart_img2img.png")
grid

# %% [markdown]
# **Inpainting.** Repaint only the white part of a mask and keep the rest. With an ordinary
# UNet, like this one, every step replaces the kept region by the picture's own latents, noised to
# that step's level; SD's inpainting checkpoints see the mask directly. Here the middle of a
# blue square is repainted as a red circle; outside the mask the square's edges stay, blended
# into the yellow on two sides.

# %%
picture = pipe.text_to_image("a blue square on a yellow background", num_steps=25, seed=4)[0]
mask = np.zeros((64, 64), np.uint8)
mask[16:48, 16:48] = 255                              # repaint the middle
repainted = pipe.inpaint(picture, mask, "a red circle on a yellow background, center", num_steps=25,
                         seed=0)[0]
grid = jaxsd.image_grid([picture, mask, repainted], labels=["picture", "mask (white: repaint)", "inpainted"],
                        scale=2)
grid.save(out / "quickstart_inpaint.png")
grid

# %% [markdown]
# ## From the command line
#
# The same calls, as the `jaxsd` command (`jaxsd --help`, `docs/cli.md`):
#
# ```bash
# jaxsd generate "a red circle on a blue background" --steps 25 --seed 0
# jaxsd img2img sketch.png "a red circle on a green background" --strength 0.6
# jaxsd inpaint picture.png mask.png "a red circle on a yellow background, center"
# ```
