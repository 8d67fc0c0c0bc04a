"""Stable Diffusion pipelines: text-to-image, image-to-image and inpainting, exact to diffusers.

    pipe = StableDiffusion.from_pretrained("path/or/hub-id")
    images = pipe.text_to_image("a photograph of an astronaut riding a horse", seed=0)  # uint8 [1, 512, 512, 3]

One generation is three jitted programs, each compiled once per shape (and sampler, steps) and
reused: the text encoder, the sampling loop (one ``lax.scan`` over every UNet evaluation, see
``jaxsd/sampling/loop.py``), and the VAE decoder. Guidance scale, seed, prompt, strength and eta
are traced values: changing them never recompiles. The pieces they jit (prompt encoding, the
VAE's scaling, the classifier-free-guided denoiser) are in ``encoding.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import runtime, sampling
from jaxsd.checkpoints import sources
from jaxsd.checkpoints.files import CheckpointError
from jaxsd.checkpoints.tokenizer import tokenize
from jaxsd.pipelines import encoding
from jaxsd.pipelines import images as imgs
from jaxsd.pipelines.encoding import PromptEmbeddings
from jaxsd.sampling.schedule import SCHEDULE_NAMES, ScheduleConfig, _check_choice, named_schedule

logger = logging.getLogger(__name__)

OUTPUTS = ("images", "latents", "trajectory")
NO_KARRAS = ("ddim", "ddpm", "pndm", "euler_a")  # samplers whose diffusers scheduler has no use_karras_sigmas


# The largest height or width jaxsd accepts. SD's VAE decoder holds a few float32 tensors of
# 128 channels at full resolution: at 8192 x 8192 one is 34 GB. Larger sizes used to abort the
# process inside XLA instead of failing with a message.
MAX_SIDE = 8192


def _is_real(value) -> bool:
    """A finite real number: Python or NumPy int/float, not bool, not a string."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


def key_from_seed(seed) -> jax.Array:
    """A PRNG key from an integer seed in [0, 2**64 - 1] (NumPy's range).

    ``jax.random.key(seed)`` keeps only the low 32 bits unless 64-bit mode is on (seed 2**32 gives
    seed 0's key) and overflows above 2**63; building the key from the seed's two 32-bit halves
    gives every seed its own key, and the same key as ``jax.random.key`` below 2**32.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**64 - 1]")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed} must be in [0, 2**64 - 1]")
    return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))



def check_side(name: str, value, vae_factor: int, latent_multiple: int) -> None:
    """One image side against a model's whole size rule, in one message (ValueError).

    ``name`` prefixes the value in the message (``"height="``, ``"--size 64x100: width "``);
    ``vae_factor`` is the VAE's pixels per latent (8 for SD), ``latent_multiple`` what the
    UNet's halvings need of the latent side (2 ** (levels - 1)). Shared by the pipeline and the
    command line, which checks ``--size`` from the configs before loading the model."""
    f, m = vae_factor, vae_factor * latent_multiple
    rule = (f"a positive multiple of {m} for this model (the VAE turns {f} x {f} pixels into one "
            f"latent and the UNet halves the latent side {latent_multiple.bit_length() - 1} "
            f"times: {f} x {latent_multiple} = {m}), at most {MAX_SIDE}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}{value!r} must be an integer: {rule}")
    if value <= 0 or value % m or value > MAX_SIDE:
        example = min(max(m, value // m * m), MAX_SIDE // m * m)
        raise ValueError(f"{name}{value} must be {rule}; e.g. {example}")

# diffusers' names for arguments jaxsd spells differently: an unexpected argument of one of these
# names is answered with jaxsd's.
DIFFUSERS_NAMES = {
    "num_inference_steps": "num_steps",
    "num_images_per_prompt": "batch_size (the number of images in all: n x the number of prompts)",
    "generator": "seed (an integer, or a list of one per image)",
    "output_type": 'output ("images", "latents" or "trajectory")',
    "mask_image": "mask (the second positional argument of inpaint)",
}


def unexpected_arguments(kind: str, names, why: dict | None = None) -> str:
    """The TypeError message for keyword arguments that ``kind()`` does not take; ``why`` gives
    the reason for names the caller knows more about (SDXL's arguments on an SD 1.x pipeline)."""
    names, why = sorted(names), why or {}
    parts = [f"{n}: {why[n]}" if n in why else f"{n} is {DIFFUSERS_NAMES[n]} in jaxsd"
             for n in names if n in why or n in DIFFUSERS_NAMES]
    others = [n for n in names if n not in why and n not in DIFFUSERS_NAMES]
    if others:
        parts.append(f"{', '.join(others)}: not among its arguments (help(StableDiffusion.{kind}) "
                     f"lists them)")
    return f"{kind}() got unexpected argument(s) {names}; " + "; ".join(parts)


class StableDiffusion:
    """A loaded checkpoint: the modules, their parameters, the tokenizer and the schedule."""

    def __init__(self, components: sources.Components, dtype=jnp.float32, devices=None):
        c = components
        self.tokenizer = c.tokenizer
        self.text_encoder, self.text_params = c.text_encoder, c.text_params
        self.unet, self.unet_params = c.unet, c.unet_params
        self.vae, self.vae_params = c.vae, c.vae_params
        self.scheduler_config = c.scheduler_config
        try:
            self.schedule = ScheduleConfig.from_config(c.scheduler_config)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"the scheduler config (scheduler/scheduler_config.json) of "
                                  f"{c.source!r} is not usable: {error}") from None
        try:
            self.scheduler = sampling.default_sampler(c.scheduler_config)  # the checkpoint's default
        except ValueError as e:
            raise CheckpointError(f"{c.source}: {e}") from None
        self.source, self.dtype = c.source, dtype
        self.vae_factor = self.vae.config.downsample_factor           # 8: pixels per latent
        self.latent_multiple = 2 ** (self.unet.config.levels - 1)     # the UNet halves h, w L-1 times
        # text_to_image's default size: the UNet's native one (unet/config.json's sample_size, as
        # diffusers), 512 when the checkpoint does not say
        self.default_size = c.sample_size * self.vae_factor if c.sample_size else 512
        self._encode_text_jit = jax.jit(functools.partial(encoding.encode_text, self.text_encoder),
                                        static_argnames="clip_skip")
        self._encode_image_jit = jax.jit(functools.partial(encoding.encode_image, self.vae))
        self._decode_jit = jax.jit(functools.partial(encoding.decode_latents, self.vae))
        self._model_fns: dict = {}   # (guidance, rescale, extra channels) -> model_fn (static in jit)
        self.loras: tuple = ()       # (file, scale) of each LoRA merged in by with_lora
        self.embeddings: dict = {}   # token -> vectors, of each embedding added by with_embedding
        # The devices a batch is split over (None: all of jax.devices(); one device: no split).
        self.devices = None if devices is None else tuple(devices)
        runtime.batch_mesh(self.devices)  # an empty list is refused here, not at the first image
        self._replicas: dict = {}    # (parameter tree name, mesh) -> (tree, its replicated copy)

    @classmethod
    def from_pretrained(cls, source, dtype=jnp.float32, *, revision: str | None = None,
                        variant: str | None = None, allow_pickle: bool = False, devices=None,
                        **overrides) -> "StableDiffusion":
        """Load a diffusers folder, a Hugging Face Hub id or an original single-file checkpoint.
        An SDXL checkpoint (one with ``text_encoder_2``) gives a :class:`StableDiffusionXL`.

        :param dtype: compute and parameter dtype (jnp.float32, jnp.bfloat16 or jnp.float16).
        :param revision: Hub branch, tag or commit.
        :param variant: weight files variant, e.g. ``"fp16"``.
        :param allow_pickle: read ``.ckpt``/``.bin`` pickle files (can run arbitrary code).
        :param devices: the devices each batch is split over (data parallel; default None: every
            device of ``jax.devices()``, all hosts after ``jaxsd.runtime.initialize_distributed``);
            ``[jax.devices()[0]]`` runs on one. Settable later as ``pipe.devices``.
        :param overrides: single-file architecture overrides (see ``jaxsd.checkpoints.single_file``).
        """
        components = sources.load(source, dtype, revision=revision, variant=variant,
                                  allow_pickle=allow_pickle, overrides=overrides or None)
        # One entry point for every family: the class that handles these components (an SDXL
        # checkpoint gives a StableDiffusionXL, whichever class this is called on; docs/sdxl.md).
        family = next((sub for sub in cls._families() if sub.handles(components)), StableDiffusion)
        if not issubclass(family, cls):
            raise CheckpointError(f"{str(source)!r} is a {family.__name__} checkpoint, not a {cls.__name__} "
                                  f"one; load it with StableDiffusion.from_pretrained")
        return family(components, dtype, devices=devices)

    @classmethod
    def handles(cls, components: sources.Components) -> bool:
        """Whether this class runs these components (SD 1.x/2.x: no second text encoder)."""
        return not components.is_xl

    @staticmethod
    def _families() -> list:
        """The pipeline classes, most specific first (subclasses register by subclassing)."""
        found, todo = [], [StableDiffusion]
        while todo:
            klass = todo.pop()
            found.insert(0, klass)
            todo += klass.__subclasses__()
        return found

    def with_lora(self, lora, scale: float | dict = 1.0) -> "StableDiffusion":
        """A new pipeline with a LoRA merged into the text encoder and the UNet; this one is unchanged.

        Each adapted weight becomes ``W + scale * (alpha / r) * B @ A`` (diffusers'
        ``load_lora_weights`` then ``fuse_lora(lora_scale=scale)``). Call it again to stack
        several adapters, each with its own scale. To change scales without recompiling, use
        :func:`jaxsd.adapters.lora.merge` inside your own ``jax.jit`` (docs/adapters.md).

        :param lora: a ``.safetensors`` path (PEFT, diffusers or kohya-ss keys) or a list of
            :class:`jaxsd.adapters.LoraUpdate` from :func:`jaxsd.adapters.read_lora`.
        :param scale: the user's weight (A1111's ``<lora:name:scale>``); 0 leaves the weights as
            they are. A dict ``{"unet": s1, "text_encoder": s2}`` weighs the two apart (diffusers'
            ``set_adapters`` weights per component; a component left out gets 1, as there).
        """
        from jaxsd.adapters import lora as lora_lib
        from jaxsd.checkpoints import convert
        scales = dict(scale) if isinstance(scale, dict) else {"unet": scale, "text_encoder": scale}
        unknown = sorted(set(scales) - {"unet", "text_encoder"})
        if unknown:
            raise ValueError(f"scale={scale!r}: unknown component(s) {unknown}; the keys are 'unet' and "
                             "'text_encoder'")
        for value in scales.values():
            if not _is_real(value):
                raise ValueError(f"scale={scale!r} must be a real number, or a dict of them")
        scales = {"unet": 1.0, "text_encoder": 1.0, **scales}
        updates = lora if isinstance(lora, list) else lora_lib.read_lora(lora)
        tables = {"unet": convert.unet_table(self.unet.config), "text_encoder": convert.CLIP_TEXT}
        params = {"unet": self.unet_params, "text_encoder": self.text_params}
        what = f"LoRA {lora}" if not isinstance(lora, list) else "the LoRA"
        deltas = lora_lib.lora_deltas(updates, tables, params, what=what)
        new = copy.copy(self)
        new._replicas = {}
        new.unet_params = lora_lib.merge(self.unet_params, [deltas["unet"]], [scales["unet"]])
        new.text_params = lora_lib.merge(self.text_params, [deltas["text_encoder"]], [scales["text_encoder"]])
        recorded = float(scale) if not isinstance(scale, dict) else {k: float(v) for k, v in scales.items()}
        new.loras = self.loras + ((str(lora) if not isinstance(lora, list) else "<updates>", recorded),)
        return new

    def with_embedding(self, path, token: str | None = None, *, allow_pickle: bool = False) -> "StableDiffusion":
        """A new pipeline whose tokenizer and text encoder know a textual-inversion embedding.

        As diffusers' ``load_textual_inversion``: n vectors become the tokens ``token``,
        ``token_1``, ..., ``token_{n-1}`` with the next free ids, the text encoder's token table
        grows by n rows, and a prompt that says ``token`` is written out in full before
        tokenizing (negative prompts too). This pipeline is unchanged.

        :param path: a diffusers ``learned_embeds.safetensors``, an AUTOMATIC1111 ``.safetensors``
            (``emb_params``), or with ``allow_pickle=True`` an AUTOMATIC1111 ``.pt``.
        :param token: the word to use in prompts; default the file's own (for an A1111
            ``.safetensors``, its file name without the suffix).
        """
        from jaxsd.adapters import embeddings
        token, vectors = embeddings.read_embedding(path, token=token, allow_pickle=allow_pickle)
        table = self.text_params["token_embedding"]["embedding"]                  # [V, D]
        V, D = table.shape
        if vectors.shape[1] != D:
            raise embeddings.EmbeddingError(f"{path}: vectors of width {vectors.shape[1]}, but this text "
                                            f"encoder's tokens are {D} wide (an embedding for another model?)")
        tokens = embeddings.new_tokens(token, len(vectors))
        taken = [t for t in tokens if t in self.tokenizer.get_vocab()]
        if taken:
            raise embeddings.EmbeddingError(f"{path}: token(s) {taken} are already in the tokenizer's "
                                            "vocabulary; pass another token=")
        if len(self.tokenizer) != V:
            raise embeddings.EmbeddingError(f"the tokenizer has {len(self.tokenizer)} tokens but the text "
                                            f"encoder {V} rows; cannot place new tokens")
        tokenizer = copy.deepcopy(self.tokenizer)
        for t in tokens:                      # one at a time, as diffusers: ids V, V + 1, ...
            tokenizer.add_tokens(t)
        assert tokenizer.convert_tokens_to_ids(tokens) == list(range(V, V + len(tokens)))
        new = copy.copy(self)
        new._replicas = {}
        new.tokenizer = tokenizer
        config = dataclasses.replace(self.text_encoder.config, vocab_size=V + len(tokens))
        new.text_encoder = type(self.text_encoder)(config, dtype=self.text_encoder.dtype)
        grown = jnp.concatenate([table, jnp.asarray(vectors, table.dtype)])    # [V + n, D]
        new.text_params = {**self.text_params, "token_embedding": {"embedding": grown}}
        new._encode_text_jit = jax.jit(functools.partial(encoding.encode_text, new.text_encoder),
                                       static_argnames="clip_skip")
        new.embeddings = {**self.embeddings, token: len(tokens)}
        return new

    def _tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids [P, 77], multi-vector embedding tokens written out first (with_embedding)."""
        if self.embeddings:
            from jaxsd.adapters.embeddings import expand_prompt
            prompts = [expand_prompt(self.tokenizer, p) for p in prompts]
        return tokenize(self.tokenizer, prompts)

    # -----------------------------------------------------------------------------------------
    # Text

    def encode_prompt(self, prompt=None, negative_prompt=None, *, batch_size: int | None = None,
                      guidance: bool = True, clip_skip: int | None = None,
                      prompt_embeds=None, negative_prompt_embeds=None) -> PromptEmbeddings:
        """Prompts -> CLIP embeddings, one row per image (diffusers' encode_prompt).

        :param prompt: a string, or a list of P strings.
        :param negative_prompt: None (the empty prompt), a string for every prompt, or a list of P.
        :param batch_size: images in all; a multiple of P (default P). Each prompt's images are
            consecutive, as diffusers' num_images_per_prompt.
        :param guidance: also encode the negative prompts (classifier-free guidance).
        :param clip_skip: use the output of the layer clip_skip before the last (positive prompts only,
            as diffusers).
        :param prompt_embeds: precomputed [P, 77, D] embeddings instead of prompt.
        """
        prompts, P, batch_size = self._prompts_and_batch(prompt, prompt_embeds, batch_size)
        if clip_skip is not None and not 0 <= clip_skip < self.text_encoder.config.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip!r} must be an integer in [0, "
                             f"{self.text_encoder.config.num_hidden_layers - 1}] (layers to skip)")
        per_prompt = batch_size // P

        if prompt_embeds is None:
            cond = self._encode_text_jit(self.text_params, self._tokenize(prompts), clip_skip)
        else:
            cond = jnp.asarray(prompt_embeds)
            D = self.unet.config.cross_attention_dim
            if cond.ndim != 3 or cond.shape[-1] != D:
                raise ValueError(f"prompt_embeds has shape {cond.shape}; expected [prompts, 77, {D}]")
        uncond = None
        if not guidance and (negative_prompt is not None or negative_prompt_embeds is not None):
            logger.warning("the negative prompt is not used: there is no classifier-free guidance "
                           "(guidance_scale <= 1%s)", ", or a UNet that embeds the guidance scale "
                           "(time_cond_proj_dim, LCM)" if self.embeds_guidance else "")
        if guidance:
            if negative_prompt_embeds is not None:
                uncond = jnp.asarray(negative_prompt_embeds)
                if uncond.shape != cond.shape:
                    raise ValueError(f"negative_prompt_embeds has shape {uncond.shape}; it must match "
                                     f"prompt_embeds {cond.shape}")
            else:
                negatives = encoding.negative_prompts(negative_prompt, P)
                uncond = self._encode_text_jit(self.text_params, self._tokenize(negatives))
        repeat = lambda x: None if x is None else jnp.repeat(x, per_prompt, axis=0)
        return PromptEmbeddings(repeat(cond), repeat(uncond))

    @staticmethod
    def _prompts_and_batch(prompt, prompt_embeds, batch_size, name="prompt"):
        """(the prompt list or None, P prompts, images in all), after checking them."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt (text) and prompt_embeds (precomputed "
                             f"embeddings); got prompt={prompt!r} and prompt_embeds "
                             f"{'given' if prompt_embeds is not None else 'None'}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if prompt is not None and (not isinstance(prompts, (list, tuple))
                                   or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"{name}={prompt!r} must be a string or a list of strings")
        P = len(prompts) if prompt is not None else np.shape(prompt_embeds)[0]
        if P == 0:
            raise ValueError(f"{name} is an empty list")
        batch_size = P if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1 or batch_size % P:
            raise ValueError(f"batch_size={batch_size!r} must be a positive multiple of the number of "
                             f"prompts ({P}); it is the number of images in all")
        return prompts, P, batch_size

    # -----------------------------------------------------------------------------------------
    # Images <-> latents

    def encode_image(self, pixels_BHWC, key) -> jax.Array:
        """float images in [-1, 1] -> scaled latents z ~ q(z|x), times scaling_factor."""
        return self._encode_image_jit(self.vae_params, jnp.asarray(pixels_BHWC, jnp.float32), key)

    def decode(self, latents_BhwC, mesh=None) -> np.ndarray:
        """Scaled latents -> uint8 images [B, H, W, 3] (warns on NaN); with a device ``mesh``,
        latents already split over it decode on every device at once."""
        params = self.vae_params if mesh is None else self._replicated("vae_params", mesh)
        latents = latents_BhwC if mesh is not None else jnp.asarray(latents_BhwC)
        return imgs.to_uint8(runtime.to_host(self._decode_jit(params, latents)))

    # -----------------------------------------------------------------------------------------
    # The denoiser the sampler calls, and the loop

    def _model_fn(self, guidance: bool, rescale: bool, extra: bool):
        """The guided denoiser for these switches, kept so that its identity (a static jit
        argument of the sampling loop) stays the same across calls."""
        key = (guidance, rescale, extra)
        if key not in self._model_fns:
            self._model_fns[key] = encoding.guided_model_fn(self.unet, guidance, rescale, extra,
                                                            embedded=self.embeds_guidance)
        return self._model_fns[key]

    @property
    def embeds_guidance(self) -> bool:
        """An LCM UNet (``time_cond_proj_dim``) takes the guidance scale as an input embedding
        and runs once per step: no classifier-free guidance, no negative prompt (as diffusers)."""
        return self.unet.config.time_cond_proj_dim is not None

    def _cfg(self, guidance_scale) -> bool:
        """Whether classifier-free guidance runs: w > 1, unless the UNet embeds w itself."""
        return guidance_scale > 1 and not self.embeds_guidance

    def _sampler_and_schedule(self, scheduler, karras, schedule_name="default", num_steps=None):
        name = self.scheduler if scheduler is None else scheduler
        sampling.get_sampler(name)  # an error listing the choices
        schedule = self.schedule
        if schedule_name not in ("default", "karras"):
            if karras:
                raise ValueError(f"karras=True and schedule={schedule_name!r} ask for two schedules; pass one")
            return name, named_schedule(schedule, schedule_name, num_steps)
        _check_choice("schedule", schedule_name, SCHEDULE_NAMES)
        if karras or schedule_name == "karras":
            if name in NO_KARRAS:
                raise ValueError(f"karras=True: sampler {name!r} has no Karras sigmas (diffusers' "
                                 f"scheduler for it has no use_karras_sigmas); choose one of "
                                 f"{sorted(set(sampling.SAMPLERS) - set(NO_KARRAS))}")
            schedule = dataclasses.replace(schedule, use_karras_sigmas=True)
        return name, schedule

    def _check_run_args(self, num_steps, guidance_scale, guidance_rescale, eta, seed, scheduler):
        """The arguments every entry point shares, checked before any work."""
        T = self.schedule.num_train_timesteps
        if isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer)) \
                or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps={num_steps!r} must be an integer in [1, {T}] (the training steps)")
        for name, value, low, high in (("guidance_scale", guidance_scale, -math.inf, math.inf),
                                       ("guidance_rescale", guidance_rescale, 0.0, 1.0),
                                       ("eta", eta, 0.0, 1.0)):
            if not _is_real(value) or not low <= value <= high:
                where = "a finite number" if math.isinf(high) else f"a number in [{low:g}, {high:g}]"
                raise ValueError(f"{name}={value!r} must be {where}")
        sampling.check_eta(self.scheduler if scheduler is None else scheduler, eta)
        for one in (seed if isinstance(seed, (list, tuple)) else [seed]):
            key_from_seed(one)
        if isinstance(seed, (list, tuple)) and not seed:
            raise ValueError("seed=[] has no seed; pass an integer, or one per image")

    @staticmethod
    def _seed_keys(seed, B: int, n: int) -> jax.Array:
        """``n`` keys from one seed ([n]), or from a list of B per-image seeds ([n, B])."""
        if not isinstance(seed, (list, tuple)):
            return jax.random.split(key_from_seed(seed), n)
        if len(seed) != B:
            raise ValueError(f"seed has {len(seed)} entries for a batch of {B} images; pass one "
                             "seed, or one per image")
        return jnp.stack([jax.random.split(key_from_seed(s), n) for s in seed], axis=1)

    def _check_size(self, height, width):
        for name, value in (("height", height), ("width", width)):
            check_side(f"{name}=", value, self.vae_factor, self.latent_multiple)

    def _noise(self, latents, shape, key):
        if latents is None and jnp.ndim(key) == 1:  # one key per image: as a batch of one draws it
            return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(key)
        if latents is None:
            return jax.random.normal(key, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if not bool(jnp.isfinite(latents).all()):
            raise ValueError("latents holds NaN or infinite values")
        if latents.shape != shape:
            raise ValueError(f"latents has shape {latents.shape}; expected {shape} "
                             f"[batch, height/{self.vae_factor}, width/{self.vae_factor}, channels], NHWC")
        return latents

    def _run(self, emb: PromptEmbeddings, noise, *, scheduler, karras, num_steps, guidance_scale,
             guidance_rescale, eta, key, output, progress, init_latents=None, first_step=0,
             last_step=None, add_noise=True, extra=None, after_step=None, after_step_args=(),
             after_step_consts=(), schedule="default"):
        """Sample and decode. Every batch-first array (``emb``, ``noise``, ``init_latents``,
        ``extra``, ``after_step_args``) is split over the pipeline's devices when it has
        several; ``after_step_consts`` follow the batch arrays in after_step's arguments."""
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; choose one of {OUTPUTS}")
        name, schedule = self._sampler_and_schedule(scheduler, karras, schedule, num_steps)
        B = noise.shape[0]
        mesh = runtime.batch_mesh(self.devices, batch=B)
        unet_params, scalars = self.unet_params, (jnp.float32(guidance_scale), jnp.float32(guidance_rescale))
        if mesh is not None:  # data parallel: rows split over the devices, the rest replicated
            size = runtime.padded_size(B, mesh)
            shard = lambda x: None if x is None else runtime.shard_batch(x, mesh, size)
            emb = jax.tree.map(shard, emb)  # SDXL: the text, pooled text and time ids alike
            noise, init_latents, extra = shard(noise), shard(init_latents), shard(extra)
            after_step_args = tuple(shard(a) for a in after_step_args)
            unet_params = self._replicated("unet_params", mesh)
            key = shard(key) if jnp.ndim(key) == 1 else runtime.replicate(key, mesh)  # per image, or one
            scalars, after_step_consts = runtime.replicate((scalars, after_step_consts), mesh)
        guided = emb.uncond is not None
        context = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), emb.uncond, emb.cond) if guided else emb.cond
        if extra is not None and guided:
            extra = jnp.concatenate([extra, extra])
        model_fn = self._model_fn(guided, guided and guidance_rescale > 0, extra is not None)
        args = (unet_params, context, *scalars, extra)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            plan = sampling.make_plan(name, num_steps, schedule)
            bar = tqdm(total=plan.timesteps.shape[0], desc=f"{name}, {num_steps} steps", unit="eval")
        try:
            out = sampling.sample(model_fn, noise, sampler=name, num_steps=num_steps, schedule=schedule,
                                  key=key, model_args=args, eta=eta, init_latents=init_latents,
                                  first_step=first_step, last_step=last_step, add_noise=add_noise,
                                  return_trajectory=output == "trajectory",
                                  progress=bar, after_step=after_step,
                                  after_step_args=(*after_step_args, *after_step_consts))
        finally:
            if bar is not None:
                bar.close()
        if output == "trajectory":
            return runtime.to_host(out.trajectory)[:, :B]
        if output == "latents":
            return runtime.to_host(out.latents)[:B]
        return self.decode(out.latents, mesh)[:B]

    def _replicated(self, name: str, mesh):
        """``self.<name>`` (a parameter tree) on every device of ``mesh``, copied once and kept
        while the tree is the same object (with_lora and with_embedding make new trees)."""
        tree = getattr(self, name)
        kept = self._replicas.get((name, mesh))
        if kept is None or kept[0] is not tree:
            kept = self._replicas[(name, mesh)] = (tree, runtime.replicate(tree, mesh))
        return kept[1]

    # -----------------------------------------------------------------------------------------
    # The three entry points

    def text_to_image(self, prompt=None, *, negative_prompt=None, batch_size: int | None = None,
                      num_steps: int = 50, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                      scheduler: str | None = None, karras: bool = False, schedule: str = "default",
                      eta: float = 0.0, height: int | None = None, width: int | None = None,
                      seed: int = 0, latents=None,
                      clip_skip: int | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                      denoising_end: float | None = None, output: str = "images", progress: bool = False,
                      **conditioning):
        """Text -> uint8 images [B, height, width, 3] (diffusers' StableDiffusionPipeline).

        :param latents: the initial unit Gaussian noise [B, height/8, width/8, 4] (NHWC), as
            diffusers' ``latents``; default drawn from ``seed``.
        :param scheduler: a jaxsd sampler name (default: the checkpoint's scheduler).
        :param karras, schedule: the step schedule; ``karras=True`` is ``schedule="karras"``, and
            ``schedule`` takes any name of ``sampling.schedule.SCHEDULE_NAMES`` ("ays",
            "sgm_uniform", "simple", ...; formulas in docs/samplers.md).
        :param seed: an integer in [0, 2**64 - 1], or a list of one per image: then image b is
            exactly the image a one-image call with ``seed[b]`` draws (its noise, its sampler
            noise), whatever else is in the batch and however many devices share it.
        :param guidance_scale: w; classifier-free guidance runs when w > 1. Default
            ``DEFAULTS["text_to_image"]``: 7.5, as diffusers (SDXL: 5.0).
        :param height, width: in pixels; default ``self.default_size`` (the UNet's native size:
            512 for SD 1.x, 64 for the built-in tiny-shapes model).
        :param output: "images" (uint8), "latents" (the final scaled latents) or "trajectory"
            (the latents after every UNet evaluation, [E, B, h, w, 4]).
        :param denoising_end: stop when this fraction of the denoising is done (in (0, 1); the
            first model of SDXL's "ensemble of experts"): with ``output="latents"``, the unfinished
            sampler state to hand to ``image_to_image(image_latents=..., denoising_start=...)``.
        :param conditioning: SDXL's further arguments (``prompt_2``, ``original_size``, ...; see
            :class:`jaxsd.StableDiffusionXL`); refused by an SD 1.x/2.x pipeline.
        """
        guidance_scale = self._default("text_to_image", "guidance_scale", guidance_scale)
        self._check_run_args(num_steps, guidance_scale, guidance_rescale, eta, seed, scheduler)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self._check_size(height, width)
        emb = self._encode("text_to_image", height, width, conditioning, prompt, negative_prompt,
                           batch_size=batch_size, guidance=self._cfg(guidance_scale), clip_skip=clip_skip,
                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        B, f = emb.batch, self.vae_factor
        noise_key, sampler_key, _ = self._seed_keys(seed, B, 3)
        noise = self._noise(latents, (B, height // f, width // f, self.vae.config.latent_channels), noise_key)
        last_step = self._hand_off("denoising_end", denoising_end, num_steps, scheduler, karras, schedule)
        return self._run(emb, noise, scheduler=scheduler, karras=karras, schedule=schedule, num_steps=num_steps,
                         guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
                         key=sampler_key, output=output, progress=progress, last_step=last_step)

    def _hand_off(self, name, fraction, num_steps, scheduler, karras, schedule):
        """The evaluation where ``denoising_end`` stops or ``denoising_start`` starts (None: none)."""
        if fraction is None:
            return None
        sampler, schedule = self._sampler_and_schedule(scheduler, karras, schedule, num_steps)
        plan, T = sampling.make_plan(sampler, num_steps, schedule), self.schedule.num_train_timesteps
        if name == "denoising_end":
            return sampling.last_step_for_denoising_end(plan, T, fraction)
        return sampling.first_step_for_denoising_start(plan, T, fraction)

    def _prepare(self, kind, image, height, width, prompt, kw, conditioning):
        """Shared by image_to_image and inpaint: size, prompt embeddings, pixels, keys."""
        if height is None or width is None:
            dh, dw = imgs.default_size(image, self.vae_factor)
            height, width = height or dh, width or dw
        self._check_size(height, width)
        emb = self._encode(kind, height, width, conditioning, prompt, kw.pop("negative_prompt"),
                           batch_size=kw.pop("batch_size"), guidance=self._cfg(kw["guidance_scale"]),
                           clip_skip=kw.pop("clip_skip"), prompt_embeds=kw.pop("prompt_embeds"),
                           negative_prompt_embeds=kw.pop("negative_prompt_embeds"))
        keys = self._seed_keys(kw.pop("seed"), emb.batch, 4)  # noise, sampler, 2 x posterior
        return height, width, emb, keys

    # Defaults that differ between the model families, as diffusers' pipelines have them.
    DEFAULTS = {"text_to_image": {"guidance_scale": 7.5},
                "image_to_image": {"guidance_scale": 7.5, "strength": 0.8},
                "inpaint": {"guidance_scale": 7.5, "strength": 1.0}}

    def _default(self, kind: str, name: str, value):
        return self.DEFAULTS[kind][name] if value is None else value

    CONDITIONING_NAMES: tuple = ()  # a family's further keyword arguments (SDXL: prompt_2, ...)

    def _encode(self, kind, height, width, conditioning, prompt, negative_prompt, **kw) -> PromptEmbeddings:
        """The prompt embeddings for one call of ``kind`` at height x width: SD 1.x/2.x take
        none of SDXL's ``conditioning`` arguments (StableDiffusionXL overrides this)."""
        if conditioning:
            sdxl = {name for family in self._families() for name in family.CONDITIONING_NAMES}
            why = {name: f"SDXL's conditioning arguments need an SDXL checkpoint, and {self.source!r} "
                         f"is {self.info_architecture()}" for name in set(conditioning) & sdxl}
            raise TypeError(unexpected_arguments(kind, conditioning, why))
        return self.encode_prompt(prompt, negative_prompt, **kw)

    def _encode_images(self, pixels, key, B: int, what: str = "image"):
        """The images' latents for a batch of B: encoded once and repeated (one key), or with one
        key per image (a seed list), row b from image b mod n, as a one-image call would draw it."""
        if jnp.ndim(key) == 0:
            return self._tile(self.encode_image(pixels, key), B, what)
        self._tile(pixels[:, :1, :1], B, what)  # the same n | B rule and message
        n = pixels.shape[0]
        return jnp.concatenate([self.encode_image(pixels[b % n][None], key[b]) for b in range(B)])

    def _tile(self, x, B: int, what: str):
        """Repeat a batch of n images to B (n must divide B), as diffusers duplicates them."""
        n = x.shape[0]
        if B % n:
            raise ValueError(f"{n} {what}s cannot be spread over a batch of {B} images: pass one "
                             f"{what}, or as many as images")
        return jnp.concatenate([x] * (B // n))

    def _first_step(self, strength, num_steps, scheduler, karras, schedule="default"):
        if not _is_real(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must lie in (0, 1]: 1 ignores the image's "
                             f"content, small values change it little")
        if int(num_steps * strength) < 1:
            raise ValueError(f"strength={strength} with num_steps={num_steps} runs no step at all "
                             f"(int(num_steps * strength) = 0); raise one of them")
        name, schedule = self._sampler_and_schedule(scheduler, karras, schedule, num_steps)
        plan = sampling.make_plan(name, num_steps, schedule)
        return plan, sampling.first_step_for_strength(plan, num_steps, strength)

    def image_to_image(self, image=None, prompt=None, *, strength: float | None = None, negative_prompt=None,
                       batch_size: int | None = None, num_steps: int = 50, guidance_scale: float | None = None,
                       guidance_rescale: float = 0.0, scheduler: str | None = None,
                       karras: bool = False, schedule: str = "default", eta: float = 0.0,
                       height: int | None = None,
                       width: int | None = None, seed: int = 0, latents=None,
                       clip_skip: int | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                       image_latents=None, denoising_start: float | None = None,
                       denoising_end: float | None = None, output: str = "images", progress: bool = False,
                       **conditioning):
        """Image + text -> images (StableDiffusionImg2ImgPipeline): noise the image's latents to
        level ``strength`` and denoise from there, running int(num_steps * strength) steps.
        Defaults (``DEFAULTS["image_to_image"]``): strength 0.8, guidance 7.5 (SDXL: 0.3, 5.0).

        :param image: PIL image(s) or uint8 / [0, 1] float arrays; resized to height x width
            (default: its own size rounded down to a multiple of 8).
        :param latents: the unit Gaussian noise mixed into the image latents (default from seed).
        :param seed: an integer, or one per image (then image b is what a one-image call with
            ``seed[b]`` and image b mod n draws, the image's encoding included).
        :param image_latents: scaled latents [n, h, w, 4] (NHWC) instead of ``image``: no VAE
            round trip (e.g. ``text_to_image(..., denoising_end=0.8, output="latents")``).
        :param denoising_start: start where this fraction of the denoising is done, from
            ``image`` / ``image_latents`` taken as they are (no noise added; ``strength`` unused):
            the second model of SDXL's "ensemble of experts", after ``denoising_end`` (diffusers'
            rule: the evaluations with timesteps below int(round(T (1 - denoising_start)))).
        :param denoising_end: stop when this fraction is done (see text_to_image).
        """
        if (image is None) == (image_latents is None):
            raise ValueError("pass exactly one of image (pixels) and image_latents (scaled latents, NHWC)")
        if denoising_start is not None and strength is not None:
            logger.warning("strength=%s is not used: denoising_start=%s says where to start (as in "
                           "diffusers)", strength, denoising_start)
        if image_latents is not None:  # the size is the latents'
            image_latents = self._check_image_latents(image_latents)
            height, width = self._latent_size(image_latents, height, width)
        strength = self._default("image_to_image", "strength", strength)
        guidance_scale = self._default("image_to_image", "guidance_scale", guidance_scale)
        kw = dict(negative_prompt=negative_prompt, batch_size=batch_size, clip_skip=clip_skip,
                  prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                  seed=seed, guidance_scale=guidance_scale)
        self._check_run_args(num_steps, guidance_scale, guidance_rescale, eta, seed, scheduler)
        if denoising_start is None:
            _, first_step = self._first_step(strength, num_steps, scheduler, karras, schedule)
        else:
            first_step = self._hand_off("denoising_start", denoising_start, num_steps, scheduler, karras, schedule)
        last_step = self._hand_off("denoising_end", denoising_end, num_steps, scheduler, karras, schedule)
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
        height, width, emb, keys = self._prepare("image_to_image", image, height, width, prompt, kw, conditioning)
        B = emb.batch
        if image_latents is None:
            image_latents = self._encode_images(imgs.prepare_image(image, height, width), keys[2], B)
        else:
            image_latents = self._tile(image_latents, B, "image latent")
        noise = self._noise(latents, image_latents.shape, keys[0])
        return self._run(emb, noise, scheduler=scheduler, karras=karras, schedule=schedule, num_steps=num_steps,
                         guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
                         key=keys[1], output=output, progress=progress, init_latents=image_latents,
                         first_step=first_step, last_step=last_step, add_noise=denoising_start is None)

    def _check_image_latents(self, image_latents):
        x = jnp.asarray(image_latents, jnp.float32)
        C = self.vae.config.latent_channels
        if x.ndim != 4 or x.shape[-1] != C:
            raise ValueError(f"image_latents has shape {x.shape}; expected scaled latents [n, h, w, {C}] (NHWC)")
        if not bool(jnp.isfinite(x).all()):
            raise ValueError("image_latents holds NaN or infinite values")
        return x

    def _latent_size(self, image_latents, height, width):
        size = (image_latents.shape[1] * self.vae_factor, image_latents.shape[2] * self.vae_factor)
        if (height, width) not in ((None, None), size):
            raise ValueError(f"height={height}, width={width} do not match image_latents {image_latents.shape}, "
                             f"which are {size[0]} x {size[1]} pixels; leave them out")
        return size

    def inpaint(self, image, mask, prompt=None, *, strength: float | None = None, negative_prompt=None,
                batch_size: int | None = None, num_steps: int = 50, guidance_scale: float | None = None,
                scheduler: str | None = None, karras: bool = False, schedule: str = "default",
                eta: float = 0.0,
                height: int | None = None, width: int | None = None, seed: int = 0, latents=None,
                clip_skip: int | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                output: str = "images", progress: bool = False, **conditioning):
        """Repaint the white part of ``mask`` (StableDiffusionInpaintPipeline). Defaults
        (``DEFAULTS["inpaint"]``): strength 1.0, guidance 7.5 (SDXL: 0.9999, 7.5).

        9-channel inpainting UNets see the mask and the masked image's latents as extra input
        channels. Ordinary 4-channel UNets denoise everything, and after every step the known
        region is replaced by the image's latents noised to the next step's level.
        """
        strength = self._default("inpaint", "strength", strength)
        guidance_scale = self._default("inpaint", "guidance_scale", guidance_scale)
        self._check_run_args(num_steps, guidance_scale, 0.0, eta, seed, scheduler)
        imgs.check_mask_matches(image, mask)
        kw = dict(negative_prompt=negative_prompt, batch_size=batch_size, clip_skip=clip_skip,
                  prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                  seed=seed, guidance_scale=guidance_scale)
        plan, first_step = self._first_step(strength, num_steps, scheduler, karras, schedule)
        height, width, emb, keys = self._prepare("inpaint", image, height, width, prompt, kw, conditioning)
        B, f, C = emb.batch, self.vae_factor, self.vae.config.latent_channels
        pixels = imgs.prepare_image(image, height, width)
        mask_px = imgs.prepare_mask(mask, height, width)
        # The latent-space mask: nearest-neighbour downsampling (torch's F.interpolate default).
        mask_latents = self._tile(jnp.asarray(mask_px[:, ::f, ::f]), B, "mask")
        in_channels = self.unet.config.in_channels
        if in_channels not in (C, 2 * C + 1):
            raise ValueError(f"inpainting needs a UNet with {C} or {2 * C + 1} input channels; this "
                             f"one has in_channels={in_channels}")
        nine = in_channels == 2 * C + 1
        image_latents = None
        if not nine or strength < 1:
            image_latents = self._encode_images(pixels, keys[2], B)
        noise = self._noise(latents, (B, height // f, width // f, C), keys[0])
        extra = after_step = None
        after_args = ()
        if nine:
            masked = pixels * (mask_px < 0.5)
            masked_latents = self._encode_images(masked, keys[3], B)
            extra = jnp.concatenate([mask_latents, masked_latents], axis=-1)   # [B, h, w, 1 + C]
        else:
            after_step = encoding.paste_known_region
            after_args = (image_latents, mask_latents, noise)   # then the plan's noise_a, noise_b
        return self._run(emb, noise, scheduler=scheduler, karras=karras, schedule=schedule, num_steps=num_steps,
                         guidance_scale=guidance_scale, guidance_rescale=0.0, eta=eta, key=keys[1],
                         output=output, progress=progress,
                         init_latents=image_latents if strength < 1 else None,
                         first_step=first_step if strength < 1 else 0, extra=extra,
                         after_step=after_step, after_step_args=after_args,
                         after_step_consts=(plan.noise_a, plan.noise_b) if after_step else ())

    # -----------------------------------------------------------------------------------------

    def info_architecture(self) -> str:
        """The model family, from the UNet's text width (and its channels, for inpainting)."""
        D = self.unet.config.cross_attention_dim
        arch = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(D, f"custom (text width {D})")
        if self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1:
            arch += ", inpainting (9-channel UNet)"
        return arch

    def info(self) -> dict[str, Any]:
        """What this checkpoint is, for ``jaxsd info``."""
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
        why = {name: sampling.refusal(name, self.schedule) for name in sampling.SAMPLERS}
        return {
            "source": self.source, "architecture": self.info_architecture(),
            "prediction_type": self.schedule.prediction_type,
            "default_scheduler": f"{self.scheduler} ({self.scheduler_config.get('_class_name')})",
            "parameters": {"text_encoder": count(self.text_params), "unet": count(self.unet_params),
                           "vae": count(self.vae_params)},
            "dtype": jnp.dtype(self.dtype).name,
            "vae_scaling_factor": self.vae.config.scaling_factor,
            "native_size": f"{self.default_size}x{self.default_size} (sizes: multiples of "
                           f"{self.vae_factor * self.latent_multiple})",
            "samplers": ", ".join(name for name, no in why.items() if no is None),
            "samplers_refused": {name: no for name, no in why.items() if no is not None},  # {name: why}
            "device": ", ".join(f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()),
        }

