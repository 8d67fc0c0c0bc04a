"""Where a Stable Diffusion checkpoint comes from: a local folder, a Hugging Face Hub id, or one file.

    built-in name "tiny-shapes": the tiny model trained with jaxsd, shipped inside the package
                  (``BUILTIN_MODELS``; see docs/tiny_model.md)
    folder        diffusers' layout: model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/
    Hub id        "stable-diffusion-v1-5/stable-diffusion-v1-5": downloaded by huggingface_hub into its
                  usual cache (only the files jaxsd reads), then read as a folder
    single file   an original CompVis/LDM checkpoint (.safetensors; .ckpt only with allow_pickle):
                  split into components and converted by ``jaxsd.checkpoints.single_file``

Every source ends as :class:`Components`: the three models with their parameters, the tokenizer,
and the scheduler config whose ``_class_name`` picks the default sampler.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxsd.checkpoints.components import (build_clip_text, build_unet, build_vae, load_clip_text, load_unet,
                                          load_vae)
from jaxsd.checkpoints.files import CheckpointError, read_json
from jaxsd.checkpoints.single_file import read_single_file
from jaxsd.checkpoints.tokenizer import BUILTIN_VOCABULARY, load_tokenizer

COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Models that ship inside the package: name -> folder in diffusers' layout.
BUILTIN_MODELS = {"tiny-shapes": Path(__file__).parents[1] / "assets" / "tiny-shapes"}


class Components(NamedTuple):
    tokenizer: Any          # transformers CLIPTokenizer
    text_encoder: Any       # jaxsd.models.clip.CLIPTextModel
    text_params: dict
    unet: Any               # jaxsd.models.unet.UNet
    unet_params: dict
    vae: Any                # jaxsd.models.vae.AutoencoderKL
    vae_params: dict
    scheduler_config: dict  # diffusers' scheduler_config.json, _class_name included
    source: str             # what was loaded, for messages and PNG metadata
    sample_size: int | None = None  # the UNet's native latent side (unet/config.json), if known


def classify_source(source: str | os.PathLike) -> str:
    """'builtin', 'folder', 'file' or 'hub' (an ``owner/name`` id that is not a local path)."""
    if isinstance(source, str) and source in BUILTIN_MODELS:
        return "builtin"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) \
        or text.endswith(SINGLE_FILE_SUFFIXES)
    if not looks_local and text.count("/") == 1:
        return "hub"
    raise CheckpointError(f"model {text!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
                          f"an existing folder or file, nor a Hugging Face Hub id of the form 'owner/name'")


# ---------------------------------------------------------------------------------------------
# A folder in diffusers' layout

def check_folder(folder: str | os.PathLike) -> dict:
    """The folder's model_index.json, after checking it is a Stable Diffusion 1.x/2.x checkpoint."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        found = sorted(p.name for p in folder.iterdir())[:20]
        raise CheckpointError(
            f"{str(folder)!r} is not a Stable Diffusion checkpoint in diffusers' layout: it has no "
            f"model_index.json (it holds {found}). Expected model_index.json and the folders "
            f"{', '.join(c + '/' for c in COMPONENTS)}; for an original single-file checkpoint "
            f"pass the .safetensors file itself")
    model_index = read_json(index)
    if "text_encoder_2" in model_index or "transformer" in model_index:
        raise CheckpointError(f"{str(folder)!r} is a {model_index.get('_class_name')} checkpoint "
                              f"(SDXL, SD3 or later); jaxsd implements Stable Diffusion 1.x and 2.x")
    name = model_index.get("_class_name")
    if name is not None and name not in PIPELINE_CLASSES:
        raise CheckpointError(f"{index}: _class_name={name!r} is not a Stable Diffusion 1.x/2.x pipeline; "
                              f"jaxsd reads {sorted(PIPELINE_CLASSES)}")
    for part, expected in COMPONENT_CLASSES.items():
        entry = model_index.get(part)
        if entry is not None and (not isinstance(entry, list) or len(entry) != 2 or entry[1] not in expected):
            raise CheckpointError(f"{index}: {part}={entry!r}; expected [library, class] with class one "
                                  f"of {sorted(expected)}")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} is not a complete Stable Diffusion checkpoint: "
                              f"missing the folders {missing} (needs {list(COMPONENTS)})")
    return model_index


# What model_index.json may name (diffusers' SD 1.x/2.x pipelines and their components).
PIPELINE_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                    "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipelineLegacy"}
COMPONENT_CLASSES = {"text_encoder": {"CLIPTextModel"}, "unet": {"UNet2DConditionModel"},
                     "vae": {"AutoencoderKL"}, "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"}}


def load_folder(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None,
                allow_pickle: bool = False, source: str | None = None) -> Components:
    """Every component of a diffusers-layout folder, converted to jaxsd modules and parameters."""
    folder = Path(folder)
    check_folder(folder)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    kw = dict(variant=variant, allow_pickle=allow_pickle)
    text_encoder, text_params = load_clip_text(folder / "text_encoder", dtype, **kw)
    unet, unet_params = load_unet(folder / "unet", dtype, **kw)
    vae, vae_params = load_vae(folder / "vae", dtype, **kw)
    sample_size = read_json(folder / "unet" / "config.json").get("sample_size")
    if isinstance(sample_size, list) and len(sample_size) == 2 and sample_size[0] == sample_size[1]:
        sample_size = sample_size[0]  # [64, 64]: square, as jaxsd's default size is
    if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, int)
                                    or sample_size < 1):
        raise CheckpointError(f"{folder / 'unet' / 'config.json'}: sample_size={sample_size!r} must be "
                              f"a positive integer (latent pixels: 64 for SD 1.x)")
    return Components(load_tokenizer(folder / "tokenizer"), text_encoder, text_params, unet,
                      unet_params, vae, vae_params, scheduler_config, source or str(folder), sample_size)


# ---------------------------------------------------------------------------------------------
# A Hugging Face Hub id

def hub_patterns(variant: str | None) -> list[str]:
    """The files jaxsd reads (huggingface_hub allow_patterns): no pickles, no other variants."""
    v = f".{variant}" if variant else ""
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*"]
    for part, stem in (("text_encoder", "model"), ("unet", "diffusion_pytorch_model"),
                       ("vae", "diffusion_pytorch_model")):
        patterns += [f"{part}/config.json", f"{part}/{stem}{v}.safetensors",
                     f"{part}/{stem}.safetensors.index{v}.json",
                     f"{part}/{stem}{v}-*-of-*.safetensors", f"{part}/{stem}-*-of-*{v}.safetensors"]
    return patterns


def download(repo_id: str, *, revision: str | None = None, variant: str | None = None) -> Path:
    """A local snapshot of a Hub checkpoint (from the cache when it is there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=hub_patterns(variant)))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"Hugging Face Hub id {repo_id!r} (revision {revision or 'main'!r}) was "
                              f"not found, or it is gated/private (log in with `hf auth login`): {e}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline else
               "the Hub could not be reached (no network?) and it is not in the local cache")
        raise CheckpointError(
            f"cannot load {repo_id!r} from the Hugging Face Hub: {why}. Either connect to the network "
            f"(and unset HF_HUB_OFFLINE), download it once with `hf download {repo_id}` on a machine "
            f"with network access, or pass a local path: a diffusers folder (with model_index.json) "
            f"or a single .safetensors checkpoint file. ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------
# One original (CompVis/LDM) checkpoint file

def load_single_file(path: str | os.PathLike, dtype=jnp.float32, *, allow_pickle: bool = False,
                     overrides: dict | None = None) -> Components:
    """An original single-file checkpoint, split into diffusers-keyed components (``single_file.py``)
    and converted by the same ``build_*`` functions as a folder's components.

    :param overrides: ``prediction_type``, ``upcast_attention``, ``image_size`` (see
        :func:`jaxsd.checkpoints.single_file.read_single_file`), and ``unet_config``, ``vae_config``,
        ``text_encoder_config``: what the tensors do not show (head counts, GroupNorm groups),
        required for architectures other than the released SD 1.x/2.x ones.
    """
    from jaxsd.checkpoints.tokenizer import import_clip_tokenizer

    CLIPTokenizer = import_clip_tokenizer()
    overrides = dict(overrides or {})
    known = ("prediction_type", "upcast_attention", "image_size", "unet_config", "vae_config",
             "text_encoder_config")
    if set(overrides) - set(known):
        raise ValueError(f"unknown single-file overrides {sorted(set(overrides) - set(known))}; "
                         f"choose from {list(known)}")
    ckpt = read_single_file(path, allow_pickle=allow_pickle, **overrides)
    configs = ckpt.configs
    what = lambda part, arg: (f"{part} of {str(path)!r} (its config inferred from the tensors, "
                              f"with {arg}={overrides.get(arg, {})!r})")
    text_encoder, text_params = build_clip_text(configs["text_encoder"], ckpt.state_dicts["text_encoder"],
                                                dtype, what=what("the text encoder", "text_encoder_config"))
    unet, unet_params = build_unet(configs["unet"], ckpt.state_dicts["unet"], dtype,
                                   what=what("the UNet", "unet_config"))
    vae, vae_params = build_vae(configs["vae"], ckpt.state_dicts["vae"], dtype, what=what("the VAE", "vae_config"))
    # No tokenizer in the file: CLIP's vocabulary ships with jaxsd. SD 2's OpenCLIP pads with "!".
    tokenizer = CLIPTokenizer.from_pretrained(
        BUILTIN_VOCABULARY, **({"pad_token": "!"} if ckpt.arch.family == "sd2" else {}))
    return Components(tokenizer, text_encoder, text_params, unet, unet_params, vae, vae_params,
                      configs["scheduler"], str(path), configs["unet"].get("sample_size"))


def load(source: str | os.PathLike, dtype=jnp.float32, *, revision: str | None = None,
         variant: str | None = None, allow_pickle: bool = False,
         overrides: dict | None = None) -> Components:
    """Load every component from a folder, a Hub id or a single checkpoint file."""
    kind = classify_source(source)
    if overrides and kind != "file":
        raise ValueError(f"architecture overrides {sorted(overrides)} apply to single-file checkpoints "
                         f"only; {str(source)!r} is a {kind} whose configs say what it is")
    if kind == "builtin":
        folder = BUILTIN_MODELS[source]
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(f"the built-in model {source!r} is missing from this installation "
                                  f"(expected {str(folder)!r}); reinstall jaxsd")
        return load_folder(folder, dtype, variant=variant, allow_pickle=allow_pickle, source=source)
    if kind == "hub":
        folder = download(str(source), revision=revision, variant=variant)
        return load_folder(folder, dtype, variant=variant, allow_pickle=allow_pickle, source=str(source))
    if kind == "file":
        path = Path(source).expanduser()
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"{str(path)!r} is a file but not a checkpoint: expected one of "
                                  f"{SINGLE_FILE_SUFFIXES} or a diffusers folder")
        return load_single_file(path, dtype, allow_pickle=allow_pickle, overrides=overrides)
    return load_folder(Path(source).expanduser(), dtype, variant=variant, allow_pickle=allow_pickle)
