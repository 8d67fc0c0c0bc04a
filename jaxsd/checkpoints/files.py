"""Reading diffusers/transformers component folders without torch.

A component folder (``text_encoder/``, ``unet/``, ``vae/``) holds a ``config.json`` and its
weights in one of these layouts (diffusers' and transformers' own names):

    model.safetensors                                  one file
    model.fp16.safetensors                             the ``fp16`` variant
    model.safetensors.index.json + model-0000k-of-0000n.safetensors     sharded
    model.safetensors.index.fp16.json + ...            sharded ``fp16`` variant
    pytorch_model.bin / diffusion_pytorch_model.bin    pickle: refused unless allowed

(``model`` is ``diffusion_pytorch_model`` in diffusers folders.)

The safetensors format is an 8-byte little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets}}``, then the raw bytes. Before reading a byte of data we
have the ``safetensors`` library's own parser check the file (header size within the file, valid
JSON of the right types, every dtype x shape equal to its byte range, the ranges contiguous,
non-overlapping and covering the data exactly), and we refuse duplicate names in the header, which
it lets through. When the parser refuses a file, its first bytes say what it really is, for the
usual broken downloads (a Git LFS pointer, an HTML page, a zip or pickle under a
``.safetensors`` name), and the error names it. Then
we memory-map the file and hand out one tensor at a time (the library's NumPy reader cannot
return bfloat16 or float8), so converting a model never holds more than the converted parameters
plus one tensor in memory.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype tags -> NumPy dtypes (bfloat16 and float8 come from ml_dtypes, as in JAX).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def is_floating(dtype) -> bool:
    """True for NumPy floats and ml_dtypes' bfloat16/float8 (which NumPy sees as kind 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype in {np.dtype(d) for d in _DTYPES.values() if d.__module__ == "ml_dtypes"}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as asked."""


class SingleFileError(CheckpointError):
    """A single file that is not an SD 1.x/2.x checkpoint, or whose keys do not fit one."""


def read_config(folder: str | os.PathLike) -> dict:
    """The component's ``config.json`` as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} has no config.json: expected a diffusers/transformers component folder "
            f"(config.json plus *.safetensors), found {sorted(p.name for p in folder.iterdir())}")
    return read_json(path)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; a syntax error or another type names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of settings")
    return config


# The first bytes of the files most often found where a .safetensors file should be.
_NOT_SAFETENSORS = (
    (b"version https://git-lfs", "a Git LFS pointer (a small text file standing in for the weights), "
     "not the weights: run `git lfs pull` in the repository it came from, or download the file "
     "with huggingface_hub"),
    (b"<", "an HTML or XML page, not weights: the download saved an error or login page; "
     "download the file again (a gated Hub model needs `huggingface-cli login`)"),
    (b"PK\x03\x04", "a zip archive (PyTorch's torch.save format), not safetensors: if it is a "
     "PyTorch checkpoint, give it its real suffix (.ckpt, .pt or .bin) and pass allow_pickle=True "
     "if you trust it"),
    (b"\x80", "a Python pickle (an old PyTorch checkpoint), not safetensors: give it its real suffix "
     "(.ckpt, .pt or .bin) and pass allow_pickle=True if you trust it"),
)


def _reject_duplicates(pairs):
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CheckpointError(f"the header names {repeated} more than once")
    return dict(pairs)


class SafetensorsFile(Mapping):
    """One ``.safetensors`` file as a read-only mapping ``name -> np.ndarray`` (memory-mapped).

    Opening it validates the whole header (module docstring); a file that fails raises
    :class:`CheckpointError` naming the file and the reason.
    """

    def __init__(self, path: str | os.PathLike):
        import safetensors

        self.path = Path(path)
        try:
            with safetensors.safe_open(self.path, framework="numpy"):
                pass
        except Exception as error:  # the library raises SafetensorError, or OSError
            # Only now look at the first bytes: a valid file starts with its header size, whose
            # low byte can be anything ("<" is a header of 60 + 256 k bytes).
            with open(self.path, "rb") as f:
                start = f.read(64).lstrip()
            for magic, what in _NOT_SAFETENSORS:
                if start.startswith(magic):
                    raise CheckpointError(f"{self.path} is {what}") from None
            raise CheckpointError(f"{self.path} is not a valid .safetensors file ({error}); "
                                  f"it is damaged or incomplete: download it again") from None
        with open(self.path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_size), object_pairs_hook=_reject_duplicates)
            except CheckpointError as error:
                raise CheckpointError(f"{self.path}: {error}; which one to use is ambiguous: "
                                      f"the file is damaged") from None
        self.metadata = header.pop("__metadata__", None) or {}
        unknown = sorted({info["dtype"] for info in header.values()} - set(_DTYPES))
        if unknown:
            raise CheckpointError(f"{self.path} stores tensors as {unknown}, which jaxsd cannot read; "
                                  f"known: {sorted(_DTYPES)}")
        self._header = header
        self._data_start = 8 + header_size
        self._mmap = None

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._header[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


class StateDict(Mapping):
    """A lazy ``reference key -> np.ndarray`` mapping over one or several weight files.

    Tensors are read when indexed and cast to ``dtype`` (floating tensors only; integer
    buffers keep their type), so iterating over it never loads the whole model at once.
    """

    def __init__(self, sources: Mapping[str, Mapping], dtype=None):
        self._sources = sources   # key -> the file-like mapping that holds it
        self.dtype = None if dtype is None else np.dtype(dtype)

    def __getitem__(self, key: str) -> np.ndarray:
        array = self._sources[key][key]
        if self.dtype is not None and is_floating(array.dtype):
            array = array.astype(self.dtype)
        return np.asarray(array)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _variant_name(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (diffusers' ``_add_variant``)."""
    if variant is None:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def find_weight_files(folder: str | os.PathLike, variant: str | None = None,
                      allow_pickle: bool = False) -> list[Path]:
    """The weight files of a component folder, in the order diffusers would look for them."""
    folder = Path(folder)
    read_config(folder)  # a clear error for a missing folder or config.json
    for stem in _WEIGHT_STEMS:
        single = folder / _variant_name(f"{stem}.safetensors", variant)
        if single.is_file():
            return [single]
        index = folder / _variant_name(f"{stem}.safetensors.index.json", variant)
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are not there: {missing}")
            return shards
    for name in _PICKLE_NAMES:
        pickle_file = folder / _variant_name(name, variant)
        if pickle_file.is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{pickle_file} is a pickle file. Unpickling can run arbitrary code, so jaxsd "
                    f"refuses it by default. Prefer a .safetensors checkpoint; if you trust this "
                    f"file, pass allow_pickle=True (it is then read with "
                    f"torch.load(weights_only=True), which needs torch installed).")
            return [pickle_file]
    found = sorted(p.name for p in folder.iterdir())
    want = f"variant {variant!r} of " if variant else ""
    raise CheckpointError(
        f"no weights file for {want}{str(folder)!r}: looked for "
        f"{_variant_name('diffusion_pytorch_model.safetensors', variant)}, "
        f"{_variant_name('model.safetensors', variant)}, their sharded *.index.json forms and "
        f"pickle .bin files; the folder holds {found}")


class _PickleFile(Mapping):
    """A PyTorch pickle state dict, read with ``torch.load(weights_only=True)`` (opt-in only)."""

    def __init__(self, path: Path):
        import torch  # only on this explicitly requested path

        self.path = path
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._arrays = {}
        for key, tensor in state.items():
            if tensor.dtype == torch.bfloat16:
                self._arrays[key] = tensor.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                self._arrays[key] = tensor.numpy()

    def __getitem__(self, key):
        return self._arrays[key]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)


def read_state_dict(folder: str | os.PathLike, *, dtype=None, variant: str | None = None,
                    allow_pickle: bool = False) -> StateDict:
    """All tensors of a component folder as a lazy mapping ``reference key -> np.ndarray``.

    :param folder: a component folder (``config.json`` + weights).
    :param dtype: cast floating tensors to this dtype when read (None keeps the stored dtype).
    :param variant: a weights variant such as ``"fp16"`` (``model.fp16.safetensors``).
    :param allow_pickle: read ``.bin`` pickle files through ``torch.load(weights_only=True)``.
    """
    files = find_weight_files(folder, variant, allow_pickle)
    return state_dict_from_files(files, dtype=dtype)


def state_dict_from_files(files, *, dtype=None) -> StateDict:
    """A lazy state dict over the given ``.safetensors`` (or opted-in pickle) files."""
    sources = {}
    for path in map(Path, files):
        mapping = _PickleFile(path) if path.suffix in (".bin", ".ckpt", ".pt") else SafetensorsFile(path)
        for key in mapping:
            if key in sources:
                raise CheckpointError(f"tensor {key!r} appears in both {sources[key].path} and {path}")
            sources[key] = mapping
    return StateDict(sources, dtype)
