"""Where a Stable Diffusion checkpoint comes from: a local folder, a Hugging Face Hub id, or one file.

    built-in name "tiny-shapes": the tiny model trained with jaxsd, shipped inside the package
                  (``BUILTIN_MODELS``; see docs/tiny_model.md)
    folder        diffusers' layout: model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/
                  (SDXL: also text_encoder_2/, tokenizer_2/; the refiner has only those two encoders)
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
from jaxsd.checkpoints.ldm_keys import TEXT_TOWERS
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
    # SDXL's second tokenizer and text encoder (OpenCLIP bigG with its projection), and the
    # pipeline flags of model_index.json (force_zeros_for_empty_prompt, requires_aesthetics_score).
    # For the refiner, which has only the second encoder, the first three fields are None.
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    text_params_2: dict | None = None
    pipeline_config: dict | None = None

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None


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
    if not isinstance(model_index, dict):
        raise CheckpointError(f"{index}: expected a JSON object, found {type(model_index).__name__}")
    if "transformer" in model_index:
        raise CheckpointError(f"{str(folder)!r} is a {model_index.get('_class_name')} checkpoint "
                              f"(SD3 or later, a diffusion transformer); jaxsd implements Stable "
                              f"Diffusion 1.x, 2.x and XL")
    name = model_index.get("_class_name")
    if name is not None and name not in PIPELINE_CLASSES:
        raise CheckpointError(f"{index}: _class_name={name!r} is not a Stable Diffusion 1.x/2.x/XL pipeline; "
                              f"jaxsd reads {sorted(PIPELINE_CLASSES)}")
    for part, expected in COMPONENT_CLASSES.items():
        entry = model_index.get(part)
        if entry == [None, None] and part in ("text_encoder", "tokenizer") and "text_encoder_2" in model_index:
            continue  # the SDXL refiner: only the second encoder
        if entry is not None and (not isinstance(entry, list) or len(entry) != 2 or entry[1] not in expected):
            raise CheckpointError(f"{index}: {part}={entry!r}; expected [library, class] with class one "
                                  f"of {sorted(expected)}")
    needed = [c for c in COMPONENTS + XL_COMPONENTS if c in COMPONENTS or c in model_index
              or (name or "").startswith("StableDiffusionXL")]
    needed = [c for c in needed if model_index.get(c, ()) != [None, None]]
    missing = [c for c in needed if not (folder / c).is_dir()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} is not a complete Stable Diffusion checkpoint: "
                              f"missing the folders {missing} (its model_index.json, "
                              f"_class_name={name!r}, needs {needed})")
    return model_index


# What model_index.json may name (diffusers' SD 1.x/2.x pipelines and their components).
PIPELINE_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                    "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipelineLegacy",
                    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                    "StableDiffusionXLInpaintPipeline"}
COMPONENT_CLASSES = {"text_encoder": {"CLIPTextModel"}, "unet": {"UNet2DConditionModel"},
                     "vae": {"AutoencoderKL"}, "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
                     "text_encoder_2": {"CLIPTextModelWithProjection"},
                     "tokenizer_2": {"CLIPTokenizer", "CLIPTokenizerFast"}}
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
# model_index.json's pipeline flags (SDXL), with diffusers' defaults.
PIPELINE_FLAGS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}


def load_folder(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None,
                allow_pickle: bool = False, source: str | None = None) -> Components:
    """Every component of a diffusers-layout folder, converted to jaxsd modules and parameters."""
    folder = Path(folder)
    model_index = check_folder(folder)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    kw = dict(variant=variant, allow_pickle=allow_pickle)
    tokenizer = text_encoder = text_params = None
    if (folder / "text_encoder").is_dir() and model_index.get("text_encoder") != [None, None]:
        text_encoder, text_params = load_clip_text(folder / "text_encoder", dtype, **kw)
        tokenizer = load_tokenizer(folder / "tokenizer")
    xl = {}
    if (folder / "text_encoder_2").is_dir():
        text_encoder_2, text_params_2 = load_clip_text(folder / "text_encoder_2", dtype, **kw)
        if not text_encoder_2.config.with_projection:
            raise CheckpointError(f"{folder / 'text_encoder_2' / 'config.json'}: SDXL's second text encoder "
                                  f"must be a CLIPTextModelWithProjection (its 'architectures' says "
                                  f"{read_json(folder / 'text_encoder_2' / 'config.json').get('architectures')!r})")
        flags = {}
        for flag, default in PIPELINE_FLAGS.items():
            flags[flag] = model_index.get(flag, default)
            if not isinstance(flags[flag], bool):
                raise CheckpointError(f"{folder / 'model_index.json'}: {flag}={flags[flag]!r} must be true or false")
        xl = dict(tokenizer_2=load_tokenizer(folder / "tokenizer_2"), text_encoder_2=text_encoder_2,
                  text_params_2=text_params_2, pipeline_config=flags)
    elif text_encoder is None:
        raise CheckpointError(f"{str(folder)!r} has no text encoder (model_index.json: text_encoder="
                              f"{model_index.get('text_encoder')!r}, and no text_encoder_2/)")
    unet, unet_params = load_unet(folder / "unet", dtype, **kw)
    vae, vae_params = load_vae(folder / "vae", dtype, **kw)
    sample_size = read_json(folder / "unet" / "config.json").get("sample_size")
    if isinstance(sample_size, list) and len(sample_size) == 2 and sample_size[0] == sample_size[1]:
        sample_size = sample_size[0]  # [64, 64]: square, as jaxsd's default size is
    if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, int)
                                    or sample_size < 1):
        raise CheckpointError(f"{folder / 'unet' / 'config.json'}: sample_size={sample_size!r} must be "
                              f"a positive integer (latent pixels: 64 for SD 1.x)")
    return Components(tokenizer, text_encoder, text_params, unet, unet_params, vae, vae_params,
                      scheduler_config, source or str(folder), sample_size, **xl)


# ---------------------------------------------------------------------------------------------
# A Hugging Face Hub id

def hub_patterns(variant: str | None) -> list[str]:
    """The files jaxsd reads (huggingface_hub allow_patterns): no pickles, no other variants."""
    v = f".{variant}" if variant else ""
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*"]
    for part, stem in (("text_encoder", "model"), ("text_encoder_2", "model"), ("unet", "diffusion_pytorch_model"),
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
        ``text_encoder_config``, ``text_encoder_2_config`` (SDXL): what the tensors do not show
        (head counts, GroupNorm groups), required for architectures other than the released ones.
    """
    from jaxsd.checkpoints.tokenizer import import_clip_tokenizer

    CLIPTokenizer = import_clip_tokenizer()
    overrides = dict(overrides or {})
    known = ("prediction_type", "upcast_attention", "image_size", "unet_config", "vae_config",
             "text_encoder_config", "text_encoder_2_config")
    if set(overrides) - set(known):
        raise ValueError(f"unknown single-file overrides {sorted(set(overrides) - set(known))}; "
                         f"choose from {list(known)}")
    ckpt = read_single_file(path, allow_pickle=allow_pickle, **overrides)
    configs, family = ckpt.configs, ckpt.arch.family
    what = lambda part, arg: (f"{part} of {str(path)!r} (its config inferred from the tensors, "
                              f"with {arg}={overrides.get(arg, {})!r})")
    # No tokenizer in the file: CLIP's vocabulary ships with jaxsd. OpenCLIP (SD 2's encoder,
    # SDXL's second) pads with "!", as SD 2's and SDXL's tokenizer(_2)/ folders say.
    texts = {}   # component -> (tokenizer, model, params)
    for name, tower in TEXT_TOWERS[family].items():
        pad = {"pad_token": "!"} if tower.open_clip else {}
        texts[name] = (CLIPTokenizer.from_pretrained(BUILTIN_VOCABULARY, **pad),
                       *build_clip_text(configs[name], ckpt.state_dicts[name], dtype,
                                        what=what(f"the {name.replace('_', ' ')}", f"{name}_config")))
    unet, unet_params = build_unet(configs["unet"], ckpt.state_dicts["unet"], dtype,
                                   what=what("the UNet", "unet_config"))
    vae, vae_params = build_vae(configs["vae"], ckpt.state_dicts["vae"], dtype, what=what("the VAE", "vae_config"))
    xl = {}
    if "text_encoder_2" in texts:   # SDXL, with model_index.json's flags as the published repos set them
        refiner = family == "sdxl_refiner"
        xl = dict(zip(("tokenizer_2", "text_encoder_2", "text_params_2"), texts["text_encoder_2"]),
                  pipeline_config={"force_zeros_for_empty_prompt": not refiner,
                                   "requires_aesthetics_score": refiner})
    tokenizer, text_encoder, text_params = texts.get("text_encoder", (None, None, None))
    return Components(tokenizer, text_encoder, text_params, unet, unet_params, vae, vae_params,
                      configs["scheduler"], str(path), configs["unet"].get("sample_size"), **xl)


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
