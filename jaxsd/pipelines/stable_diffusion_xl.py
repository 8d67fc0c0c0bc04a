"""Stable Diffusion XL (Podell et al., 2023): text-to-image, image-to-image, inpainting and the
refiner, exact to diffusers' ``StableDiffusionXL*Pipeline``.

    pipe = StableDiffusion.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")  # -> StableDiffusionXL
    images = pipe.text_to_image("an astronaut riding a horse", seed=0)     # uint8 [1, 1024, 1024, 3]

The loop, the samplers, the VAE and the entry points are SD's (``stable_diffusion.py``); what
SDXL changes is what the UNet is conditioned on (docs/sdxl.md):

    text      two encoders, CLIP ViT-L and OpenCLIP ViT-bigG; each one's penultimate layer output
              (no final LayerNorm), concatenated                              [B, 77, 768 + 1280]
    pooled    the bigG's projected pooled output (its ``text_embeds``)        [B, 1280]
    time_ids  micro-conditioning: (original h, w, crop top, left, target h, w) [B, 6];
              the refiner: (original h, w, crop top, left, aesthetic score)    [B, 5]

The refiner has only the bigG encoder. ``force_zeros_for_empty_prompt`` (model_index.json):
without a negative prompt the unconditional embeddings are zeros, not the empty prompt's.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.checkpoints.files import CheckpointError
from jaxsd.checkpoints.tokenizer import tokenize
from jaxsd.models.unet import AddedCond
from jaxsd.pipelines import encoding
from jaxsd.pipelines.encoding import PromptEmbeddings, XLConditioning
from jaxsd.pipelines.stable_diffusion import StableDiffusion, _is_real, unexpected_arguments

logger = logging.getLogger(__name__)

# SDXL's micro-conditioning arguments, with what each defaults to (diffusers' names and defaults).
CONDITIONING = {
    "prompt_2": None,                    # the bigG's prompt; default ``prompt``
    "negative_prompt_2": None,           # default ``negative_prompt``
    "pooled_prompt_embeds": None,        # [P, 1280], with prompt_embeds
    "negative_pooled_prompt_embeds": None,
    "original_size": None,               # (height, width); default the output size
    "crops_coords_top_left": (0, 0),
    "target_size": None,                 # default the output size
    "negative_original_size": None,
    "negative_crops_coords_top_left": (0, 0),
    "negative_target_size": None,
    "aesthetic_score": 6.0,              # the refiner's (requires_aesthetics_score)
    "negative_aesthetic_score": 2.5,
}


class StableDiffusionXL(StableDiffusion):
    """An SDXL checkpoint (base, refiner or Turbo). The entry points are
    :class:`StableDiffusion`'s, with SDXL's defaults (``DEFAULTS``) and these further keyword
    arguments (``CONDITIONING`` lists them with their defaults):

    - ``prompt_2``, ``negative_prompt_2``: the prompts of the second (bigG) encoder (one string,
      or one per prompt); default ``prompt`` and ``negative_prompt``.
    - ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``: [P, 1280], required with
      ``prompt_embeds`` / ``negative_prompt_embeds`` [P, 77, 2048].
    - ``original_size``, ``crops_coords_top_left``, ``target_size``: (height, width), (top, left)
      and (height, width) in pixels; default the output size, (0, 0) and the output size.
    - ``negative_original_size``, ``negative_crops_coords_top_left``, ``negative_target_size``:
      the same for the unconditional half (diffusers' rules for when they apply, docs/sdxl.md).
    - ``aesthetic_score``, ``negative_aesthetic_score``: the refiner's, 6.0 and 2.5.
    """

    CONDITIONING_NAMES = tuple(CONDITIONING)
    DEFAULTS = {"text_to_image": {"guidance_scale": 5.0},
                "image_to_image": {"guidance_scale": 5.0, "strength": 0.3},
                "inpaint": {"guidance_scale": 7.5, "strength": 0.9999}}

    def __init__(self, components, dtype=jnp.float32, devices=None):
        super().__init__(components, dtype, devices)
        c = components
        self.tokenizer_2, self.text_encoder_2, self.text_params_2 = c.tokenizer_2, c.text_encoder_2, c.text_params_2
        flags = c.pipeline_config or {}
        self.force_zeros_for_empty_prompt = flags.get("force_zeros_for_empty_prompt", True)
        self.requires_aesthetics_score = flags.get("requires_aesthetics_score", False)
        self._encode_text_2_jit = jax.jit(functools.partial(encoding.encode_text_xl, self.text_encoder_2),
                                          static_argnames="clip_skip")
        self._encode_text_1_jit = (None if self.text_encoder is None else jax.jit(
            functools.partial(encoding.encode_text_xl, self.text_encoder), static_argnames="clip_skip"))
        if jnp.dtype(dtype) == jnp.float16 and self.vae.config.force_upcast:
            # SDXL's VAE overflows float16: it encodes and decodes in float32 (as diffusers'
            # needs_upcasting); bfloat16 has float32's range and needs nothing.
            self.vae = type(self.vae)(self.vae.config, dtype=jnp.float32)
            self.vae_params = jax.tree.map(lambda p: p.astype(jnp.float32), self.vae_params)
            self._encode_image_jit = jax.jit(functools.partial(encoding.encode_image, self.vae))
            self._decode_jit = jax.jit(functools.partial(encoding.decode_latents, self.vae))
        ids = (5 if self.requires_aesthetics_score else 6)
        need = self.text_encoder_2.config.projection_dim + ids * self.unet.config.addition_time_embed_dim
        if need != self.unet.config.projection_class_embeddings_input_dim:
            raise CheckpointError(
                f"{c.source}: the UNet's projection_class_embeddings_input_dim is "
                f"{self.unet.config.projection_class_embeddings_input_dim}, but the pooled text "
                f"({self.text_encoder_2.config.projection_dim}) and {ids} numbers x "
                f"{self.unet.config.addition_time_embed_dim} give {need} (model_index.json's "
                f"requires_aesthetics_score={self.requires_aesthetics_score})")

    @classmethod
    def handles(cls, components) -> bool:
        return components.is_xl

    def info_architecture(self) -> str:
        kind = "refiner" if self.requires_aesthetics_score else "base"
        arch = f"Stable Diffusion XL ({kind})"
        if self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1:
            arch += ", inpainting (9-channel UNet)"
        return arch

    def info(self):
        info = super().info()
        info["parameters"]["text_encoder_2"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.text_params_2)))
        return info

    def with_lora(self, *args, **kwargs):
        raise NotImplementedError("LoRAs for SDXL checkpoints are not implemented yet in jaxsd "
                                  "(with_lora merges into SD 1.x/2.x pipelines)")

    def with_embedding(self, *args, **kwargs):
        raise NotImplementedError("textual-inversion embeddings for SDXL checkpoints are not implemented "
                                  "yet in jaxsd (with_embedding works on SD 1.x/2.x pipelines)")

    # -----------------------------------------------------------------------------------------
    # Text

    def encode_prompt(self, prompt=None, negative_prompt=None, *, prompt_2=None, negative_prompt_2=None,
                      batch_size: int | None = None, guidance: bool = True, clip_skip: int | None = None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None) -> PromptEmbeddings:
        """Prompts -> (text [B, 77, 2048], pooled [B, 1280]) per image, as diffusers'
        ``StableDiffusionXLPipeline.encode_prompt``; ``PromptEmbeddings`` of ``XLConditioning``
        whose ``time_ids`` are filled in by the entry points (they depend on the size)."""
        prompts, P, batch_size = self._prompts_and_batch(prompt, prompt_embeds, batch_size)
        layers = min(e.config.num_hidden_layers for e in (self.text_encoder, self.text_encoder_2) if e is not None)
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)
                                      or not 0 <= clip_skip < layers - 1):
            raise ValueError(f"clip_skip={clip_skip!r} must be an integer in [0, {layers - 2}] (layers to "
                             f"skip before the penultimate one)")

        if prompt_embeds is None:
            # prompt_2: one string for every prompt, or one per prompt (default: the prompts)
            prompts_2 = self._prompts_and_batch(prompt_2, None, None, "prompt_2")[0] if prompt_2 else prompts
            prompts_2 = prompts_2 * P if len(prompts_2) == 1 else prompts_2
            if len(prompts_2) != P:
                raise ValueError(f"prompt_2 has {len(prompts_2)} entries but there are {P} prompts; pass "
                                 f"one string, or one per prompt")
            cond = self._encode_pair(prompts, prompts_2, clip_skip)
        else:
            cond = self._given("prompt_embeds", prompt_embeds, "pooled_prompt_embeds", pooled_prompt_embeds, P)
        uncond = None
        negatives_given = [n for n, v in (("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2),
                                          ("negative_prompt_embeds", negative_prompt_embeds)) if v is not None]
        if not guidance and negatives_given:
            logger.warning("%s not used: there is no classifier-free guidance (guidance_scale <= 1)",
                           " and ".join(negatives_given))
        if guidance:
            if negative_prompt_embeds is not None:
                uncond = self._given("negative_prompt_embeds", negative_prompt_embeds,
                                     "negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, P)
            elif negative_prompt is None and self.force_zeros_for_empty_prompt:
                uncond = (jnp.zeros_like(cond[0]), jnp.zeros_like(cond[1]))  # not the empty prompt
            else:
                negative = negative_prompt or ""
                negatives = encoding.negative_prompts(negative, P)
                negatives_2 = encoding.negative_prompts(negative_prompt_2 or negative, P)
                uncond = self._encode_pair(negatives, negatives_2, None)
        repeat = lambda pair: XLConditioning(jnp.repeat(pair[0], batch_size // P, axis=0),
                                             AddedCond(jnp.repeat(pair[1], batch_size // P, axis=0), None))
        return PromptEmbeddings(repeat(cond), None if uncond is None else repeat(uncond))

    def _encode_pair(self, prompts, prompts_2, clip_skip):
        """(text [P, 77, 768 + 1280], pooled [P, 1280]): encoder 1 reads ``prompts``, the bigG
        ``prompts_2``; the refiner's bigG alone reads ``prompts`` (as diffusers' zip does)."""
        parts = []
        if self.text_encoder is not None:
            hidden, _ = self._encode_text_1_jit(self.text_params, tokenize(self.tokenizer, prompts), clip_skip)
            parts.append(hidden)
        ids_2 = tokenize(self.tokenizer_2, prompts_2 if self.text_encoder is not None else prompts)
        hidden_2, pooled = self._encode_text_2_jit(self.text_params_2, ids_2, clip_skip)
        return jnp.concatenate([*parts, hidden_2], axis=-1), pooled

    def _given(self, name, embeds, pooled_name, pooled, P):
        D, W = self.unet.config.cross_attention_dim, self.text_encoder_2.config.projection_dim
        embeds = jnp.asarray(embeds)
        if embeds.ndim != 3 or embeds.shape[0] != P or embeds.shape[-1] != D:
            raise ValueError(f"{name} has shape {embeds.shape}; expected [{P}, 77, {D}]")
        if pooled is None:
            raise ValueError(f"{name} needs {pooled_name} [{P}, {W}] too (SDXL conditions on the pooled "
                             f"text as well), as diffusers requires")
        pooled = jnp.asarray(pooled)
        if pooled.shape != (P, W):
            raise ValueError(f"{pooled_name} has shape {pooled.shape}; expected [{P}, {W}]")
        return embeds, pooled

    # -----------------------------------------------------------------------------------------
    # The micro-conditioning

    def _encode(self, kind, height, width, conditioning, prompt, negative_prompt, **kw) -> PromptEmbeddings:
        unknown = sorted(set(conditioning) - set(CONDITIONING))
        if unknown:
            raise TypeError(f"{unexpected_arguments(kind, unknown)}; SDXL's further arguments "
                            f"are {list(CONDITIONING)}")
        if kind == "text_to_image" and self.requires_aesthetics_score:
            raise ValueError(f"{self.source!r} is an SDXL refiner (requires_aesthetics_score): it refines "
                             f"images; use image_to_image or inpaint (diffusers' text-to-image pipeline "
                             f"cannot run it either)")
        scores = sorted({"aesthetic_score", "negative_aesthetic_score"} & set(conditioning))
        if scores and (kind == "text_to_image" or not self.requires_aesthetics_score):
            logger.warning("%s not used: only a refiner (requires_aesthetics_score) is conditioned on "
                           "aesthetic scores, in image_to_image and inpaint", " and ".join(scores))
        c = {**CONDITIONING, **conditioning}
        emb = self.encode_prompt(prompt, negative_prompt, prompt_2=c["prompt_2"],
                                 negative_prompt_2=c["negative_prompt_2"],
                                 pooled_prompt_embeds=c["pooled_prompt_embeds"],
                                 negative_pooled_prompt_embeds=c["negative_pooled_prompt_embeds"], **kw)
        ids, negative_ids = self.time_ids(kind, height, width, c)
        B = emb.batch
        with_ids = lambda x, row: None if x is None else XLConditioning(
            x.text, AddedCond(x.added.text_embeds, jnp.tile(jnp.asarray(row, jnp.float32), (B, 1))))
        return PromptEmbeddings(with_ids(emb.cond, ids), with_ids(emb.uncond, negative_ids))

    def time_ids(self, kind: str, height: int, width: int, c: dict) -> tuple[list, list]:
        """The micro-conditioning numbers of the images and of the unconditional half, by
        diffusers' rules: text-to-image uses the negative sizes only when both are given;
        image-to-image and inpainting default them to the positive ones (and, without the
        aesthetic score, take the positive crop)."""
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            value = c[name]
            if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2
                                      or not all(_is_real(v) for v in value)):
                raise ValueError(f"{name}={value!r} must be a pair of numbers (height, width) or (top, left)")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not _is_real(c[name]):
                raise ValueError(f"{name}={c[name]!r} must be a finite number")
        size = (height, width)
        original, target = tuple(c["original_size"] or size), tuple(c["target_size"] or size)
        crop, negative_crop = tuple(c["crops_coords_top_left"]), tuple(c["negative_crops_coords_top_left"])
        negative_original, negative_target = c["negative_original_size"], c["negative_target_size"]
        if kind == "text_to_image":
            ids = original + crop + target
            both = negative_original is not None and negative_target is not None
            negative = tuple(negative_original) + negative_crop + tuple(negative_target) if both else ids
            return list(ids), list(negative)
        negative_original = tuple(negative_original or original)
        negative_target = tuple(negative_target or target)
        if self.requires_aesthetics_score:
            return (list(original + crop + (c["aesthetic_score"],)),
                    list(negative_original + negative_crop + (c["negative_aesthetic_score"],)))
        return list(original + crop + target), list(negative_original + crop + negative_target)
