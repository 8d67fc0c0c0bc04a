"""LoRA files -> low-rank updates of the text encoder's and the UNet's weights.

A LoRA (Hu et al., 2021) keeps a weight W [out, in] frozen and trains two thin factors,
A ("down", [r, in]) and B ("up", [out, r]) with a small rank r; the adapted layer computes

    W' = W + s * (B @ A),          s = scale * alpha / r

where alpha is stored with the file and ``scale`` is the user's (A1111's ``<lora:name:0.8>``).
For a convolution (LoCon) A is a convolution with W's kernel, [r, in, kh, kw], and B a 1x1
one, [out, r, 1, 1], so the update is ``einsum("or,rihw->oihw", B, A)``: the same rank-r
product, one per kernel tap.

Nothing here mutates anything: :func:`read_lora` turns a file into :class:`LoraUpdate` rows,
:func:`lora_deltas` matches them to a model's parameters, and :func:`merge` returns
``params + sum(scale_k * delta_k)``, a pure function whose scales may be traced (inside
``jax.jit`` a new scale re-uses the compiled program).

The three key formats people have, for one module M (its diffusers / transformers name, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):

| format | A (down) | B (up) | alpha |
| --- | --- | --- | --- |
| PEFT (diffusers >= 0.26) | ``unet.M.lora_A.weight`` | ``unet.M.lora_B.weight`` | ``lora_adapter_metadata`` in the safetensors header; none: alpha = r |
| diffusers, older | ``unet.M.lora.down.weight``, ``unet.<attn>.processor.to_q_lora.down.weight`` | ``...up.weight`` | alpha = r |
| kohya-ss / A1111 | ``lora_unet_<M, dots as _>.lora_down.weight`` | ``.lora_up.weight`` | ``.alpha``; none: alpha = r |

Text-encoder keys start ``text_encoder.`` (PEFT, old diffusers: ``...q_proj.lora_linear_layer``,
``...self_attn.to_q_lora``) or ``lora_te_`` / ``lora_te1_`` (kohya), with or without
``text_model.`` before the module. LoHa, LoKr, LyCORIS' CP decomposition (``lora_mid``) and
DoRA are refused with the key that shows them; a key that matches no module is an error.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsd.checkpoints import convert
from jaxsd.checkpoints.files import CheckpointError, SafetensorsFile

COMPONENTS = ("unet", "text_encoder")


class LoraError(CheckpointError):
    """A LoRA file that jaxsd cannot read, or that does not fit the model."""


@dataclass(frozen=True)
class LoraUpdate:
    """One module's low-rank update, in the reference (PyTorch) layout."""
    component: str        # "unet" or "text_encoder"
    module: str           # the module's name as the file spells it (resolved by lora_deltas)
    down: np.ndarray      # A: [r, in] or [r, in, kh, kw]
    up: np.ndarray        # B: [out, r] or [out, r, 1, 1]
    alpha: float          # s = alpha / r
    keys: tuple[str, ...]  # the file's keys, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> np.ndarray:
        """(B @ A) * alpha / r, float32, shaped like the reference weight ([out, in] or OIHW)."""
        down, up = self.down.astype(np.float32), self.up.astype(np.float32)
        if down.ndim == 2:
            product = up @ down
        else:  # conv: B is 1x1, A has W's kernel
            product = np.einsum("or,rihw->oihw", up.reshape(up.shape[0], -1), down)
        return product * np.float32(self.alpha / self.rank)


# ---------------------------------------------------------------------------------------------
# Reading a file

# Key types that are not plain LoRA: (substring, what it is).
UNSUPPORTED = ((r"\.hada_", "LoHa (LyCORIS)"), (r"\.lokr_", "LoKr (LyCORIS)"),
               (r"\.lora_mid\.", "LoRA with a CP/Tucker core (LyCORIS 'lora_mid')"),
               (r"dora_scale", "DoRA"), (r"lora_magnitude_vector", "DoRA"),
               (r"\.diff(_b)?$", "a full-weight difference (LyCORIS 'diff')"), (r"\.[ab]\d\.weight$", "GLoRA"))

# The older diffusers attention-processor names -> the module they adapt.
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TE_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def _split_key(key: str):
    """A file key -> (component, module, "down" | "up" | "alpha"), or None if it is not LoRA."""
    m = re.match(r"^(lora_unet|lora_te1?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
    if m:  # kohya-ss: the module with its dots as underscores (resolved against the model later)
        component = "unet" if m[1] == "lora_unet" else "text_encoder"
        return component, "_" + m[2], {"lora_down.weight": "down", "lora_up.weight": "up"}.get(m[3], "alpha")
    m = re.match(r"^(unet|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight$", key)
    if m:  # PEFT
        return m[1], m[2], "down" if m[3] == "lora_A" else "up"
    m = re.match(r"^(unet|text_encoder)\.(.+)\.(lora|lora_linear_layer)\.(down|up)\.weight$", key)
    if m:  # diffusers, older: on the module itself
        return m[1], m[2], m[4]
    m = re.match(r"^(unet|text_encoder)\.(.+?)(\.processor)?\.(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight$", key)
    if m:  # diffusers, older: attention processors
        table = _PROCESSOR if m[1] == "unet" else _TE_PROCESSOR
        return m[1], f"{m[2]}.{table[m[4]]}", m[5]
    return None


def read_lora(source: str | os.PathLike | Mapping, *, metadata: Mapping | None = None) -> list[LoraUpdate]:
    """A LoRA ``.safetensors`` file (or a ``{key: array}`` dict) -> its updates.

    :param metadata: the safetensors header's metadata, when ``source`` is a dict (read from the
        file otherwise): PEFT files keep alpha in ``lora_adapter_metadata``.
    """
    if isinstance(source, Mapping):
        tensors, name = {k: np.asarray(v) for k, v in source.items()}, "the LoRA state dict"
    else:
        path = Path(source).expanduser()
        name = str(path)
        if path.suffix != ".safetensors":
            raise LoraError(f"{name}: LoRA files are read from .safetensors only (got {path.suffix!r}); "
                            "convert a pickle .pt/.ckpt with safetensors' own tools")
        try:   # the checkpoints' reader: validates the header, reads bfloat16 too
            f = SafetensorsFile(path)
            metadata, tensors = f.metadata, {k: np.asarray(f[k]) for k in f}
        except CheckpointError as error:  # a truncated, damaged or foreign file
            raise LoraError(str(error)) from None
    for key in tensors:
        for marker, what in UNSUPPORTED:
            if re.search(marker, key):
                raise LoraError(f"{name}: key {key!r} is {what}, which jaxsd does not apply "
                                "(supported: LoRA and LoCon in the PEFT, diffusers and kohya-ss formats)")
    parts: dict[tuple[str, str], dict] = {}
    unknown = []
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        component, module, role = split
        parts.setdefault((component, module), {})[role] = (key, value)
    if unknown:
        raise LoraError(f"{name}: {len(unknown)} key(s) are not LoRA keys jaxsd knows "
                        f"(see docs/adapters.md for the formats):\n  " + "\n  ".join(sorted(unknown)[:20]))
    alphas = _peft_alphas(metadata or {}, name)
    updates = []
    for (component, module), got in parts.items():
        if "down" not in got or "up" not in got:
            missing = "up" if "down" in got else "down"
            raise LoraError(f"{name}: module {module!r} ({component}) has no {missing} weight; "
                            f"keys: {[k for k, _ in got.values()]}")
        (down_key, down), (up_key, up) = got["down"], got["up"]
        rank = down.shape[0]
        if up.shape[1] != rank or down.ndim != up.ndim or down.ndim not in (2, 4):
            raise LoraError(f"{name}: {down_key} {down.shape} and {up_key} {up.shape} are not the "
                            "factors of one low-rank update ([r, in(, kh, kw)] and [out, r(, 1, 1)])")
        if "alpha" in got:
            alpha = float(np.asarray(got["alpha"][1]).reshape(()))
        else:
            alpha = alphas(component, module, rank)
        keys = tuple(k for k, _ in got.values())
        updates.append(LoraUpdate(component, module, down, up, alpha, keys))
    if not updates:
        raise LoraError(f"{name}: holds no LoRA weights")
    return updates


PEFT_DEFAULT_ALPHA = 8.0  # peft's LoraConfig(lora_alpha=8)


def _peft_alphas(metadata: Mapping, name: str):
    """PEFT's alpha for a module: ``lora_alpha`` / ``alpha_pattern`` from the metadata, else r."""
    text = metadata.get("lora_adapter_metadata")
    config = json.loads(text) if text else {}
    if any(config.get(f"{c}.use_dora") for c in COMPONENTS):
        raise LoraError(f"{name}: its metadata says use_dora (DoRA), which jaxsd does not apply")

    def alpha(component: str, module: str, rank: int) -> float:
        if not any(key.startswith(f"{component}.") for key in config):
            return float(rank)                       # no metadata for it: s = 1, as diffusers
        # diffusers builds peft's LoraConfig from the component's metadata as written, so an
        # alpha left out of it is LoraConfig's default, 8
        value = config.get(f"{component}.lora_alpha", PEFT_DEFAULT_ALPHA)
        for pattern, a in (config.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):   # peft's get_pattern_key
                value = a
                break
        if config.get(f"{component}.use_rslora"):
            return value * rank / np.sqrt(rank)      # s = alpha / sqrt(r)
        return float(value)
    return alpha


# ---------------------------------------------------------------------------------------------
# Matching the updates to a model's parameters


def _module_names(table: convert.Table, params: Mapping) -> dict[str, tuple[str, convert.Layout]]:
    """The model's weight-carrying modules: reference module name -> (our weight path, layout)."""
    compiled = table.compiled(legacy=False)
    modules = {}
    for path in convert.flatten(params):
        for theirs, layout, _ in convert._match(compiled, path, 1):
            if theirs.endswith(".weight"):
                modules[theirs[:-len(".weight")]] = (path, layout)
    return modules


def lora_deltas(updates: Sequence[LoraUpdate], tables: Mapping[str, convert.Table],
                params: Mapping[str, Mapping], *, what: str = "LoRA") -> dict[str, dict[str, np.ndarray]]:
    """Each update's ``(B @ A) * alpha / r`` in our layout: ``{component: {param path: delta}}``.

    ``tables`` and ``params`` are keyed by component ("unet", "text_encoder"). Updates to the
    same weight add up. Every update must land on a weight of the right shape: the ones that do
    not are listed in one :class:`LoraError` (a LoRA for another architecture never does nothing).
    """
    deltas: dict[str, dict[str, np.ndarray]] = {c: {} for c in tables}
    unmatched, mismatched = [], []
    lookups, shapes = {}, {}
    for component, table in tables.items():
        modules = _module_names(table, params[component])
        lookups[component] = (modules, {"_" + m.replace(".", "_"): m for m in modules})
        shapes[component] = {p: np.shape(w) for p, w in convert.flatten(params[component]).items()}
    for u in updates:
        if u.component not in lookups:
            unmatched.append(f"{u.keys[0]} (for the {u.component}, which was not passed: pass its table "
                             "and parameters, or only the updates with another component)")
            continue
        modules, kohya = lookups[u.component]
        module = u.module
        if module.startswith("_"):   # kohya-ss: underscores for dots, perhaps "text_model_" first
            module = kohya.get(module) or kohya.get(module.replace("_text_model_", "_", 1), module)
        module = module.removeprefix("text_model.")
        if module not in modules:
            unmatched.append(f"{u.keys[0]} (module {module!r})")
            continue
        path, layout = modules[module]
        target = shapes[u.component][path]
        delta = u.delta()
        try:
            ours = layout.to_ours(delta)
        except ValueError:
            ours = None
        if ours is None or ours.shape != target:
            mismatched.append(f"{u.keys[0]}: update {delta.shape} for {module}, whose weight is "
                              f"{tuple(layout.to_reference(np.zeros(target)).shape)}")
            continue
        bucket = deltas[u.component]
        bucket[path] = bucket[path] + ours if path in bucket else ours
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} update(s) match no module of this model (a LoRA for "
                        "another architecture?):\n  " + "\n  ".join(unmatched[:30]))
    if mismatched:
        problems.append(f"{len(mismatched)} update(s) have the wrong shape:\n  " + "\n  ".join(mismatched[:30]))
    if problems:
        raise LoraError(f"{what} does not fit the model:\n" + "\n".join(problems))
    return deltas


def merge(params: Mapping, deltas: Sequence[Mapping[str, np.ndarray]], scales) -> dict:
    """``params + sum_k scales[k] * deltas[k]``: a new parameter tree (pure; jit-able).

    :param params: one component's parameters (a nested dict).
    :param deltas: one ``{param path: delta}`` per adapter, from :func:`lora_deltas`.
    :param scales: one user scale per adapter; may be traced, so that inside ``jax.jit`` a
        new scale re-uses the compiled program.
    """
    flat = convert.flatten(params)
    for delta, scale in zip(deltas, scales, strict=True):
        for path, d in delta.items():
            w = flat[path]
            flat[path] = (w.astype(jnp.float32) + jnp.asarray(scale, jnp.float32) * d).astype(w.dtype)
    return convert.unflatten(flat)
