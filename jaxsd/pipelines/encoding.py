"""What the pipelines compute around the sampler: prompts -> embeddings, pixels <-> scaled
latents, and the classifier-free-guided denoiser that the sampler calls.

These are pure functions of the modules and their parameters; ``stable_diffusion.py`` jits
them once per pipeline and composes them into text-to-image, image-to-image and inpainting.

Classifier-free guidance (Ho & Salimans, 2022) runs the UNet once on a batch of 2B, the
unconditional (negative prompt) half first, as diffusers does:

    eps = eps_uncond + w (eps_cond - eps_uncond)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsd.models.unet import AddedCond, guidance_scale_embedding


class PromptEmbeddings(NamedTuple):
    cond: Any                  # [B, 77, D] the prompts' CLIP embeddings, one row per image (SDXL:
                               # an XLConditioning of arrays with B rows)
    uncond: Any | None         # the same for the negative prompts; None without guidance

    @property
    def batch(self) -> int:
        return jax.tree.leaves(self.cond)[0].shape[0]


class XLConditioning(NamedTuple):
    """What an SDXL UNet is conditioned on, per image."""
    text: jax.Array            # [B, 77, 2048] both encoders' penultimate states, concatenated
    added: AddedCond           # pooled [B, 1280] (the bigG's text_embeds), time_ids [B, 6] (or 5)


# ---------------------------------------------------------------------------------------------
# Text

def encode_text(text_encoder, params, ids_BT, clip_skip=None):
    """Token ids [B, 77] -> the per-token embeddings [B, 77, D] the UNet attends to."""
    out = text_encoder.apply({"params": params}, ids_BT, output_hidden_states=clip_skip is not None)
    if clip_skip is None:
        return out.last_hidden_state
    # clip_skip: the output of layer L - clip_skip, through the final LayerNorm (as diffusers).
    return final_norm(text_encoder, params, out.hidden_states[-(clip_skip + 1)])


def encode_text_xl(text_encoder, params, ids_BT, clip_skip=None):
    """SDXL: token ids [B, 77] -> (the output of layer L - 1 - clip_skip, without the final
    LayerNorm [B, 77, D]; the projected pooled output [B, P], None for an encoder without one)."""
    out = text_encoder.apply({"params": params}, ids_BT, output_hidden_states=True)
    return out.hidden_states[-((clip_skip or 0) + 2)], out.text_embeds


def final_norm(text_encoder, params, hidden_BTD):
    """CLIP's final LayerNorm applied to an intermediate layer's output (for clip_skip)."""
    cfg = text_encoder.config
    norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=text_encoder.dtype)
    return norm.apply({"params": params["final_norm"]}, hidden_BTD)


def negative_prompts(negative_prompt, P: int) -> list[str]:
    """None, one string, or one per prompt -> P negative prompts ("" is the unconditional one)."""
    if negative_prompt is None:
        return [""] * P
    if isinstance(negative_prompt, str):
        return [negative_prompt] * P
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
        raise ValueError(f"negative_prompt={negative_prompt!r} must be None, a string or a list of strings")
    if len(negative_prompt) != P:
        raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but there are {P} "
                         f"prompts; pass one negative prompt, or one per prompt")
    return list(negative_prompt)


# ---------------------------------------------------------------------------------------------
# Pixels <-> scaled latents: z ~ q(z|x), then (z - shift) * scaling_factor, and back

def encode_image(vae, params, pixels_BHWC, key):
    """float pixels in [-1, 1] -> scaled latents sampled from the posterior [B, H/8, W/8, C]."""
    cfg = vae.config
    posterior = vae.apply({"params": params}, pixels_BHWC, method=vae.encode)
    return (posterior.sample(key) - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def decode_latents(vae, params, latents_BhwC):
    """Scaled latents -> float pixels in about [-1, 1] [B, h*8, w*8, 3]."""
    cfg = vae.config
    z = latents_BhwC / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    return vae.apply({"params": params}, z, method=vae.decode)


# ---------------------------------------------------------------------------------------------
# The denoiser the sampler calls

def rescale_noise_cfg(guided, cond, guidance_rescale):
    """Lin et al. 2023 ("Common Diffusion Noise Schedules...") sec. 3.4: match the guided
    prediction's std to the conditional one's, then mix: phi * rescaled + (1 - phi) * guided."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)     # torch.std is unbiased
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def guided_model_fn(unet, guidance: bool, rescale: bool, extra: bool, embedded: bool = False):
    """``model_fn(x, t, params, context, w, phi, extra_channels)`` for ``sampling.sample``.

    :param guidance: run the UNet on [uncond; cond] and mix with scale w.
    :param rescale: rescale the guided prediction with phi (``rescale_noise_cfg``).
    :param extra: append ``extra_channels`` to the UNet input (the 9-channel inpainting UNet).
    :param embedded: an LCM UNet (``time_cond_proj_dim``): the guidance scale goes in as an
        embedding of w - 1 instead (one UNet pass; diffusers' StableDiffusionPipeline does this
        whenever the UNet has ``time_cond_proj_dim``).
    """
    def model_fn(x, t, params, context, w, phi, extra_channels):
        x_in = jnp.concatenate([x, x]) if guidance else x   # [uncond; cond]
        if extra:  # 9-channel inpainting UNet: latents | mask | masked-image latents
            x_in = jnp.concatenate([x_in, extra_channels.astype(x_in.dtype)], axis=-1)
        cond = ()
        if embedded:
            w_B = jnp.full((x_in.shape[0],), w - 1, jnp.float32)
            cond = (guidance_scale_embedding(w_B, unet.config.time_cond_proj_dim),)
        if isinstance(context, XLConditioning):  # SDXL: the pooled text and sizes join the time embedding
            out = unet.apply({"params": params}, x_in, t, context.text, *cond, added_cond=context.added)
        else:
            out = unet.apply({"params": params}, x_in, t, context, *cond)
        out = out.astype(jnp.float32)
        if not guidance:
            return out
        uncond, cond = jnp.split(out, 2)
        guided = uncond + w * (cond - uncond)
        return rescale_noise_cfg(guided, cond, phi) if rescale else guided

    return model_fn


def paste_known_region(x, i, image_latents, mask, noise, noise_a, noise_b):
    """4-channel inpainting, after evaluation i: keep x where mask = 1, elsewhere the image's
    latents noised to the level of evaluation i + 1 (clean after the last), as diffusers does."""
    E = noise_a.shape[0]
    j = jnp.minimum(i + 1, E - 1)
    noised = noise_a[j] * image_latents + noise_b[j] * noise
    known = jnp.where(i + 1 < E, noised, image_latents)
    return (1 - mask) * known + mask * x
