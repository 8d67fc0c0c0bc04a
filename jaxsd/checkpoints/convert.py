"""From reference (PyTorch) checkpoint keys to jaxsd parameter pytrees, and back.

Every rename jaxsd makes lives in this module, as tables of rows

    (reference key template,                           our parameter path template,        layout)
    ("encoder.layers.{i}.mlp.fc1.weight",              "layers_{i}/mlp/fc1/kernel",         LINEAR)

A ``{name}`` placeholder matches one dot-free (reference) or slash-free (ours) path segment
and carries the same text across. The layout says how the tensor changes on the way:

    LINEAR   torch.nn.Linear weight (out, in)            -> flax Dense kernel (in, out)
    CONV     torch.nn.Conv2d weight (O, I, kH, kW)       -> flax Conv kernel (kH, kW, I, O)
    COPY     biases, norm scales, embeddings: unchanged

:func:`convert` checks every tensor's shape against the shapes of the freshly initialised
module, and raises one :class:`ConversionError` that lists every missing key, every unexpected
key and every shape mismatch. Nothing is dropped silently: keys a table deliberately skips
(buffers such as CLIP's ``position_ids``) are listed in the table's ``ignore`` with a reason.
Old reference names that published checkpoints still carry (the SD 1.x VAE's attention
``query``/``key``/``value``/``proj_attn``) are the table's ``legacy_rows``: read, never written.

The per-model tables (CLIP text encoder, VAE, UNet) follow the engine.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.checkpoints.files import is_floating


# ---------------------------------------------------------------------------------------------
# Layouts: a forward transform (reference -> ours) and its inverse (ours -> reference).

@dataclass(frozen=True)
class Layout:
    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_reference: Callable[[np.ndarray], np.ndarray]


COPY = Layout("copy", lambda w: w, lambda w: w)
# nn.Linear stores (out, in); flax Dense kernels are (in, out).
LINEAR = Layout("linear", lambda w: w.T, lambda w: w.T)
# nn.Conv2d stores OIHW; flax Conv kernels are HWIO.
CONV = Layout("conv", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
# A 1x1 nn.Conv2d (O, I, 1, 1) used where we have a Dense (in, out); old SD 1.x VAE attention.
CONV1X1_AS_LINEAR = Layout("conv1x1_as_linear", lambda w: w.reshape(w.shape[:2]).T,
                           lambda w: w.T[:, :, None, None])


@dataclass(frozen=True)
class Table:
    """A model's conversion table: rows of (reference template, our template, layout)."""
    rows: tuple[tuple[str, str, Layout], ...]
    # Reference keys that are known and deliberately not converted: (template, reason).
    ignore: tuple[tuple[str, str], ...] = ()
    # A prefix some checkpoints put before every key (transformers < 5 saved CLIPTextModel's
    # keys as "text_model.<key>", transformers 5 saves "<key>"); stripped before matching, and
    # written by to_reference, since every loader reads that form.
    prefix: str = ""
    # Older reference names for the same parameters, still found in published checkpoints:
    # read by :func:`convert`, never written by :func:`to_reference` (which writes ``rows``).
    legacy_rows: tuple[tuple[str, str, Layout], ...] = ()
    # Reference keys saved without ``prefix`` (CLIPTextModelWithProjection's text_projection
    # sits beside text_model, not in it): to_reference writes them bare.
    unprefixed: tuple[str, ...] = ()
    _compiled: list = field(default=None, init=False, repr=False, compare=False)

    def compiled(self, legacy: bool = True):
        if self._compiled is None:
            object.__setattr__(self, "_compiled", [
                (_template_regex(theirs, "."), _template_regex(ours, "/"), theirs, ours, layout,
                 is_legacy)
                for rows, is_legacy in ((self.rows, False), (self.legacy_rows, True))
                for theirs, ours, layout in rows])
        return [row for row in self._compiled if legacy or not row[5]]


def _template_regex(template: str, separator: str) -> re.Pattern:
    """``"a.{i}.b"`` -> ``^a\\.(?P<i>[^.]+)\\.b$``."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>[^{re.escape(separator)}]+)"
                      for k, p in enumerate(parts))
    return re.compile(f"^{pattern}$")


class ConversionError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists every problem."""


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping) -> dict:
    """``{"a/b/c": leaf}`` -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def expected_shapes(model, *example_inputs, **kwargs) -> dict:
    """Parameter path -> shape of ``model``'s own initialisation (traced, nothing allocated)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs, **kwargs))
    return {path: tuple(leaf.shape) for path, leaf in flatten(variables["params"]).items()}


def _match(compiled, key: str, which: int):
    """The rows whose template ``which`` (0 reference, 1 ours) matches ``key``, with the other key."""
    hits = []
    for row in compiled:
        m = row[which].match(key)
        if m:
            other_template = row[3] if which == 0 else row[2]
            hits.append((other_template.format(**m.groupdict()), row[4], row[2 + which]))
    return hits


def convert(state_dict: Mapping[str, np.ndarray], table: Table, shapes: Mapping[str, tuple],
            dtype=None, what: str = "checkpoint") -> dict:
    """Reference state dict -> our nested parameter dict (of ``jnp`` arrays).

    :param state_dict: reference key -> array (e.g. a lazy :class:`jaxsd.checkpoints.files.StateDict`).
    :param table: the model's :class:`Table`.
    :param shapes: our parameter path -> expected shape (see :func:`expected_shapes`).
    :param dtype: cast floating parameters to this dtype (None keeps the checkpoint's).
    :param what: a name for the checkpoint in error messages.
    """
    compiled = table.compiled()
    ignored = [(_template_regex(t, "."), reason) for t, reason in table.ignore]
    params, seen, unexpected, mismatched, ambiguous, duplicated, not_float, not_finite = {}, {}, [], [], [], [], [], []
    for key in state_dict:
        bare = key[len(table.prefix):] if table.prefix and key.startswith(table.prefix) else key
        hits = _match(compiled, bare, 0)
        if not hits:
            if not any(regex.match(bare) for regex, _ in ignored):
                unexpected.append(key)
            continue
        if len(hits) > 1:
            ambiguous.append(f"{key} -> {[h[0] for h in hits]}")
            continue
        path, layout, _ = hits[0]
        if path not in shapes:
            unexpected.append(f"{key} (would be {path}, which this model does not have)")
            continue
        if path in seen:
            duplicated.append(f"{key} -> {path}, which {seen[path]} already gave")
            continue
        seen[path] = key
        array = layout.to_ours(state_dict[key])
        if not is_floating(array.dtype):
            not_float.append(f"{key} -> {path}: stored as {array.dtype}")
            continue
        if not np.isfinite(array).all():  # NaN or inf weights draw black images, far from here
            not_finite.append(f"{key} -> {path}: {int((~np.isfinite(array)).sum())} of {array.size} values")
            continue
        if tuple(array.shape) != tuple(shapes[path]):
            mismatched.append(f"{key} -> {path}: checkpoint {tuple(array.shape)} "
                              f"({layout.name} layout), model {tuple(shapes[path])}")
            continue
        if dtype is not None and is_floating(array.dtype):
            array = array.astype(dtype, copy=False)  # no extra copy when it already is
        params[path] = jnp.asarray(array)
    missing = sorted(set(shapes) - set(seen))
    problems = []
    for title, items in (("missing (the model needs them, the checkpoint lacks them)", missing),
                         ("unexpected (in the checkpoint, unknown to the model)", unexpected),
                         ("with the wrong shape", mismatched),
                         ("not stored as floating point (weights must be F32, F16, BF16 or F8)", not_float),
                         ("holding NaN or infinite values (a damaged file)", not_finite),
                         ("for a parameter another key already gave (e.g. an old and a new name)", duplicated),
                         ("matched by several table rows (a bug in jaxsd's table)", ambiguous)):
        if items:
            problems.append(f"{len(items)} key(s) {title}:\n  " + "\n  ".join(items))
    if problems:
        raise ConversionError(f"{what} does not fit the model:\n" + "\n".join(problems))
    return unflatten(params)


def to_reference(params: Mapping, table: Table) -> dict:
    """Our nested parameters -> reference state dict of NumPy arrays (for saving checkpoints)."""
    compiled = table.compiled(legacy=False)
    state = {}
    for path, leaf in flatten(params).items():
        hits = _match(compiled, path, 1)
        if len(hits) != 1:
            raise ConversionError(f"parameter {path} is matched by {len(hits)} table rows, need 1")
        key, layout, _ = hits[0]
        prefix = "" if key in table.unprefixed else table.prefix
        state[prefix + key] = np.ascontiguousarray(layout.to_reference(np.asarray(leaf)))
    return state


# ---------------------------------------------------------------------------------------------
# The VAE (diffusers' AutoencoderKL) -> jaxsd.models.vae.AutoencoderKL.
#
# diffusers nests the levels as ``down_blocks.{i}.resnets.{j}``; jaxsd names the same modules
# ``down_{i}_resnet_{j}`` inside the encoder (``up_{i}_resnet_{j}`` in the decoder, widest level
# first in both). The mid-block attention is one Dense per projection in jaxsd.

# diffusers stores the attention projections as nn.Linear (out, in). Checkpoints converted from
# the original LDM code by older scripts can carry them as 1x1 convs (out, in, 1, 1); we read
# both and write the Linear form. Any other shape falls through to the shape check.
LINEAR_OR_CONV1X1 = Layout(
    "linear_or_conv1x1",
    lambda w: (w[:, :, 0, 0] if w.ndim == 4 and w.shape[2:] == (1, 1) else w).T,
    lambda w: w.T)

_VAE_RESNET = (  # diffusers' ResnetBlock2D -> jaxsd.models.layers.ResnetBlock
    ("norm1.weight", "norm1/scale", COPY), ("norm1.bias", "norm1/bias", COPY),
    ("conv1.weight", "conv1/kernel", CONV), ("conv1.bias", "conv1/bias", COPY),
    ("norm2.weight", "norm2/scale", COPY), ("norm2.bias", "norm2/bias", COPY),
    ("conv2.weight", "conv2/kernel", CONV), ("conv2.bias", "conv2/bias", COPY),
    ("conv_shortcut.weight", "shortcut/kernel", CONV), ("conv_shortcut.bias", "shortcut/bias", COPY),
)
_VAE_CONV = (("weight", "kernel", CONV), ("bias", "bias", COPY))
_VAE_NORM = (("weight", "scale", COPY), ("bias", "bias", COPY))
_VAE_ATTENTION = (  # diffusers' names, the old AttentionBlock names, ours
    ("to_q", "query", "query"), ("to_k", "key", "key"), ("to_v", "value", "value"),
    ("to_out.0", "proj_attn", "out"),
)

VAE = Table(
    rows=(
        *((f"{theirs}.{p}", f"{ours}/{q}", layout)
          for theirs, ours in (("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
                               ("encoder.conv_in", "encoder/conv_in"), ("encoder.conv_out", "encoder/conv_out"),
                               ("decoder.conv_in", "decoder/conv_in"), ("decoder.conv_out", "decoder/conv_out"),
                               ("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder/down_{i}_downsample/conv"),
                               ("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder/up_{i}_upsample/conv"))
          for p, q, layout in _VAE_CONV),
        *((f"{part}.conv_norm_out.{p}", f"{part}/norm_out/{q}", layout)
          for part in ("encoder", "decoder") for p, q, layout in _VAE_NORM),
        *((f"{theirs}.{p}", f"{ours}/{q}", layout)
          for theirs, ours in (("encoder.down_blocks.{i}.resnets.{j}", "encoder/down_{i}_resnet_{j}"),
                               ("decoder.up_blocks.{i}.resnets.{j}", "decoder/up_{i}_resnet_{j}"),
                               ("encoder.mid_block.resnets.{j}", "encoder/mid/resnet_{j}"),
                               ("decoder.mid_block.resnets.{j}", "decoder/mid/resnet_{j}"))
          for p, q, layout in _VAE_RESNET),
        *((f"{part}.mid_block.attentions.0.group_norm.{p}", f"{part}/mid/attention/norm/{q}", layout)
          for part in ("encoder", "decoder") for p, q, layout in _VAE_NORM),
        *((f"{part}.mid_block.attentions.0.{theirs}.{p}", f"{part}/mid/attention/{ours}/{q}", layout)
          for part in ("encoder", "decoder") for theirs, _, ours in _VAE_ATTENTION
          for p, q, layout in (("weight", "kernel", LINEAR_OR_CONV1X1), ("bias", "bias", COPY))),
    ),
    # diffusers still reads these (ModelMixin._fix_state_dict_keys_on_load); SD 1.x VAE files
    # saved before the rename carry them.
    legacy_rows=tuple(
        (f"{part}.mid_block.attentions.0.{old}.{p}", f"{part}/mid/attention/{ours}/{q}", layout)
        for part in ("encoder", "decoder") for _, old, ours in _VAE_ATTENTION
        for p, q, layout in (("weight", "kernel", LINEAR_OR_CONV1X1), ("bias", "bias", COPY))),
)


# ---------------------------------------------------------------------------------------------
# The CLIP text encoder (transformers' CLIPTextModel) -> jaxsd.models.clip.CLIPTextModel.

CLIP_TEXT = Table(
    rows=(
        ("embeddings.token_embedding.weight", "token_embedding/embedding", COPY),
        ("embeddings.position_embedding.weight", "position_embedding", COPY),
        *(
            (f"encoder.layers.{{i}}.{theirs}.{p}", f"layers_{{i}}/{ours}/{q}", layout)
            for theirs, ours in (("self_attn.q_proj", "attn/query"), ("self_attn.k_proj", "attn/key"),
                                 ("self_attn.v_proj", "attn/value"), ("self_attn.out_proj", "attn/out"),
                                 ("mlp.fc1", "mlp/fc1"), ("mlp.fc2", "mlp/fc2"))
            for p, q, layout in (("weight", "kernel", LINEAR), ("bias", "bias", COPY))
        ),
        *(
            (f"{theirs}.{p}", f"{ours}/{q}", COPY)
            for theirs, ours in (("encoder.layers.{i}.layer_norm1", "layers_{i}/norm1"),
                                 ("encoder.layers.{i}.layer_norm2", "layers_{i}/norm2"),
                                 ("final_layer_norm", "final_norm"))
            for p, q in (("weight", "scale"), ("bias", "bias"))
        ),
        ("text_projection.weight", "text_projection/kernel", LINEAR),  # WithProjection only
    ),
    unprefixed=("text_projection.weight",),
    ignore=(("embeddings.position_ids",
             "a constant buffer arange(max_position_embeddings) that older transformers saved"),),
    prefix="text_model.",
)


# ---------------------------------------------------------------------------------------------
# The UNet (diffusers' UNet2DConditionModel) -> jaxsd.models.unet.UNet.
#
# diffusers groups the UNet into blocks (down_blocks.{i}.resnets.{j}, .attentions.{j},
# .downsamplers.0; mid_block; up_blocks.{i} counted from the lowest resolution); jaxsd names
# modules by resolution level (down_{l}_res_{j}, up_{l}_res_{j}, with up level l = L - 1 - i).
# Rows below are generated from a handful of sub-tables; expanded, they read like
#   down_blocks.{i}.resnets.{j}.conv1.weight                      -> down_{i}_res_{j}/conv1/kernel
#   down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2.to_k.weight
#                                                  -> down_{i}_attn_{j}/blocks_{k}/cross_attn/key/kernel
#   up_blocks.{i}.resnets.{j}.conv_shortcut.weight  (i = 0..L-1) -> up_{L-1-i}_res_{j}/shortcut/kernel

def _weight_rows(theirs: str, ours: str, kind: str):
    """One module's weight and bias rows; ``kind``: norm, conv, conv1x1 (to a Dense), linear, linear_no_bias."""
    weight = {"norm": ("scale", COPY), "conv": ("kernel", CONV), "linear": ("kernel", LINEAR),
              "linear_no_bias": ("kernel", LINEAR), "conv1x1": ("kernel", CONV1X1_AS_LINEAR)}[kind]
    rows = [(f"{theirs}.weight", f"{ours}/{weight[0]}", weight[1])]
    if kind != "linear_no_bias":
        rows.append((f"{theirs}.bias", f"{ours}/bias", COPY))
    return rows


_UNET_RESNET = (("norm1", "norm1", "norm"), ("conv1", "conv1", "conv"),
                ("time_emb_proj", "time_emb_proj", "linear"), ("norm2", "norm2", "norm"),
                ("conv2", "conv2", "conv"), ("conv_shortcut", "shortcut", "conv"))
_UNET_TRANSFORMER_BLOCK = (
    ("norm1", "norm1", "norm"), ("norm2", "norm2", "norm"), ("norm3", "norm3", "norm"),
    *((f"{a}.to_{p}", f"{b}/{q}", "linear_no_bias")
      for a, b in (("attn1", "self_attn"), ("attn2", "cross_attn"))
      for p, q in (("q", "query"), ("k", "key"), ("v", "value"))),
    ("attn1.to_out.0", "self_attn/out", "linear"), ("attn2.to_out.0", "cross_attn/out", "linear"),
    ("ff.net.0.proj", "ff/fc1", "linear"), ("ff.net.2", "ff/fc2", "linear"))


def unet_table(config) -> Table:
    """The conversion table for a :class:`jaxsd.models.unet.UNetConfig` (its levels and projection layout)."""
    L = config.levels
    # SD 1.x stores the transformer's proj_in/proj_out as 1x1 convs, SD 2.x as Linear layers.
    proj = "linear" if config.use_linear_projection else "conv1x1"
    # (their block prefix, our module prefix) of every place ResNet and transformer blocks sit.
    places = ([(f"down_blocks.{l}", f"down_{l}") for l in range(L)] + [("mid_block", "mid")]
              + [(f"up_blocks.{L - 1 - l}", f"up_{l}") for l in range(L)])
    rows = [
        *_weight_rows("conv_in", "conv_in", "conv"),
        *_weight_rows("time_embedding.linear_1", "time_mlp/fc1", "linear"),
        *_weight_rows("time_embedding.linear_2", "time_mlp/fc2", "linear"),
        *(_weight_rows("time_embedding.cond_proj", "time_mlp/cond_proj", "linear_no_bias")
          if config.time_cond_proj_dim is not None else ()),
        *(row for i in (1, 2) for row in _weight_rows(f"add_embedding.linear_{i}", f"add_mlp/fc{i}", "linear")
          if config.addition_embed_type == "text_time"),
        *_weight_rows("conv_norm_out", "norm_out", "norm"),
        *_weight_rows("conv_out", "conv_out", "conv"),
        *(row for l in range(L) for row in _weight_rows(
            f"down_blocks.{l}.downsamplers.0.conv", f"down_{l}_downsample/conv", "conv")),
        *(row for l in range(L) for row in _weight_rows(
            f"up_blocks.{L - 1 - l}.upsamplers.0.conv", f"up_{l}_upsample/conv", "conv")),
    ]
    for theirs, ours in places:
        attn = f"{ours}_attn_{{j}}"
        rows += [row for a, b, kind in _UNET_RESNET
                 for row in _weight_rows(f"{theirs}.resnets.{{j}}.{a}", f"{ours}_res_{{j}}/{b}", kind)]
        rows += [row for a, b, kind in (("norm", "norm", "norm"), ("proj_in", "proj_in", proj),
                                        ("proj_out", "proj_out", proj))
                 for row in _weight_rows(f"{theirs}.attentions.{{j}}.{a}", f"{attn}/{b}", kind)]
        rows += [row for a, b, kind in _UNET_TRANSFORMER_BLOCK
                 for row in _weight_rows(f"{theirs}.attentions.{{j}}.transformer_blocks.{{k}}.{a}",
                                         f"{attn}/blocks_{{k}}/{b}", kind)]
    return Table(rows=tuple(rows))
