"""Reliability: damaged and wrong files are refused with jaxsd's own errors, naming the file.

The fuzz test below makes a few hundred variants of a real component folder (the built-in
model's VAE: config.json + diffusion_pytorch_model.safetensors), seeded, and checks each one
against the official ``safetensors`` reader as the oracle for the format:

    the official reader refuses it   -> jaxsd raises CheckpointError naming the file
    the official reader accepts it   -> jaxsd reads the same arrays, byte for byte, or refuses
                                        with CheckpointError / ConversionError for a reason the
                                        format does not check (duplicate names in the header,
                                        integer or non-finite weights)

and, at the folder level, ``load_vae`` either loads finite float parameters or raises one of
jaxsd's errors: never MemoryError, struct.error, JSONDecodeError, OverflowError or an abort.
"""
import collections
import json
import shutil
import struct

import numpy as np
import pytest
import safetensors

from jaxsd.checkpoints.components import load_vae
from jaxsd.checkpoints.convert import ConversionError
from jaxsd.checkpoints.files import CheckpointError, SafetensorsFile
from jaxsd.checkpoints.sources import BUILTIN_MODELS

VAE = BUILTIN_MODELS["tiny-shapes"] / "vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
BASE = (VAE / WEIGHTS).read_bytes()


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes, *, text: str | None = None) -> bytes:
    encoded = (text if text is not None else json.dumps(header)).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def variants(seed: int = 0):
    """(class, description, bytes) for every variant; seeded, so the same list every run."""
    rng = np.random.default_rng(seed)
    header, data = _split(BASE)
    names = [k for k in header if k != "__metadata__"]
    pick = lambda: names[rng.integers(len(names))]
    copy = lambda: json.loads(json.dumps(header))

    for cut in sorted(rng.integers(1, len(BASE), size=20)) + [0, 4, 8]:
        yield "truncated", f"first {cut} bytes", BASE[:cut]
    n = len(BASE) - 8 - len(data)
    for size in (0, 1, n - 1, n + 1, len(BASE), 2**31, 2**40, 2**63, 2**64 - 1):
        yield "header size", f"header size {size}", struct.pack("<Q", size) + BASE[8:]
    text = BASE[8:8 + n].decode()
    for position in rng.integers(0, n, size=60):
        character = "{}[]\":,0x-"[rng.integers(10)]
        yield "header bytes", f"byte {position} -> {character!r}", _join(
            None, data, text=text[:position] + character + text[position + 1:])
    for dtype in ("F32", "F16", "BF16", "F64", "I16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X9"):
        h, name = copy(), pick()
        h[name]["dtype"] = dtype
        yield "dtype", f"{name} labelled {dtype}", _join(h, data)
    for edit in ("string", "negative", "extra 1", "extra 2", "transpose", "empty", "huge"):
        h, name = copy(), pick()
        shape = h[name]["shape"]
        h[name]["shape"] = {"string": [str(d) for d in shape], "negative": [-d for d in shape],
                            "extra 1": shape + [1], "extra 2": shape + [2], "transpose": shape[::-1],
                            "empty": [], "huge": [2**62, 4]}[edit]
        yield "shape", f"{name} shape {edit}", _join(h, data)
    for edit in ("shift +2", "shift -2", "negative", "overlap", "missing", "strings", "reversed", "past end"):
        h, name = copy(), pick()
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = {"shift +2": [begin + 2, end + 2], "shift -2": [begin - 2, end - 2],
                                   "negative": [-8, end - begin - 8], "overlap": [0, end - begin],
                                   "missing": None, "strings": [str(begin), str(end)],
                                   "reversed": [end, begin], "past end": [begin, len(data) + 8]}[edit]
        if h[name]["data_offsets"] is None:
            del h[name]["data_offsets"]
        yield "offsets", f"{name} offsets {edit}", _join(h, data)
    name = pick()
    yield "duplicate name", f"{name} twice", _join(None, data, text=json.dumps(header)[:-1]
                                                   + f', "{name}": ' + json.dumps(header[name]) + "}")
    h = copy()
    h["__metadata__"] = {"format": 5}
    yield "metadata", "a non-string metadata value", _join(h, data)
    yield "not safetensors", "Git LFS pointer", (b"version https://git-lfs.github.com/spec/v1\n"
                                                  b"oid sha256:" + b"0" * 64 + b"\nsize 1364070\n")
    yield "not safetensors", "HTML page", b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n"
    yield "not safetensors", "zip (torch.save)", b"PK\x03\x04" + bytes(200)
    yield "not safetensors", "pickle", b"\x80\x02}q\x00." + bytes(100)
    yield "not safetensors", "empty file", b""
    yield "not safetensors", "JSON instead", b'{"weights": [1, 2, 3]}'
    for value in (np.nan, np.inf, -np.inf):
        h, name = copy(), pick()
        begin, _ = h[name]["data_offsets"]
        dtype = {"F16": np.float16, "F32": np.float32}[h[name]["dtype"]]
        patched = bytearray(data)
        patched[begin:begin + np.dtype(dtype).itemsize] = np.array([value], dtype).tobytes()
        yield "data", f"{name}[0] = {value}", _join(header, bytes(patched))
    for position in rng.integers(0, len(data), size=30):   # random bit flips in the weights
        patched = bytearray(data)
        patched[position] ^= 1 << int(rng.integers(8))
        yield "data", f"bit flip at data byte {position}", _join(header, bytes(patched))


def _official(path):
    """The arrays the official reader gives, or the error it raises."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, None
    except Exception as error:
        return None, error


def test_fuzzed_weight_files_are_read_as_the_official_reader_or_refused_clearly(tmp_path):
    base_params = load_vae(VAE)[1]
    counts = collections.Counter()
    for kind, description, raw in variants():
        folder = tmp_path / "vae"
        folder.mkdir(exist_ok=True)
        shutil.copy(VAE / "config.json", folder / "config.json")
        path = folder / WEIGHTS
        path.write_bytes(raw)
        label = f"{kind}: {description}"
        official, official_error = _official(path)
        try:
            ours = SafetensorsFile(path)
            arrays = {k: np.asarray(ours[k]) for k in ours}
        except CheckpointError as error:
            assert str(path) in str(error), f"{label}: the error does not name the file: {error}"
            duplicate = kind == "duplicate name"
            assert official is None or duplicate, f"{label}: refused what the official reader reads: {error}"
            counts[kind, "refused by the reader"] += 1
            continue
        assert official is not None, f"{label}: read what the official reader refuses ({official_error})"
        assert sorted(arrays) == sorted(official), label
        for k in arrays:
            if arrays[k].dtype.kind in "fiub":     # NumPy's own types: compare to the oracle
                assert arrays[k].dtype == official[k].dtype, label
                np.testing.assert_array_equal(arrays[k].view(np.uint8), official[k].view(np.uint8), label)
        try:
            params = load_vae(folder)[1]
        except (CheckpointError, ConversionError) as error:
            assert "VAE" in str(error) and str(folder) in str(error), f"{label}: {error}"
            counts[kind, "refused at conversion"] += 1
            continue
        leaves = [np.asarray(x) for x in _leaves(params)]
        assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in leaves), label
        same = all(np.array_equal(a, b) for a, b in zip(leaves, map(np.asarray, _leaves(base_params))))
        counts[kind, "loaded, same weights" if same else "loaded, weights the file really holds"] += 1
    print()
    for (kind, outcome), n in sorted(counts.items()):
        print(f"  {kind:16s} {outcome:40s} {n}")
    assert sum(counts.values()) >= 150
    # The classes that must never load: everything the format itself rules out.
    for kind in ("truncated", "header size", "offsets", "not safetensors", "duplicate name"):
        assert not any(k == kind and o.startswith("loaded") for k, o in counts), kind


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


@pytest.mark.parametrize("description", ["Git LFS pointer", "HTML page", "zip (torch.save)", "pickle"])
def test_the_usual_broken_downloads_are_named(tmp_path, description):
    raw = next(r for k, d, r in variants() if d == description)
    path = tmp_path / WEIGHTS
    path.write_bytes(raw)
    expected = {"Git LFS pointer": "git lfs pull", "HTML page": "HTML", "zip (torch.save)": "zip",
                "pickle": "pickle"}[description]
    with pytest.raises(CheckpointError, match=expected):
        SafetensorsFile(path)


def test_transformers_torch_notice_is_dropped_and_nothing_else():
    import logging

    from jaxsd.checkpoints import tokenizer

    tokenizer.load_tokenizer()
    assert tokenizer._drop_torch_notice in logging.getLogger("transformers").filters
    record = lambda message: logging.LogRecord("transformers", logging.WARNING, __file__, 1, message, None, None)
    assert not tokenizer._drop_torch_notice(record(
        "PyTorch was not found. Models won't be available and only tokenizers, configuration and "
        "file/data utilities can be used."))
    assert tokenizer._drop_torch_notice(record("Token indices sequence length is longer than the maximum"))


# ---------------------------------------------------------------------------------------------
# Configs: every value is checked when the folder loads, and the error names the file.

from jaxsd import StableDiffusion  # noqa: E402

FOLDER = BUILTIN_MODELS["tiny-shapes"]
BAD_VALUES = (0, -1, float("nan"), float("inf"), "abc", None, [], True, 10**12)
CONFIG_KEYS = {  # component -> the keys whose values change the model or the schedule
    "text_encoder/config.json": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "max_position_embeddings", "layer_norm_eps",
                                 "eos_token_id", "hidden_act"),
    "unet/config.json": ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                         "in_channels", "out_channels", "norm_num_groups", "norm_eps", "sample_size",
                         "time_embedding_dim", "transformer_layers_per_block"),
    "vae/config.json": ("block_out_channels", "latent_channels", "norm_num_groups", "scaling_factor",
                        "layers_per_block", "in_channels"),
    "scheduler/scheduler_config.json": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                        "prediction_type", "trained_betas", "steps_offset"),
}


def config_variants(seed: int = 0):
    """(file, description, edit) with edit(dict) -> dict or a raw string; seeded."""
    rng = np.random.default_rng(seed)
    for file, keys in CONFIG_KEYS.items():
        for key in keys:
            for value in [BAD_VALUES[i] for i in rng.choice(len(BAD_VALUES), size=3, replace=False)]:
                yield file, (key, value), lambda c, key=key, value=value: {**c, key: value}
        yield file, "not JSON", lambda c: json.dumps(c)[:-3]
        yield file, "a JSON list", lambda c: [c]
    yield "model_index.json", "an SDXL pipeline", lambda c: {**c, "_class_name": "StableDiffusionXLPipeline"}
    yield "model_index.json", "unet of another class", lambda c: {**c, "unet": ["diffusers", "UNet2DModel"]}
    yield "model_index.json", "not JSON", lambda c: "{"
    yield "scheduler/scheduler_config.json", "trained_betas of length 2", lambda c: {**c, "trained_betas": [0.1, 0.2]}


# The few edits that still describe a valid model (the fuzz accepts these loading): no
# steps_offset, no trained_betas (the beta_schedule then applies), no sample_size (512 px).
VALID = {("steps_offset", 0), ("trained_betas", None), ("sample_size", None), ("eos_token_id", 0)}


@pytest.fixture(scope="module")
def folder_copy(tmp_path_factory):
    target = tmp_path_factory.mktemp("fuzz") / "tiny"
    shutil.copytree(FOLDER, target)
    return target


def test_fuzzed_configs_are_refused_naming_the_file(folder_copy):
    counts = collections.Counter()
    for file, description, edit in config_variants():
        path = folder_copy / file
        original = path.read_text()
        edited = edit(json.loads(original))
        path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
        label = f"{file}: {description if isinstance(description, str) else '%s=%r' % description}"
        try:
            StableDiffusion.from_pretrained(str(folder_copy))
        except (CheckpointError, ConversionError) as error:
            component = file.split("/")[0]
            assert component in str(error), f"{label}: the error does not name {component}: {error}"
            counts[file, "refused"] += 1
        else:
            assert description in VALID, f"{label}: loaded silently"
            counts[file, "loaded (a valid value)"] += 1
        finally:
            path.write_text(original)
    print()
    for (file, outcome), n in sorted(counts.items()):
        print(f"  {file:34s} {outcome:24s} {n}")
    assert sum(counts.values()) >= 100


# ---------------------------------------------------------------------------------------------
# API arguments: every bad value raises ValueError naming the argument, before any compiling.

NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = {
    "num_steps": (0, -1, True, 1.5, "3", 10**6, None),
    "guidance_scale": (NAN, INF, -INF, "7.5", [7.5]),   # None: the model's default
    "guidance_rescale": (NAN, -0.1, 1.5, "0"),
    "eta": (NAN, 5.0, -1.0, "1"),
    "seed": (-1, 2**64, 1.5, True, "0", None),
    "height": (0, -64, 63, 100_000, 64.0, True),
    "prompt": (123, None, [], [1, 2], ["ok", None]),
    "negative_prompt": (5, [3], ["a", "b"]),
    "batch_size": (0, -1, 1.5, True, 3),
    "latents": (np.full((1, 16, 16, 4), np.nan, np.float32), np.zeros((1, 8, 8, 4), np.float32)),
    "scheduler": ("eulr", "", 3),
    "denoising_end": (0, 1.0, -0.2, NAN, "0.5", True),
}


def api_variants():
    base = dict(prompt="a red circle on a blue background", num_steps=2, seed=0)
    for name, values in BAD_ARGUMENTS.items():
        for value in values:
            kwargs = dict(base, **{name: value})
            if name == "height":
                kwargs["width"] = 64
            if name == "batch_size":
                kwargs["prompt"] = ["a red circle", "a blue square"]
            yield name, value, kwargs


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusion.from_pretrained("tiny-shapes")


def test_fuzzed_api_arguments_are_refused_naming_the_argument(tiny):
    n = 0
    for name, value, kwargs in api_variants():
        label = f"{name}={value!r}"[:80]
        with pytest.raises(ValueError) as caught:
            tiny.text_to_image(**kwargs)
        message = str(caught.value)
        expected = {"latents": "latents", "scheduler": "sampler"}.get(name, name)
        assert expected in message, f"{label}: {message}"
        n += 1
    bad_images = {"image": (np.full((64, 64, 3), np.nan, np.float32), np.full((64, 64, 3), 2.0, np.float32),
                            np.full((64, 64, 3), 300, np.int32), "picture.png"),
                  "strength": (0, 1.5, NAN, "0.5", True)}
    good = np.zeros((64, 64, 3), np.uint8)
    for name, values in bad_images.items():
        for value in values:
            kwargs = {**dict(image=good, prompt="a red circle", num_steps=2, strength=0.5), name: value}
            with pytest.raises((ValueError, TypeError)) as caught:
                tiny.image_to_image(**kwargs)
            assert name in str(caught.value), f"{name}={value!r}: {caught.value}"
            n += 1
    assert n >= 60


def test_valid_inputs_that_used_to_be_refused(tiny):
    """A NumPy float strength and an RGB [H, W, 3] mask array are valid."""
    image = np.zeros((64, 64, 3), np.uint8)
    out = tiny.image_to_image(image, "a red circle", strength=np.float32(0.5), num_steps=2, seed=1)
    assert out.shape == (1, 64, 64, 3)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:32] = 255
    out = tiny.inpaint(image, mask, "a red circle", num_steps=2, seed=1)
    assert out.shape == (1, 64, 64, 3)
    gray = tiny.inpaint(image, mask[..., 0], "a red circle", num_steps=2, seed=1)
    np.testing.assert_array_equal(out, gray)


def test_write_single_file_takes_jaxsds_own_per_level_configs(tmp_path):
    """The shipped folder's configs list per-level counts ([1, 1, 1]); the original layout has one
    value per model, which equal levels give. Writing it and reading it back loads the same UNet."""
    from jaxsd.checkpoints.files import read_config, read_state_dict
    from jaxsd.checkpoints.sources import load_single_file
    from jaxsd.checkpoints.single_file import write_single_file

    parts = ("unet", "vae", "text_encoder")
    configs = {p: read_config(FOLDER / p) for p in parts}
    state_dicts = {p: {k: np.asarray(v) for k, v in read_state_dict(FOLDER / p).items()} for p in parts}
    path = tmp_path / "tiny.safetensors"
    write_single_file(path, state_dicts, configs, "sd1")
    # What the tensors cannot show, from the folder's configs:
    overrides = {"unet_config": {"attention_head_dim": configs["unet"]["attention_head_dim"],
                                 "norm_num_groups": configs["unet"]["norm_num_groups"]},
                 "vae_config": {"norm_num_groups": configs["vae"]["norm_num_groups"]},
                 "text_encoder_config": {"num_attention_heads": configs["text_encoder"]["num_attention_heads"]}}
    loaded = load_single_file(path, overrides=overrides)
    folder = StableDiffusion.from_pretrained("tiny-shapes")
    import jax
    for ours, theirs in ((loaded.unet_params, folder.unet_params), (loaded.vae_params, folder.vae_params)):
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)

    bad = dict(configs, unet=dict(configs["unet"], layers_per_block=[1, 2, 1]))
    with pytest.raises(ValueError, match="one value for every level"):
        write_single_file(tmp_path / "bad.safetensors", state_dicts, bad, "sd1")


# ---------------------------------------------------------------------------------------------
# Single files: the built-in model written as one CompVis-layout file, then damaged. Every
# variant loads the model the file describes or is refused with jaxsd's own error naming the
# file or the argument; nothing is guessed that the tensors cannot show.

def _single_file_parts():
    from jaxsd.checkpoints.files import read_config, read_state_dict
    parts = ("unet", "vae", "text_encoder")
    configs = {p: read_config(FOLDER / p) for p in parts}
    state_dicts = {p: {k: np.asarray(v) for k, v in read_state_dict(FOLDER / p).items()} for p in parts}
    return configs, state_dicts


def _unseen(configs):
    from jaxsd.checkpoints.ldm_arch import UNSEEN
    return {f"{c}_config": {k: configs[c][k] for k in keys} for c, keys in UNSEEN.items() if c in configs}


def single_file_variants(tensors: dict, unseen: dict, seed: int = 0):
    """(class, description, tensors, overrides, must_load); seeded."""
    rng = np.random.default_rng(seed)
    keys = sorted(tensors)
    for key in rng.choice(keys, 12, replace=False):
        yield "a tensor missing", key, {k: v for k, v in tensors.items() if k != key}, unseen, False
    for key in rng.choice(keys, 8, replace=False):
        renamed = key.rsplit(".", 1)[0] + ".wieght"
        yield "a tensor renamed", key, {(renamed if k == key else k): v for k, v in tensors.items()}, unseen, False
    for key in rng.choice(keys, 20, replace=False):
        v = tensors[key]
        axis = int(rng.integers(v.ndim)) if v.ndim else None
        grown = np.zeros(v.shape[:axis] + (v.shape[axis] + 1,) + v.shape[axis + 1:], v.dtype) if v.ndim else v[None]
        # A consistent different model is possible only where the tensors define a size alone
        # (the vocabulary, the positions): that file is valid and loads.
        alone = key.endswith(("token_embedding.weight", "position_embedding.weight")) and axis == 0
        yield "a tensor's shape changed", f"{key} axis {axis}", {**tensors, key: grown}, unseen, alone
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."):
        yield "a component missing", prefix, {k: v for k, v in tensors.items() if not k.startswith(prefix)}, unseen, False
    yield "another model", "SDXL conditioner keys", {**tensors, "conditioner.embedders.0.x": np.zeros(1, np.float32)}, unseen, False
    yield "another model", "an unknown key", {**tensors, "lora_te_text_model.alpha": np.float32(1)}, unseen, False
    yield "weights", "int32 weights", {**tensors, keys[0]: tensors[keys[0]].astype(np.int32)}, unseen, False
    yield "weights", "a NaN weight", {**tensors, keys[1]: np.full_like(tensors[keys[1]], np.nan)}, unseen, False
    # Overrides: what the tensors cannot show, partly given, wrong, or contradicting the file.
    flat = [(arg, k) for arg, d in unseen.items() for k in d]
    for n in range(len(flat)):   # every proper subset of a given size, one each
        kept = set(map(tuple, rng.permutation(flat)[:n].tolist()))
        partial = {arg: {k: v for k, v in d.items() if (arg, k) in kept} for arg, d in unseen.items()}
        yield "overrides incomplete", f"{n} of {len(flat)} given", tensors, partial, False
    for arg, key in flat:
        for bad in (0, -1, 3, "8", 2.5, None, float("nan")):
            yield "an override's value", f"{arg}[{key!r}]={bad!r}", tensors, \
                {**unseen, arg: {**unseen[arg], key: bad}}, False
    yield "an override contradicting the file", "block_out_channels", tensors, \
        {**unseen, "unet_config": {**unseen["unet_config"], "block_out_channels": [8, 8, 8]}}, False
    yield "an override unknown", "attention_heads", tensors, \
        {**unseen, "unet_config": {**unseen["unet_config"], "attention_heads": 4}}, False
    yield "an override unknown", "a misspelt argument", tensors, {**unseen, "vae_confg": {}}, False
    yield "the file itself", "loads", tensors, unseen, True


def test_fuzzed_single_files_load_what_they_say_or_are_refused(tmp_path):
    from jaxsd.checkpoints.convert import ConversionError
    from jaxsd.checkpoints.single_file import save_safetensors, to_single_file_state_dict
    from jaxsd.checkpoints.sources import load_single_file

    configs, state_dicts = _single_file_parts()
    tensors = to_single_file_state_dict(state_dicts, configs, "sd1")
    unseen = _unseen(configs)
    counts = collections.Counter()
    for i, (kind, description, variant, overrides, must_load) in enumerate(single_file_variants(tensors, unseen)):
        path = tmp_path / f"v{i}.safetensors"
        save_safetensors(path, variant)
        label = f"{kind}: {description}"
        try:
            loaded = load_single_file(path, overrides=overrides)
        except (CheckpointError, ConversionError) as error:
            assert str(path) in str(error), f"{label}: the error does not name the file: {error}"
            if kind.startswith(("an override", "overrides")):   # ... and the override at fault
                assert "_config" in str(error), f"{label}: the error names no override: {error}"
            counts[kind, "refused naming the file"] += 1
        except (ValueError, TypeError) as error:
            assert "_config" in str(error) or "overrides" in str(error), \
                f"{label}: the error names no argument: {error}"
            counts[kind, "refused naming the argument"] += 1
        else:
            assert must_load, f"{label}: loaded silently"
            for params in (loaded.unet_params, loaded.vae_params, loaded.text_params):
                assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(params))
            counts[kind, "loaded (a valid file)"] += 1
        finally:
            path.unlink()
    print()
    for (kind, outcome), n in sorted(counts.items()):
        print(f"  {kind:36s} {outcome:28s} {n}")
    assert sum(counts.values()) >= 80
