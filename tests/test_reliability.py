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
