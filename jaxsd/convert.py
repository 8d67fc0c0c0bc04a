"""From reference (PyTorch) checkpoint keys to jaxsd parameter pytrees, and back.

Every rename jaxsd makes lives in this module, as tables of rows

    (reference key template,                           our parameter path template,        layout)
    ("text_model.encoder.layers.{i}.mlp.fc1.weight",   "layers_{i}/mlp/fc1/kernel",         LINEAR)

A ``{name}`` placeholder matches one dot-free (reference) or slash-free (ours) path segment
and carries the same text across. The layout says how the tensor changes on the way:

    LINEAR   torch.nn.Linear weight (out, in)            -> flax Dense kernel (in, out)
    CONV     torch.nn.Conv2d weight (O, I, kH, kW)       -> flax Conv kernel (kH, kW, I, O)
    COPY     biases, norm scales, embeddings: unchanged

:func:`convert` checks every tensor's shape against the shapes of the freshly initialised
module, and raises one :class:`ConversionError` that lists every missing key, every unexpected
key and every shape mismatch. Nothing is dropped silently: keys a table deliberately skips
(buffers such as CLIP's ``position_ids``) are listed in the table's ``ignore`` with a reason.

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

from jaxsd.checkpoint import is_floating


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
    _compiled: list = field(default=None, init=False, repr=False, compare=False)

    def compiled(self):
        if self._compiled is None:
            object.__setattr__(self, "_compiled", [
                (_template_regex(theirs, "."), _template_regex(ours, "/"), theirs, ours, layout)
                for theirs, ours, layout in self.rows])
        return self._compiled


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

    :param state_dict: reference key -> array (e.g. a lazy :class:`jaxsd.checkpoint.StateDict`).
    :param table: the model's :class:`Table`.
    :param shapes: our parameter path -> expected shape (see :func:`expected_shapes`).
    :param dtype: cast floating parameters to this dtype (None keeps the checkpoint's).
    :param what: a name for the checkpoint in error messages.
    """
    compiled = table.compiled()
    ignored = [(_template_regex(t, "."), reason) for t, reason in table.ignore]
    params, seen, unexpected, mismatched, ambiguous = {}, set(), [], [], []
    for key in state_dict:
        hits = _match(compiled, key, 0)
        if not hits:
            if not any(regex.match(key) for regex, _ in ignored):
                unexpected.append(key)
            continue
        if len(hits) > 1:
            ambiguous.append(f"{key} -> {[h[0] for h in hits]}")
            continue
        path, layout, _ = hits[0]
        if path not in shapes:
            unexpected.append(f"{key} (would be {path}, which this model does not have)")
            continue
        seen.add(path)
        array = layout.to_ours(state_dict[key])
        if tuple(array.shape) != tuple(shapes[path]):
            mismatched.append(f"{key} -> {path}: checkpoint {tuple(array.shape)} "
                              f"({layout.name} layout), model {tuple(shapes[path])}")
            continue
        if dtype is not None and is_floating(array.dtype):
            array = array.astype(dtype, copy=False)  # no extra copy when it already is
        params[path] = jnp.asarray(array)
    missing = sorted(set(shapes) - seen)
    problems = []
    for title, items in (("missing (the model needs them, the checkpoint lacks them)", missing),
                         ("unexpected (in the checkpoint, unknown to the model)", unexpected),
                         ("with the wrong shape", mismatched),
                         ("matched by several table rows (a bug in jaxsd's table)", ambiguous)):
        if items:
            problems.append(f"{len(items)} key(s) {title}:\n  " + "\n  ".join(items))
    if problems:
        raise ConversionError(f"{what} does not fit the model:\n" + "\n".join(problems))
    return unflatten(params)


def to_reference(params: Mapping, table: Table) -> dict:
    """Our nested parameters -> reference state dict of NumPy arrays (for saving checkpoints)."""
    compiled = table.compiled()
    state = {}
    for path, leaf in flatten(params).items():
        hits = _match(compiled, path, 1)
        if len(hits) != 1:
            raise ConversionError(f"parameter {path} is matched by {len(hits)} table rows, need 1")
        key, layout, _ = hits[0]
        state[key] = np.ascontiguousarray(layout.to_reference(np.asarray(leaf)))
    return state


# ---------------------------------------------------------------------------------------------
# The CLIP text encoder (transformers' CLIPTextModel) -> jaxsd.clip.CLIPTextModel.

CLIP_TEXT = Table(
    rows=(
        ("text_model.embeddings.token_embedding.weight", "token_embedding/embedding", COPY),
        ("text_model.embeddings.position_embedding.weight", "position_embedding", COPY),
        *(
            (f"text_model.encoder.layers.{{i}}.{theirs}.{p}", f"layers_{{i}}/{ours}/{q}", layout)
            for theirs, ours in (("self_attn.q_proj", "attn/query"), ("self_attn.k_proj", "attn/key"),
                                 ("self_attn.v_proj", "attn/value"), ("self_attn.out_proj", "attn/out"),
                                 ("mlp.fc1", "mlp/fc1"), ("mlp.fc2", "mlp/fc2"))
            for p, q, layout in (("weight", "kernel", LINEAR), ("bias", "bias", COPY))
        ),
        *(
            (f"text_model.{theirs}.{p}", f"{ours}/{q}", COPY)
            for theirs, ours in (("encoder.layers.{i}.layer_norm1", "layers_{i}/norm1"),
                                 ("encoder.layers.{i}.layer_norm2", "layers_{i}/norm2"),
                                 ("final_layer_norm", "final_norm"))
            for p, q in (("weight", "scale"), ("bias", "bias"))
        ),
    ),
    ignore=(("text_model.embeddings.position_ids",
             "a constant buffer arange(max_position_embeddings) that older transformers saved"),),
)


# ---------------------------------------------------------------------------------------------
# The UNet (diffusers' UNet2DConditionModel) -> jaxsd.unet.UNet.
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
    """The conversion table for a :class:`jaxsd.unet.UNetConfig` (its levels and projection layout)."""
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
