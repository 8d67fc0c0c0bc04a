"""The training loop of the tiny model: data fed ahead in a thread, checkpoints, resuming, export.

The mathematics (configs, losses, the jitted steps) is in :mod:`jaxsd.training.recipe`; this module runs
it. :func:`run_stage` trains one stage into a folder, resuming from its checkpoint;
:func:`export_model` writes the finished stages as a diffusers folder. Nothing here prints: the
``jaxsd train-tiny`` command (``jaxsd/cli.py``) draws the progress bar and logs the metrics.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import flax
import jax
import numpy as np

from jaxsd.checkpoints.tokenizer import load_tokenizer, tokenize
from jaxsd.models.clip import CLIPTextConfig
from jaxsd.models.unet import UNetConfig
from jaxsd.models.vae import AutoencoderKL, VAEConfig
from jaxsd.training.recipe import (FULL, SCHEDULER, STAGES, TINY, TinyModelConfig, TrainConfig,
                                   TrainState, _check_choice, init_state, measure_scaling_factor, unet_step,
                                   vae_step)
from jaxsd.training.shapes import Scenes, ShapesDataset, caption_attributes, captions, outline_mask

# ---------------------------------------------------------------------------------------------
# Data: batches rendered and tokenized ahead, in a background thread.

class CaptionTokenizer:
    """Caption -> CLIP ids [77], memoised (the dataset's captions repeat) and thread-safe enough."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer or load_tokenizer()
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: list[str]) -> np.ndarray:
        for c in set(captions) - self.cache.keys():
            self.cache[c] = tokenize(self.tokenizer, c)[0]
        return np.stack([self.cache[c] for c in captions])


def training_batches(stage: str, data: ShapesDataset, cfg: TrainConfig, start: int,
                     tokenizer: CaptionTokenizer | None = None) -> Iterator[tuple]:
    """Batch ``start``, ``start + 1``, ...: (images, pixel weights) for the VAE, (images, ids,
    attributes, has_caption) for the UNet.

    Caption dropout happens here: which captions become "" depends only on (seed, step).
    """
    for index, batch in enumerate(data.batches(cfg.batch_size, start), start):
        if stage == "vae":
            yield batch.images, 1.0 + cfg.edge_weight * outline_mask(batch.scenes)
            continue
        yield (batch.images, *_text_inputs(batch.captions, cfg, index, tokenizer))


def _text_inputs(texts: list[str], cfg: TrainConfig, index: int, tokenizer: CaptionTokenizer):
    """(ids [B, 77], attributes [B, 5], has_caption [B]) with step ``index``'s caption dropout."""
    rng = np.random.default_rng([cfg.seed, index, 7])
    drop = rng.random(len(texts)) < cfg.caption_dropout
    texts = ["" if d else c for c, d in zip(texts, drop)]
    return tokenizer(texts), caption_attributes(texts), ~drop


# The pool's scenes are the dataset's batches from this index on: apart from the training
# batches (0, 1, ...) and from those measure_scaling_factor reads (10,000,000 on).
POOL_START = 20_000_000
POOL_CHUNK = 256


def latent_pool(folder: str | os.PathLike, vae: AutoencoderKL, vae_params, data: ShapesDataset, n: int,
                on_progress: Callable[[int, int], None] | None = None) -> tuple[Scenes, np.ndarray]:
    """``n`` scenes and their posterior moments under the frozen VAE, [n, h, w, 2C] (mean, then
    log-variance), encoded once and cached as ``folder/latents-<n>.npz``.

    The UNet stage draws its batches from these instead of rendering and encoding every batch:
    the encoder was a fifth of a step's time. Each step still samples its own z ~ q(z|x) and a
    fresh caption (phrasing, whether size and position are said), so what repeats is the scene,
    one of 32,768 for the full run. Stored as float16 and always used as read back, so a run
    that resumes from the cache sees the same numbers as the one that wrote it; a cache written
    with other VAE weights or another data seed is encoded anew.
    """
    path = Path(folder) / f"latents-{n}.npz"
    # Which VAE and data the cache holds: a VAE retrained into the same folder re-encodes.
    fingerprint = np.array([float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in jax.tree.leaves(vae_params))),
                            data.seed])
    if path.is_file():
        try:
            with np.load(path) as saved:
                stale = not np.array_equal(saved["fingerprint"], fingerprint)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            stale = True    # written before fingerprints, or cut short: not ours to trust
        if stale:
            path.unlink()
    if not path.is_file():
        encode = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method=vae.encode))
        parts, moments = [], []
        for i in range(-(-n // POOL_CHUNK)):
            batch = data.batch(POOL_START + i, POOL_CHUNK)
            posterior = encode(batch.images.astype(np.float32) / 127.5 - 1.0)
            parts.append(batch.scenes)
            moments.append(np.concatenate([posterior.mean, posterior.logvar], axis=-1).astype(np.float16))
            if on_progress is not None:
                on_progress(min((i + 1) * POOL_CHUNK, n), n)
        scenes = Scenes(*(np.concatenate(field)[:n] for field in zip(*parts)))
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, moments=np.concatenate(moments)[:n], fingerprint=fingerprint, **scenes._asdict())
        os.replace(tmp, path)
    with np.load(path) as saved:
        return Scenes(*(saved[f] for f in Scenes._fields)), saved["moments"].astype(np.float32)


def pool_batches(scenes: Scenes, moments: np.ndarray, cfg: TrainConfig, start: int,
                 tokenizer: CaptionTokenizer) -> Iterator[tuple]:
    """UNet batches from the latent pool: (moments [B, h, w, 2C], ids, attributes, has_caption);
    batch i is a pure function of (seed, i), as :func:`training_batches`."""
    for index in itertools.count(start):
        rng = np.random.default_rng([cfg.seed, index, 5])
        pick = rng.integers(len(moments), size=cfg.batch_size)
        texts = captions(rng, Scenes(*(field[pick] for field in scenes)))
        yield (moments[pick], *_text_inputs(texts, cfg, index, tokenizer))


def prefetch(iterator: Iterator, size: int = 4) -> Iterator:
    """Run ``iterator`` in a daemon thread, ``size`` items ahead (NumPy releases the GIL)."""
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as error:  # hand the error to the consumer
            items.put(error)
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# ---------------------------------------------------------------------------------------------
# Checkpoints: the whole TrainState (msgpack) plus the configs (JSON), per stage.

def save_checkpoint(folder: str | os.PathLike, stage: str, state: TrainState, model: TinyModelConfig,
                    cfg: TrainConfig) -> Path:
    """Write ``folder/<stage>.msgpack`` and ``folder/<stage>.json``, atomically (rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.msgpack"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.to_bytes(jax.device_get(state)))
    os.replace(tmp, path)
    (folder / f"{stage}.json").write_text(json.dumps(
        {"step": int(state.step), "model": _to_json(model), "train": dataclasses.asdict(cfg)}, indent=1))
    return path


def load_checkpoint(folder: str | os.PathLike, stage: str, template: TrainState) -> TrainState | None:
    """The stage's saved state, shaped like ``template``; None when there is none yet."""
    path = Path(folder) / f"{stage}.msgpack"
    if not path.is_file():
        return None
    return flax.serialization.from_bytes(template, path.read_bytes())


def saved_step(folder: str | os.PathLike, stage: str) -> int:
    """The step of the stage's checkpoint in ``folder`` (0 when there is none)."""
    path = Path(folder) / f"{stage}.json"
    return json.loads(path.read_text())["step"] if path.is_file() else 0


def load_model_config(folder: str | os.PathLike) -> TinyModelConfig | None:
    """The model config saved with the VAE stage (it carries the measured scaling_factor)."""
    path = Path(folder) / "vae.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())["model"]
    return TinyModelConfig(vae=VAEConfig(**saved["vae"]), text=CLIPTextConfig(**saved["text"]),
                           unet=UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in saved["unet"].items()}))


def _check_same_settings(folder: str | os.PathLike, stage: str, cfg: TrainConfig) -> None:
    """A checkpoint resumes only under the settings that wrote it: with others (a different
    ``steps`` reshapes the learning-rate schedule) the run would silently become another one."""
    path = Path(folder) / f"{stage}.json"
    saved = json.loads(path.read_text()).get("train") if path.is_file() else None
    if saved is None:
        return
    asked = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}
    if changed:
        raise ValueError(f"{str(path)!r}: this stage was trained with "
                         + ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
                         + "; this run asks for " + ", ".join(f"{k}={b!r}" for k, (_, b) in changed.items())
                         + ". Resume with the settings that wrote the checkpoint, or train into a new folder")


def _to_json(config) -> dict:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}


# ---------------------------------------------------------------------------------------------
# The loop, with no printing: the caller gets every step's metrics through ``on_step``.

def run_stage(stage: str, folder: str | os.PathLike, model: TinyModelConfig = TINY,
              cfg: TrainConfig | None = None, *, save_every: int = 1000,
              on_step: Callable[[int, dict], None] | None = None, metrics_every: int = 10,
              stop_after: int | None = None,
              on_pool: Callable[[int, int], None] | None = None) -> tuple[TrainState, TinyModelConfig]:
    """Train one stage, resuming from ``folder`` if it holds a checkpoint of it.

    :param stage: "vae" or "unet" (the UNet stage needs the finished VAE stage in ``folder``).
    :param cfg: the stage's :class:`TrainConfig` (default: ``FULL[stage]``).
    :param save_every: write a checkpoint every this many steps, and at the end.
    :param on_step: called as ``on_step(step, metrics)`` after every step, with the metrics as
        floats every ``metrics_every`` steps and None otherwise (reading them back makes the
        host wait for the device, which then idles while the next step is dispatched).
    :param stop_after: stop after this many steps of this call (to split a run), saving first.
    :param on_pool: called as ``on_pool(done, total)`` while the UNet stage's latent pool is
        encoded (once per run folder; see :func:`latent_pool`).
    :returns: (the final state, the model config, with the VAE's measured scaling_factor).
    """
    _check_choice("stage", stage, STAGES)
    cfg = cfg or FULL[stage]
    data = ShapesDataset(seed=cfg.seed)
    if stage == "vae":
        step_fn = partial(vae_step, model=model, cfg=cfg)
    else:
        saved = load_model_config(folder)
        vae_state = load_checkpoint(folder, "vae", init_state("vae", saved, FULL["vae"])) if saved else None
        if vae_state is None:
            raise FileNotFoundError(f"stage={stage!r} needs a trained VAE: {str(folder)!r} has no "
                                    f"vae.msgpack / vae.json; run stage 'vae' into the same folder first")
        model = dataclasses.replace(model, vae=saved.vae)
        step_fn = lambda state, *batch: unet_step(state, vae_state.ema, *batch, model=model, cfg=cfg)

    state = init_state(stage, model, cfg)
    resumed = load_checkpoint(folder, stage, state)
    if resumed is not None:
        _check_same_settings(folder, stage, cfg)
        state = resumed
    start = int(state.step)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    tokenizer = CaptionTokenizer() if stage == "unet" else None
    if stage == "unet" and cfg.latent_pool:
        pool = latent_pool(folder, AutoencoderKL(model.vae), vae_state.ema, data, cfg.latent_pool, on_pool)
        batches = prefetch(pool_batches(*pool, cfg, start, tokenizer))
    else:
        batches = prefetch(training_batches(stage, data, cfg, start, tokenizer))
    for index in range(start, end):
        state, metrics = step_fn(state, *next(batches))
        if on_step is not None:
            on_step(index + 1, {k: float(v) for k, v in metrics.items()}
                    if (index + 1) % metrics_every == 0 else None)
        if (index + 1) % save_every == 0 and index + 1 < end:
            save_checkpoint(folder, stage, state, model, cfg)
    if stage == "vae" and end == cfg.steps:
        # The diffusion model wants latents of about unit variance (Rombach et al., 2022, D.1).
        scale = measure_scaling_factor(AutoencoderKL(model.vae), state.ema, data)
        model = dataclasses.replace(model, vae=dataclasses.replace(model.vae, scaling_factor=scale))
    save_checkpoint(folder, stage, state, model, cfg)
    return state, model


def export_model(folder: str | os.PathLike, dest: str | os.PathLike, model: TinyModelConfig,
                 presets: dict[str, TrainConfig] = FULL, scheduler: str = SCHEDULER) -> Path:
    """Export the EMA weights of the finished stages in ``folder`` to ``dest``, in diffusers'
    layout: the VAE of stage "vae", the text encoder and UNet of stage "unet", and ``scheduler``
    (a diffusers class name) as the folder's default sampler."""
    from jaxsd.training.export import export_diffusers

    vae = load_checkpoint(folder, "vae", init_state("vae", model, presets["vae"])).ema
    unet = load_checkpoint(folder, "unet", init_state("unet", model, presets["unet"])).ema
    return export_diffusers(dest, text_config=model.text, text_params=unet["text"],
                            unet_config=model.unet, unet_params=unet["unet"],
                            vae_config=model.vae, vae_params=vae, scheduler=scheduler,
                            prediction_type=presets["unet"].prediction_type,
                            zero_terminal_snr=presets["unet"].zero_terminal_snr)
