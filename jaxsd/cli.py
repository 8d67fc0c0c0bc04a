"""The ``jaxsd`` command: generate, img2img, inpaint, info, tokenize, train-tiny, evaluate.

Images are written as PNGs that carry their generation parameters in a text chunk named
``parameters``, in the format AUTOMATIC1111's web UI writes and most SD tools read:

    a photograph of an astronaut riding a horse
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15

Existing files are never overwritten: each image gets the next free number in the folder. In a
batch, image i is drawn with seed + i (as AUTOMATIC1111 does), and that is the seed it records.
"""
from __future__ import annotations

import argparse
import difflib
import io
import json
import math
import os
import re
import secrets
import sys
from pathlib import Path

# jaxsd sampler -> the name AUTOMATIC1111-style tools show ("Karras" is appended when used).
SAMPLER_LABELS = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler",
    "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2s": "DPM++ 2S",
    "dpmpp_sde": "DPM++ SDE", "unipc": "UniPC", "deis": "DEIS", "lcm": "LCM", "tcd": "TCD",
}
DTYPES = ("float32", "bfloat16", "float16")


def parameters_text(prompt, negative, *, steps, sampler, karras, guidance, seed, width, height,
                    model, extra: dict | None = None) -> str:
    """The ``parameters`` PNG text chunk, AUTOMATIC1111 style."""
    label = SAMPLER_LABELS.get(sampler, sampler) + (" Karras" if karras else "")
    fields = {"Steps": steps, "Sampler": label, "CFG scale": guidance, "Seed": seed,
              "Size": f"{width}x{height}", "Model": model, **(extra or {})}
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def _encode_png(image, parameters: str) -> io.BytesIO:
    """The PNG bytes of ``image`` with its ``parameters`` text chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG", pnginfo=info)
    return encoded


def save_png(image, folder: Path, seed: int, parameters: str) -> Path:
    """Write ``NNNNN-seed.png`` with the next free number; never overwrites."""
    folder.mkdir(parents=True, exist_ok=True)
    # Encoded to memory, then written to a hidden temporary name and linked to the final one:
    # a full disk or an interrupt leaves no truncated PNG, and os.link fails if the name exists.
    encoded = _encode_png(image, parameters)
    tmp = folder / f".{os.getpid()}-{seed}.png.tmp"
    try:
        tmp.write_bytes(encoded.getvalue())
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
        n = max(numbers, default=-1) + 1
        while True:
            path = folder / f"{n:05d}-{seed}.png"
            try:
                _place(tmp, path, encoded.getvalue())
                return path
            except FileExistsError:
                n += 1
    finally:
        tmp.unlink(missing_ok=True)


def _place(tmp: Path, path: Path, data: bytes) -> None:
    """Give the written ``tmp`` the name ``path``, never replacing a file (FileExistsError).

    A hard link is atomic. Filesystems without hard links (FAT, exFAT, some network drives)
    refuse it; there the bytes are written again under an exclusive create, and a failed write
    removes the partial file."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:   # EPERM / ENOTSUP / ENOSYS: no hard links here
        pass
    with open(path, "xb") as f:   # "x": FileExistsError if the name is taken
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)
            raise


def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


def _load(args):
    import jax.numpy as jnp
    from jaxsd import StableDiffusion

    return StableDiffusion.from_pretrained(args.model, getattr(jnp, args.dtype))


def _parse_lora(text: str) -> tuple[str, float]:
    """``--lora FILE[:SCALE]`` -> (file, scale); the scale defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass    # a colon in the path itself (C:\...), no scale
    return text, 1.0


def lora_hash(path) -> str:
    """AUTOMATIC1111's short LoRA hash ("Lora hashes" in its PNG parameters): the first 12 hex
    digits of the SHA-256 of a safetensors file's tensor data (the bytes after its header)."""
    import hashlib

    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _read_prompts_file(args) -> list:
    """--prompts FILE: every line checked before the model loads (jaxsd.batch)."""
    from jaxsd import batch

    if args.prompt is not None:
        raise ValueError(f"pass a prompt or --prompts FILE, not both (got {args.prompt!r} and --prompts)")
    if args.seed == -1:
        raise ValueError("--seed -1 draws a random seed, which a resumable --prompts run cannot "
                         "repeat; pass a seed (default 0)")
    return batch.read_prompts(args.prompts, seed=args.seed or 0, batch=args.batch, negative=args.negative,
                              size=args.size)


def _generate_many(args, pipe, jobs, *, sampler, karras, common, extra, tags, model_name, draw_text) -> int:
    """--prompts: each line's images with their fixed names; the ones already there are skipped."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from jaxsd import batch
    from jaxsd.batch import output_path
    from jaxsd.pipelines.stable_diffusion import check_side

    for job in jobs:   # sizes against the model's rule, before the first image
        if job.size is not None:
            for name, value in zip(("width", "height"), job.size):
                try:
                    check_side(name, value, pipe.vae_factor, pipe.latent_multiple)
                except ValueError as error:
                    raise ValueError(f"{Path(args.prompts).name} line {job.line}: {error}") from None
    folder = Path(args.out)
    wanted = [(job, job.seed + k) for job in jobs for k in range(args.batch)]
    there = np.array([output_path(folder, job, s).exists() for job, s in wanted])
    if jax.process_count() > 1:  # every process must run the same calls: process 0's view decides
        from jax.experimental import multihost_utils
        there = np.asarray(multihost_utils.broadcast_one_to_all(there))
    todo = [w for w, done in zip(wanted, there) if not done]
    writes = _writes_files()
    if len(todo) < len(wanted) and writes:
        print(f"{len(wanted) - len(todo)} of {len(wanted)} images are already in {folder}; "
              f"drawing the other {len(todo)}")
    common = {k: v for k, v in common.items() if k != "negative_prompt"} | {"progress": False}
    size = lambda job: job.size or (pipe.default_size, pipe.default_size)
    with tqdm(total=len(todo), unit="image", desc="generate", disable=not writes) as bar:
        for group in batch.calls(todo, _images_per_call(pipe), key=lambda w: size(w[0])):
            # one call per group of same-size images, each with its own prompt and seed
            width, height = size(group[0][0])
            negatives = [job.negative for job, _ in group]
            # no negative at all: None, which SDXL turns into zeros (force_zeros_for_empty_prompt)
            negatives = None if all(n is None for n in negatives) else [n or "" for n in negatives]
            pictures = draw_text([job.prompt for job, _ in group], height=height, width=width,
                                 negative_prompt=negatives, seed=[s for _, s in group], **common)
            for (job, seed), picture in zip(group, pictures):
                if writes:
                    pos = {"Batch size": args.batch, "Batch pos": seed - job.seed} if args.batch > 1 else {}
                    text = parameters_text(" ".join([job.prompt] + tags), job.negative, steps=args.steps,
                                           sampler=sampler, karras=karras, guidance=args.guidance,
                                           seed=seed, width=width, height=height, model=model_name,
                                           extra={**extra, **pos})
                    path = output_path(folder, job, seed)
                    bar.write(f"wrote {path}" if write_png(picture, path, text) else
                              f"skipped {path}: it appeared meanwhile")
                bar.update(1)
    return 0


def write_png(image, path: Path, parameters: str) -> bool:
    """Write a PNG under a fixed name, never replacing a file: False if the name is taken."""
    encoded = _encode_png(image, parameters)
    tmp = path.parent / f".{os.getpid()}-{path.name}.tmp"
    try:
        tmp.write_bytes(encoded.getvalue())
        _place(tmp, path, encoded.getvalue())
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read_embedding(text: str) -> tuple[str, str]:
    """``--embedding FILE[:TOKEN]`` -> (file, token), the file read (and so checked) before the
    model loads."""
    from jaxsd.adapters.embeddings import read_embedding

    path, sep, token = text.rpartition(":")
    if not sep or not path or Path(text).is_file():   # no token, or a colon in the path itself
        path, token = text, None
    return path, read_embedding(path, token=token)[0]


def _read_loras(args) -> list:
    """Each --lora as (name, scale, updates), read (and so checked) before the model loads."""
    from jaxsd.adapters import read_lora

    loras = []
    for text in args.lora or ():
        path, scale = _parse_lora(text)
        if not math.isfinite(scale):
            raise ValueError(f"--lora {text!r}: the scale must be a finite number")
        if not Path(path).is_file():
            raise ValueError(f"--lora {text!r}: {path} is not a file (expected FILE.safetensors[:SCALE])")
        loras.append((Path(path).stem, scale, read_lora(path), lora_hash(path)))
    return loras


def check_generation_args(args) -> None:
    """Everything about a generate/img2img/inpaint command that can be checked without the model,
    checked before loading it (10-25 s for a real checkpoint), so that a typo costs nothing."""
    from jaxsd import sampling

    if args.scheduler is not None and args.scheduler not in sampling.SAMPLERS:
        close = difflib.get_close_matches(args.scheduler, list(sampling.SAMPLERS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"--scheduler {args.scheduler!r} is not a sampler; {hint}"
                         f"choose one of {sorted(sampling.SAMPLERS)}")
    for flag, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: must be a finite number (1 = no guidance)")
    if args.seed is not None and not -1 <= args.seed < 2**64:
        raise ValueError(f"--seed {args.seed}: must be in [0, 2**64 - 1], or -1 for a random seed")
    if args.seed is not None and args.seed + args.batch > 2**64:
        raise ValueError(f"--seed {args.seed} --batch {args.batch}: image i gets seed + i, which must "
                         f"stay below 2**64")
    if not 0 <= args.eta <= 1:
        raise ValueError(f"--eta {args.eta}: must be in [0, 1]")
    from jaxsd.sampling.schedule import SCHEDULE_NAMES

    if args.schedule not in SCHEDULE_NAMES:
        raise ValueError(f"--schedule {args.schedule!r} is not a schedule; choose one of {list(SCHEDULE_NAMES)}")
    if args.karras and args.schedule not in ("default", "karras"):
        raise ValueError(f"--karras and --schedule {args.schedule} ask for two schedules; pass one")
    if args.schedule.startswith("ays") and args.steps != 10:
        raise ValueError(f"--schedule {args.schedule} is Align Your Steps' 10-step schedule; pass --steps 10")
    if args.eta and args.scheduler is not None and args.scheduler not in ("ddim", "tcd"):
        raise ValueError(f"--eta {args.eta} is ddim's eta or tcd's gamma; pass --scheduler ddim or tcd "
                         f"(got --scheduler {args.scheduler})")
    switch = getattr(args, "refiner_switch", None)
    if switch is not None and getattr(args, "refiner", None) is None:
        raise ValueError(f"--refiner-switch {switch} needs --refiner MODEL (the model that takes over)")
    if switch is not None and not 0 < switch < 1:
        raise ValueError(f"--refiner-switch {switch}: must be strictly between 0 and 1")
    strength = getattr(args, "strength", None)
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(f"--strength {strength}: must be in (0, 1]")
    if args.size is not None:
        _check_size_before_loading(args.size, args.model)
    for name in ("image", "mask"):
        path = getattr(args, name, None)
        if path is not None:
            _open_image(path)
    _check_output_folder(Path(args.out))


def _check_size_before_loading(size: tuple[int, int], model: str) -> None:
    """--size against the model's whole size rule, read from its configs when it is a built-in
    model or a local folder (a Hub id or a single file is checked once loaded)."""
    from jaxsd.checkpoints.sources import BUILTIN_MODELS
    from jaxsd.pipelines.stable_diffusion import MAX_SIDE, check_side

    folder = BUILTIN_MODELS.get(model) or Path(model).expanduser()
    try:
        levels = {part: len(json.loads((folder / part / "config.json").read_text())["block_out_channels"])
                  for part in ("vae", "unet")}
    except (OSError, ValueError, KeyError, TypeError):
        levels = None
    width, height = size
    for name, value in (("width", width), ("height", height)):
        if levels:   # the same rule as StableDiffusion's: VAE factor x the UNet's halvings
            check_side(f"--size {width}x{height}: {name} ", value, 2 ** (levels["vae"] - 1),
                       2 ** (levels["unet"] - 1))
        elif not 0 < value <= MAX_SIDE:
            raise ValueError(f"--size {width}x{height}: {name} {value} must be positive, at most {MAX_SIDE}")


def _check_output_folder(folder: Path) -> None:
    """--out exists as a folder, or can be made, and a file can be written there."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{os.getpid()}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {str(folder)!r}: cannot write there ({error.strerror or error})") from None


def _generate(args) -> int:
    """One pipeline call per image, image i with seed + i (AUTOMATIC1111's rule), so that the
    Seed written into every PNG regenerates that image alone; each PNG is written as soon as it
    is drawn. The calls share one compiled program (same shapes)."""
    from jaxsd.pipelines import images as imgs

    if args.prompt is None and not getattr(args, "prompts", None):
        raise ValueError("no prompt: pass one, or --prompts FILE with one prompt per line")
    check_generation_args(args)
    jobs = _read_prompts_file(args) if getattr(args, "prompts", None) else None
    loras = _read_loras(args)
    embeddings = [_read_embedding(text) for text in args.embedding or ()]
    pipe = _load(args)
    for path, token in embeddings:
        try:
            pipe = pipe.with_embedding(path, token)
        except ValueError as error:
            raise ValueError(f"--embedding {path}: {error}") from None
    for name, scale, updates, _ in loras:
        try:
            pipe = pipe.with_lora(updates, scale)
        except ValueError as error:   # LoraError: the file does not fit this model
            raise ValueError(f"--lora {name}: {error}") from None
    seed = args.seed if args.seed not in (None, -1) else secrets.randbelow(2**31)
    # the model family's defaults (SDXL: guidance 5.0, img2img strength 0.3), recorded as used
    kind = {"generate": "text_to_image", "img2img": "image_to_image", "inpaint": "inpaint"}[args.command]
    args.guidance = pipe._default(kind, "guidance_scale", args.guidance)
    if kind != "text_to_image":
        args.strength = pipe._default(kind, "strength", args.strength)
    sampler = args.scheduler or pipe.scheduler
    karras = args.karras or args.schedule == "karras"
    common = dict(negative_prompt=args.negative, num_steps=args.steps, guidance_scale=args.guidance,
                  scheduler=sampler, karras=args.karras, schedule=args.schedule, eta=args.eta, progress=True)
    extra = {"Eta": args.eta} if args.eta else {}
    if args.schedule not in ("default", "karras"):
        extra["Schedule type"] = args.schedule
    draw_text = _text_to_image(pipe, args, extra)
    if args.command == "generate":
        width, height = args.size or (pipe.default_size, pipe.default_size)
        draw = lambda s: draw_text(args.prompt, height=height, width=width, seed=s, batch_size=len(s), **common)
    else:
        image = _open_image(args.image)
        if args.size:
            width, height = args.size
        else:
            height, width = imgs.default_size(image, pipe.vae_factor)
        extra["Denoising strength"] = args.strength
        if args.command == "img2img":
            draw = lambda s: pipe.image_to_image(image, args.prompt, strength=args.strength, height=height,
                                                 width=width, seed=s, batch_size=len(s), **common)
        else:
            mask = _open_image(args.mask)
            draw = lambda s: pipe.inpaint(image, mask, args.prompt, strength=args.strength, height=height,
                                          width=width, seed=s, batch_size=len(s), **common)
    model_name = Path(str(args.model).rstrip("/")).name
    # AUTOMATIC1111 records a LoRA as <lora:name:scale> in the prompt, and its hash.
    tags = [f"<lora:{name}:{scale:g}>" for name, scale, _, _ in loras]
    if loras:
        extra["Lora hashes"] = '"' + ", ".join(f"{name}: {h}" for name, _, _, h in loras) + '"'
    if jobs is not None:
        return _generate_many(args, pipe, jobs, sampler=sampler, karras=karras, common=common,
                              extra=extra, tags=tags, model_name=model_name, draw_text=draw_text)
    prompt = " ".join([args.prompt] + tags)
    per_call = _images_per_call(pipe)
    for start in range(0, args.batch, per_call):
        # one seed per image (a seed list): the same pictures however many images share a call
        seeds = [seed + i for i in range(start, min(start + per_call, args.batch))]
        pictures = draw(seeds)
        if not _writes_files():
            continue
        for i, picture in zip(range(start, args.batch), pictures):
            batch = {"Batch size": args.batch, "Batch pos": i} if args.batch > 1 else {}
            text = parameters_text(prompt, args.negative, steps=args.steps, sampler=sampler,
                                   karras=karras, guidance=args.guidance, seed=seed + i, width=width,
                                   height=height, model=model_name, extra={**extra, **batch})
            print(f"wrote {save_png(picture, Path(args.out), seed + i, text)}")
    return 0


def _text_to_image(pipe, args, extra):
    """``pipe.text_to_image``, or with ``--refiner``: the base until ``--refiner-switch`` of the
    denoising, then the refiner from the base's latents (SDXL's ensemble of experts, docs/sdxl.md)."""
    if getattr(args, "refiner", None) is None:
        return pipe.text_to_image
    import jax.numpy as jnp
    from jaxsd import StableDiffusion

    refiner = StableDiffusion.from_pretrained(args.refiner, getattr(jnp, args.dtype))
    if refiner.vae.config.latent_channels != pipe.vae.config.latent_channels:
        raise ValueError(f"--refiner {args.refiner}: its latents have {refiner.vae.config.latent_channels} "
                         f"channels, the model's {pipe.vae.config.latent_channels}")
    switch = 0.8 if args.refiner_switch is None else args.refiner_switch
    extra["Refiner"] = Path(str(args.refiner).rstrip("/")).name
    extra["Refiner switch at"] = switch

    def draw(prompt, **kw):
        latents = pipe.text_to_image(prompt, denoising_end=switch, output="latents", **kw)
        return refiner.image_to_image(image_latents=latents, prompt=prompt, denoising_start=switch, **kw)
    return draw


def _images_per_call(pipe) -> int:
    """Images drawn by one pipeline call: one per device the batch is split over (one here
    without several devices, so each PNG is written as soon as it is drawn)."""
    import jax

    return len(pipe.devices) if pipe.devices is not None else jax.device_count()


def _writes_files() -> bool:
    """Multi-host (--distributed): every process runs every call, process 0 writes the files."""
    import jax

    return jax.process_index() == 0


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not an image PIL can read ({error})") from None
    return image


def _info(args) -> int:
    info = _load(args).info()
    refused = info.pop("samplers_refused")
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" for k, v in value.items())
        print(f"{key.replace('_', ' ')}: {value}")
        if key == "samplers" and refused:
            print(f"samplers refused for this model's schedule: {', '.join(refused)}")
            print(f"  why, e.g.: {next(iter(refused.values()))}")
    return 0


# Options beyond the basics, and the config that asks for each: a sampler "takes" one when its
# plan accepts that config (the same check that refuses it otherwise).
_OPTION_PROBES = (
    ("exponential/beta sigmas", dict(use_exponential_sigmas=True)),
    ("thresholding", dict(thresholding=True)),
    ("clip_sample", dict(clip_sample=True)),
    ("solver_order 1/3", dict(solver_order=3)),
    ("timesteps=", dict(timesteps=(999, 600, 300, 100))),
    ("sigmas=", dict(sigmas=(14.6, 3.0, 1.0, 0.3, 0.0))),
    ("original_inference_steps", dict(original_inference_steps=40)),
    ("timestep_scaling", dict(timestep_scaling=5.0)),
    ("s_churn", dict(s_churn=1.0)),
)


def _samplers(args) -> int:
    """Every sampler: its diffusers scheduler, order, cost, noise, the schedules it can run and
    the options it takes."""
    import dataclasses

    from jaxsd import sampling

    T = sampling.SD1_CONFIG.num_train_timesteps
    if not 1 <= args.steps <= T:
        raise ValueError(f"--steps {args.steps}: must be in [1, {T}]")
    zero_snr = dataclasses.replace(sampling.SD1_CONFIG, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                   prediction_type="v_prediction")
    karras = dataclasses.replace(sampling.SD1_CONFIG, use_karras_sigmas=True)
    runs = lambda name, cfg, n=args.steps: "no" if sampling.refusal(name, cfg, n) else "yes"
    eta = {"ddim": "eta", "tcd": "eta (its gamma)"}

    def options(name):
        taken = [label for label, change in _OPTION_PROBES
                 if runs(name, dataclasses.replace(sampling.SD1_CONFIG, **change), 4) == "yes"]
        return ", ".join(([eta[name]] if name in eta else []) + taken) or "-"

    print(f"| sampler | diffusers scheduler | order | evaluations, {args.steps} steps | fresh noise | "
          f"Karras sigmas | zero terminal SNR | options |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in sampling.SAMPLERS.items():
        evals = (sampling.make_plan(name, args.steps, sampling.SD1_CONFIG).timesteps.shape[0]
                 if runs(name, sampling.SD1_CONFIG) == "yes" else "refused")  # e.g. lcm: at most 50
        noise = ("eta x (eta 0 by default)" if name == "ddim" else
                 "when gamma > 0 (eta; 0 by default), not at the last step" if name == "tcd" else
                 "every step but the last" if name == "lcm" else
                 "with s_churn > 0 (0 by default)" if name == "euler" else
                 "every step" if s.stochastic else "no")
        print(f"| {name} | {s.diffusers} | {s.order} | {evals} | {noise} | "
              f"{runs(name, karras, 4)} | {runs(name, zero_snr, 4)} | {options(name)} |")
    return 0


def _tokenize(args) -> int:
    from jaxsd.checkpoints.tokenizer import load_tokenizer, tokenize

    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenize(tokenizer, args.prompt)[0]
    end = int((ids == tokenizer.eos_token_id).argmax()) + 1
    print(" ".join(map(str, ids[:end] if not args.padded else ids)))
    print(" ".join(tokenizer.convert_ids_to_tokens(ids[:end].tolist())))
    return 0


def _evaluate(args) -> int:
    from tqdm.auto import tqdm

    from jaxsd import sampling
    from jaxsd.training import evaluate, shapes

    pipe = _load(args)
    names = (list(sampling.SAMPLERS) if args.samplers == ["all"]
             else [] if args.samplers == ["none"] else args.samplers)
    if not names and not args.autoencoder:
        raise ValueError("--samplers none scores nothing unless --autoencoder is given")
    for name in names:
        sampling.get_sampler(name)  # an unknown name fails before any work, listing the choices
    # Samplers whose diffusers class cannot run this checkpoint's schedule (e.g. zero terminal
    # SNR: only some have rescale_betas_zero_snr): an error before any work if asked for by name,
    # a row saying why if "all" was asked for.
    unusable = {}
    for name in names:
        why = sampling.refusal(name, pipe._sampler_and_schedule(name, args.karras)[1], args.steps)
        if why is not None and args.samplers != ["all"]:
            raise ValueError(why)
        if why is not None:
            unusable[name] = why
    prompts = shapes.evaluation_prompts()
    print(f"{len(prompts)} held-out prompts, {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed}, model {args.model}")
    print("| sampler | colours | shape | size | position | all |")
    print("| --- | --- | --- | --- | --- | --- |")
    if args.autoencoder:
        s = evaluate.evaluate_autoencoder(pipe)
        print(f"| (VAE reconstructions of {s.n} renders) | {s.colors:.1%} | {s.shape:.1%} | "
              f"{s.size:.1%} | {s.position:.1%} | {s.all:.1%} |", flush=True)
    for name in names:
        if name in unusable:
            print(f"| {name} | not run: {unusable[name]} | | | | |", flush=True)
            continue
        with tqdm(total=len(prompts), desc=name, unit="image", leave=False) as bar:
            s = evaluate.evaluate_pipeline(pipe, name, num_steps=args.steps, guidance_scale=args.guidance,
                                           karras=args.karras, seed=args.seed, prompts=prompts,
                                           batch_size=args.batch, on_batch=bar.update)
        label = name + (" (Karras)" if args.karras else "")
        print(f"| {label} | {s.colors:.1%} | {s.shape:.1%} | {s.size:.1%} | {s.position:.1%} | {s.all:.1%} |",
              flush=True)
    return 0


def _add_generation_options(p, *, size_help: str, prompts_file: bool = False):
    if prompts_file:
        p.add_argument("prompt", nargs="?", default=None, help="the prompt (or --prompts FILE)")
        p.add_argument("--prompts", metavar="FILE", default=None, help="many prompts: one per line, "
                       "or JSON lines with prompt, negative, seed, size; resumes where it stopped "
                       "(see docs/cli.md)")
    else:
        p.add_argument("prompt")
    p.add_argument("--model", "-m", default="tiny-shapes", help="a diffusers folder, a Hub id, a "
                   "single-file checkpoint, or the built-in tiny-shapes (the default)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                   "(default: the model's, 7.5; SDXL 5.0, SDXL inpainting 7.5)")
    p.add_argument("--scheduler", default=None, help="sampler, e.g. euler, dpmpp_2m, ddim "
                   "(default: the checkpoint's own)")
    p.add_argument("--karras", action="store_true", help="Karras et al. (2022) sigmas (= --schedule karras)")
    p.add_argument("--schedule", default="default", help="step schedule by name: "
                   "default (the sampler's spacing), karras, exponential, beta, ays, ays_sdxl (10 steps), "
                   "sgm_uniform, simple (see docs/samplers.md)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim's eta, or tcd's gamma (the TCD "
                   "authors use 0.3), in [0, 1] (default 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default, or -1: a random one, "
                   "recorded in the PNG)")
    p.add_argument("--size", type=_parse_size, default=None, help=size_help)
    p.add_argument("--batch", type=int, default=1, help="images to generate, image i with seed + i (default 1)")
    p.add_argument("--out", default="outputs", help="folder to write PNGs to (default ./outputs)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="a LoRA .safetensors "
                   "file merged into the model, with its scale (default 1); repeat for several")
    p.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]", help="a textual-inversion "
                   ".safetensors file; its token (default: the file's own) can then be used in the prompt")
    _add_cache_option(p)
    p.add_argument("--distributed", action="store_true", help="one process of a multi-host run: "
                   "join the others (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or "
                   "SLURM/Open MPI/Cloud TPU detected) and split each batch over all their devices; "
                   "process 0 writes the files (see docs/scale.md)")
    p.set_defaults(run=_generate)


def _add_cache_option(p):
    p.add_argument("--no-cache", action="store_true", help="do not read or write compiled programs "
                   "in the compilation cache (default: on, in $JAXSD_CACHE_DIR or ~/.cache/jaxsd; "
                   "JAXSD_NO_CACHE=1 turns it off too)")


def _train_tiny(args) -> int:
    """Train the tiny model stage by stage, then export OUT/model in diffusers' layout."""
    import logging

    from tqdm import tqdm

    from jaxsd.training import loop, recipe

    logging.basicConfig(format="%(asctime)s %(message)s")
    log = logging.getLogger("jaxsd.training")
    log.setLevel(logging.INFO)
    presets = recipe.FULL if args.preset == "full" else recipe.SMOKE
    model = recipe.TINY if args.preset == "full" else recipe.SMOKE_MODEL
    stages = recipe.STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        cfg = presets[stage]
        bar = tqdm(total=cfg.steps, initial=loop.saved_step(args.out, stage), desc=stage,
                   unit="step", dynamic_ncols=True)
        log.info("stage %s: %s", stage, cfg)

        def on_step(step, metrics, bar=bar, stage=stage):
            bar.update(1)
            if metrics is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if step % args.log_every == 0:
                    log.info("%s step %d: %s", stage, step,
                             " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

        pool_bar = None

        def on_pool(done, total):   # the UNet stage's latent pool, encoded once per run folder
            nonlocal pool_bar
            if pool_bar is None:
                pool_bar = tqdm(total=total, desc="encoding the latent pool", unit="scene", dynamic_ncols=True)
            pool_bar.update(done - pool_bar.n)
            if done == total:
                pool_bar.close()

        state, model = loop.run_stage(stage, args.out, model, cfg, save_every=args.save_every,
                                      on_step=on_step, stop_after=args.stop_after, on_pool=on_pool)
        bar.close()
        if int(state.step) < cfg.steps:
            log.info("stage %s stopped at step %d of %d; run again to resume", stage,
                     int(state.step), cfg.steps)
            return 0
    if args.stage == "all":
        folder = loop.export_model(args.out, Path(args.out) / "model", model, presets)
        print(f"wrote {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxsd import __version__

    parser = argparse.ArgumentParser(prog="jaxsd", description="Stable Diffusion in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="text to image")
    _add_generation_options(gen, size_help="WIDTHxHEIGHT (default: the model's own size, "
                            "512x512 for SD 1.x, 1024x1024 for SDXL, 64x64 for tiny-shapes)", prompts_file=True)
    gen.add_argument("--refiner", metavar="MODEL", default=None, help="a second model (SDXL's refiner) "
                     "that finishes the denoising from the first one's latents (docs/sdxl.md)")
    gen.add_argument("--refiner-switch", type=float, default=None, help="with --refiner: the fraction of "
                     "the denoising the first model does, in (0, 1) (default 0.8)")

    i2i = commands.add_parser("img2img", help="image + text to image")
    i2i.add_argument("image", help="the starting image")
    _add_generation_options(i2i, size_help="WIDTHxHEIGHT (default: the image's size, rounded down to 8)")
    i2i.add_argument("--strength", type=float, default=None, help="how much to change, in (0, 1] "
                     "(default 0.8; SDXL 0.3)")

    inp = commands.add_parser("inpaint", help="repaint the white part of a mask")
    inp.add_argument("image", help="the image")
    inp.add_argument("mask", help="the mask: white = repaint, black = keep")
    _add_generation_options(inp, size_help="WIDTHxHEIGHT (default: the image's size, rounded down to 8)")
    inp.add_argument("--strength", type=float, default=None, help="in (0, 1] (default 1.0; SDXL 0.9999)")

    info = commands.add_parser("info", help="what a checkpoint is")
    info.add_argument("model", nargs="?", default="tiny-shapes", help="a diffusers folder, a Hub "
                      "id or a single-file checkpoint (default: the built-in tiny-shapes)")
    info.add_argument("--dtype", choices=DTYPES, default="float32")
    info.set_defaults(run=_info)

    train = commands.add_parser("train-tiny", help="train the tiny shapes model from scratch")
    train.add_argument("out", help="run folder: checkpoints (vae.msgpack, unet.msgpack) and the "
                       "exported model (OUT/model); an existing run resumes where it stopped")
    train.add_argument("--preset", choices=("full", "smoke"), default="full",
                       help="full: the shipped model's schedule; smoke: a minute-long check")
    train.add_argument("--stage", choices=("all", "vae", "unet"), default="all")
    train.add_argument("--save-every", type=int, default=500, metavar="STEPS")
    train.add_argument("--log-every", type=int, default=100, metavar="STEPS")
    train.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                       help="stop each stage after this many steps of this call (resume later)")
    train.set_defaults(run=_train_tiny)

    ev = commands.add_parser("evaluate", help="score a shapes model on the 240 held-out prompts")
    ev.add_argument("--model", "-m", default="tiny-shapes", help="default: the built-in tiny-shapes")
    ev.add_argument("--samplers", nargs="+", default=["all"], metavar="NAME",
                    help="sampler names, all (the default), or none (with --autoencoder)")
    ev.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    ev.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    ev.add_argument("--karras", action="store_true", help="Karras et al. (2022) sigmas")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first batch (default 0)")
    ev.add_argument("--batch", type=int, default=240, help="images per batch (default 240: one)")
    ev.add_argument("--dtype", choices=DTYPES, default="float32")
    ev.add_argument("--autoencoder", action="store_true",
                    help="first, a row for the VAE's own reconstructions of renders of the same "
                         "held-out combinations: the ceiling of the samplers' rows")
    _add_cache_option(ev)
    ev.set_defaults(run=_evaluate)

    smp = commands.add_parser("samplers", help="list the samplers, what each costs and what it can run")
    smp.add_argument("--steps", type=int, default=25, help="steps to count the evaluations for (default 25)")
    smp.set_defaults(run=_samplers)

    tok = commands.add_parser("tokenize", help="show the CLIP token ids of a prompt")
    tok.add_argument("prompt")
    tok.add_argument("--tokenizer", default=None, help="a checkpoint's tokenizer/ folder "
                     "(default: the CLIP vocabulary shipped with jaxsd)")
    tok.add_argument("--padded", action="store_true", help="print all 77 ids, padding included")
    tok.set_defaults(run=_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "distributed", False):
            from jaxsd import runtime
            try:
                runtime.initialize_distributed()  # before anything else touches JAX
            except RuntimeError as error:
                raise ValueError(str(error)) from None
        if hasattr(args, "no_cache") and not args.no_cache:
            from jaxsd import runtime
            runtime.enable_compilation_cache()  # a second run reads its programs back: seconds
        return args.run(args)
    except (ValueError, OSError, NotImplementedError) as error:  # bad input, a checkpoint that
        # cannot be read, a feature jaxsd lacks: the message says what to do; a traceback would
        # only bury it.
        print(f"jaxsd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: sampling stops within a step; nothing is half-written
        print(f"\njaxsd {args.command}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now, skipping the interpreter's shutdown: after an interrupted run, XLA's thread
        # pools abort in their destructors ("terminate called without an active exception").
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
