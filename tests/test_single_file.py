"""Original single-file SD checkpoints (CompVis layout) against diffusers' own single-file loader.

Small random diffusers/transformers components (SD 1-style, SD 2-style, SD 1 inpainting, SDXL
base-style and refiner-style) are written to one CompVis-layout file by
``jaxsd.checkpoints.single_file.write_single_file``. Then

1. diffusers' converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
   ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) and
   ``StableDiffusionPipeline.from_single_file`` read that file back to exactly the original
   tensors, so jaxsd's key tables are checked against the reference, not against themselves;
2. ``read_single_file`` recovers every tensor exactly and infers the configs that diffusers'
   ``create_*_diffusers_config_from_ldm`` derive from the matching LDM yaml;
3. the inference is checked at the real SD 1.5, SD 2.1 and SDXL base/refiner sizes on shapes
   alone (models built on torch's meta device, tensors as zero-byte broadcast views), against
   the published configs and against diffusers' converters and model-type inference;
4. an SDXL file loads end to end into jaxsd (``sources.load_single_file``), whose bigG text
   encoder gives transformers' projected text embeddings.
"""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as ref
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from jaxsd.checkpoints.files import SafetensorsFile
from jaxsd.checkpoints.ldm_arch import UNSEEN
from jaxsd.checkpoints.single_file import (SingleFileError, infer_arch, key_maps, read_single_file,
                                           save_safetensors, to_single_file_state_dict, write_single_file)

SD1_UNET = dict(  # SD 1-style: 1x1-conv proj_in, attention_head_dim = 8 heads, 3 levels
    block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=64, attention_head_dim=[1, 1, 1],
                use_linear_projection=True, upcast_attention=True)
VAE = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD1_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
                hidden_act="quick_gelu", vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# SD 2: OpenCLIP's 24 resblocks of which diffusers keeps 23 (its ignore list names resblocks.23).
SD2_TEXT = dict(SD1_TEXT, hidden_size=64, intermediate_size=96, num_hidden_layers=23, hidden_act="gelu")
# SDXL's bigG as a CLIPTextModelWithProjection; a non-square projection (48 -> 24), so a missing
# transpose of OpenCLIP's (width, embed_dim) text_projection cannot go unnoticed.
XL_TEXT_2 = dict(SD1_TEXT, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 hidden_act="gelu", projection_dim=24)
# SDXL-style: no attention at level 0, a transformer depth per level (the mid block takes the
# last), text_time micro-conditioning on 24 pooled + 6 (base) or 5 (refiner) x 256 sinusoids.
XL_UNET = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=[1, 2, 2],
    transformer_layers_per_block=[1, 2, 3], cross_attention_dim=32 + 48, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=24 + 6 * 256,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8)
XL_REFINER_UNET = dict(  # the refiner's shape: 4 levels, attention in the middle two, one depth
    XL_UNET, block_out_channels=(32, 64, 64, 64), layers_per_block=1, attention_head_dim=[1, 2, 2, 2],
    transformer_layers_per_block=2, cross_attention_dim=48, projection_class_embeddings_input_dim=24 + 5 * 256,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SD1_TEXTS = {"text_encoder": (CLIPTextModel, SD1_TEXT)}

CASES = {  # name -> (family, unet kwargs, {text component: (transformers class, config kwargs)})
    "sd1": ("sd1", SD1_UNET, SD1_TEXTS),
    "sd2": ("sd2", SD2_UNET, {"text_encoder": (CLIPTextModel, SD2_TEXT)}),
    "sd1_inpaint": ("sd1", dict(SD1_UNET, in_channels=9), SD1_TEXTS),
    "sdxl": ("sdxl", XL_UNET, {**SD1_TEXTS, "text_encoder_2": (CLIPTextModelWithProjection, XL_TEXT_2)}),
    "sdxl_refiner": ("sdxl_refiner", XL_REFINER_UNET, {"text_encoder_2": (CLIPTextModelWithProjection, XL_TEXT_2)}),
}
MODEL_TYPE = {"sd1": "v1", "sd2": "v2", "sd1_inpaint": "inpainting", "sdxl": "xl_base", "sdxl_refiner": "xl_refiner"}
# Where diffusers' create_diffusers_clip_model_from_ldm reads each OpenCLIP text encoder.
DIFFUSERS_OPEN_CLIP_PREFIX = {("sd2", "text_encoder"): "cond_stage_model.model.",
                              ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
                              ("sdxl_refiner", "text_encoder_2"): "conditioner.embedders.0.model."}


def unseen(configs):
    """What these small models' tensors cannot show (``ldm_arch.UNSEEN``: head counts, GroupNorm
    groups), from their own configs, as ``read_single_file``'s overrides."""
    return {f"{c}_config": {k: configs[c][k] for k in keys} for c, keys in UNSEEN.items() if c in configs}


def randomize_(module, seed):
    """Give every tensor distinct random values, so a swapped pair of keys cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module.eval()


def build(name):
    family, unet_kwargs, texts = CASES[name]
    xl = family.startswith("sdxl")   # SDXL's VAE scales latents by 0.13025
    models = {"unet": randomize_(UNet2DConditionModel(**unet_kwargs), 0),
              "vae": randomize_(AutoencoderKL(**VAE, **({"scaling_factor": 0.13025} if xl else {})), 1),
              **{n: randomize_(cls(CLIPTextConfig(**kw)), seed) for seed, (n, (cls, kw)) in enumerate(texts.items(), 2)}}
    configs = {n: m.config.to_dict() if n.startswith("text") else dict(m.config) for n, m in models.items()}
    state_dicts = {n: {k: v.numpy() for k, v in m.state_dict().items()} for n, m in models.items()}
    return family, models, configs, state_dicts


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, models, configs, state_dicts = build(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
    write_single_file(path, state_dicts, configs, family)
    return dict(name=request.param, family=family, models=models, configs=configs,
                state_dicts=state_dicts, path=path)


def assert_same_state_dict(ours, theirs, what):
    ours = {k: np.asarray(v) for k, v in ours.items()}
    theirs = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in theirs.items()}
    assert set(ours) == set(theirs), (what, sorted(set(ours) ^ set(theirs)))
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, (what, k, ours[k].shape, theirs[k].shape)
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=f"{what}: {k}")


def ldm_yaml(unet_config, vae_config, family):
    """The LDM ``v1-inference.yaml`` / ``v2-inference(-v).yaml`` fields for these configs."""
    c = list(unet_config["block_out_channels"])
    attention_resolutions = [2 ** i for i, t in enumerate(unet_config["down_block_types"])
                             if t.startswith("CrossAttn")]
    unet = dict(in_channels=unet_config["in_channels"], out_channels=unet_config["out_channels"],
                model_channels=c[0], channel_mult=[x // c[0] for x in c],
                attention_resolutions=attention_resolutions, num_res_blocks=unet_config["layers_per_block"],
                transformer_depth=1, context_dim=unet_config["cross_attention_dim"])
    unet.update(num_heads=8) if family == "sd1" else unet.update(num_head_channels=64,
                                                                 use_linear_in_transformer=True)
    v = list(vae_config["block_out_channels"])
    ddconfig = dict(ch=v[0], ch_mult=[x // v[0] for x in v], num_res_blocks=vae_config["layers_per_block"],
                    in_channels=3, out_ch=3, z_channels=vae_config["latent_channels"])
    return {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


# ---------------------------------------------------------------------------------------------
# 1. diffusers reads our file back to the original tensors.

def test_diffusers_converters_read_our_file(case):
    checkpoint = load_file(case["path"])
    sd = case["state_dicts"]
    unet = ref.convert_ldm_unet_checkpoint(checkpoint, case["configs"]["unet"])
    assert_same_state_dict(unet, sd["unet"], "unet")
    vae = ref.convert_ldm_vae_checkpoint(checkpoint, case["configs"]["vae"])
    assert_same_state_dict(vae, sd["vae"], "vae")
    for name in CASES[case["name"]][2]:
        prefix = DIFFUSERS_OPEN_CLIP_PREFIX.get((case["family"], name))
        if prefix is None:   # OpenAI CLIP, under cond_stage_model. or conditioner.embedders.0.
            text = ref.convert_ldm_clip_checkpoint(checkpoint)
        else:                # OpenCLIP: q/k/v split, SDXL's text_projection transposed
            text = ref.convert_open_clip_checkpoint(case["models"][name], checkpoint, prefix=prefix)
        if name == "text_encoder":   # transformers 5 flattened CLIPTextModel; diffusers strips the prefix too
            text = {k.removeprefix("text_model."): v for k, v in text.items()}
        assert_same_state_dict(text, sd[name], name)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_pipeline_from_single_file(name, tmp_path):
    """diffusers' whole single-file path, configured by the configs jaxsd infers: diffusers builds
    the models (and scheduler) from them and loads our file into them."""
    family, models, configs, state_dicts = build(name)
    path = tmp_path / "model.safetensors"
    write_single_file(path, state_dicts, configs, family)
    inferred = read_single_file(path, **unseen(configs)).configs
    folder = tmp_path / "config"       # a local diffusers pipeline folder, configs only
    for component, filename in (("unet", "config.json"), ("vae", "config.json"),
                                ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        (folder / component).mkdir(parents=True)
        (folder / component / filename).write_text(json.dumps(inferred[component]))
    scheduler_class = inferred["scheduler"]["_class_name"]
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", scheduler_class], "tokenizer": [None, None],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, tokenizer=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        assert_same_state_dict(getattr(pipe, component).state_dict(), state_dicts[component], component)
    assert type(pipe.scheduler).__name__ == scheduler_class == ("DDIMScheduler" if name == "sd2" else "PNDMScheduler")
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    assert pipe.unet.config.upcast_attention == (name == "sd2")


# ---------------------------------------------------------------------------------------------
# 2. read_single_file recovers the tensors and infers the architecture.

def test_read_recovers_every_tensor(case):
    checkpoint = read_single_file(case["path"], **unseen(case["configs"]))
    assert set(checkpoint.state_dicts) == set(case["state_dicts"])
    for component in case["state_dicts"]:
        assert_same_state_dict(checkpoint.state_dicts[component], case["state_dicts"][component], component)


def test_inferred_arch_and_configs(case):
    checkpoint = read_single_file(case["path"], **unseen(case["configs"]))
    arch, configs = checkpoint.arch, checkpoint.configs
    inpainting = case["name"].endswith("inpaint")
    assert arch.family == case["family"]
    assert arch.in_channels == (9 if inpainting else 4)
    assert arch.model_type == MODEL_TYPE[case["name"]]
    assert arch.prediction_type == ("v_prediction" if case["name"] == "sd2" else "epsilon")
    assert configs["scheduler"]["prediction_type"] == arch.prediction_type
    assert arch.upcast_attention == (case["name"] == "sd2")
    assert set(configs) == set(case["configs"]) | {"scheduler"}
    # Every inferred field equals the model's own config, except bookkeeping, the default size
    # and the text projection width of a CLIPTextModel (unused; set as in SD 1.5's / SD 2's configs).
    for component, model_config in case["configs"].items():
        for key, value in configs[component].items():
            if key in model_config and key not in ("sample_size", "_class_name", "architectures") and not (
                    key == "projection_dim" and component == "text_encoder"):
                expected = list(model_config[key]) if isinstance(model_config[key], tuple) else model_config[key]
                assert value == expected, (component, key, value, expected)
    if case["family"].startswith("sdxl"):   # the rest is SD's LDM yaml; SDXL's: test_xl_real_size_inference
        assert configs["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
        assert configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
        return
    # ... and diffusers' own mapping from the LDM yaml of this model gives the same fields.
    yaml = ldm_yaml(case["configs"]["unet"], case["configs"]["vae"], case["family"])
    shapes_only = {k: np.broadcast_to(np.float32(0), s) for k, s in
                   ((k, SafetensorsFile(case["path"]).shape(k)) for k in SafetensorsFile(case["path"]))}
    theirs = ref.create_unet_diffusers_config_from_ldm(yaml, shapes_only)
    # Small SD 2 models differ from diffusers' rules in two fields that only have meaning at
    # real sizes (checked in test_real_size_inference): diffusers calls a file SD 2 when its
    # cross-attention is 1024 wide (image size 768), and 64-wide heads on 32 channels make 0 heads.
    skip = {"sample_size", "attention_head_dim"} if case["family"] == "sd2" else set()
    assert {k: v for k, v in theirs.items() if k not in skip} == \
           {k: configs["unet"][k] for k in theirs if k not in skip}
    theirs = ref.create_vae_diffusers_config_from_ldm(yaml, shapes_only)
    assert {k: v for k, v in theirs.items() if k not in skip} == \
           {k: configs["vae"][k] for k in theirs if k not in skip}


def test_overrides_and_dtype(case):
    checkpoint = read_single_file(case["path"], prediction_type="v_prediction", upcast_attention=False,
                                  image_size=256, dtype=np.float16, **unseen(case["configs"]))
    assert checkpoint.arch.prediction_type == "v_prediction"
    assert checkpoint.configs["scheduler"]["prediction_type"] == "v_prediction"
    assert checkpoint.configs["unet"]["upcast_attention"] is False
    assert checkpoint.configs["vae"]["sample_size"] == 256
    assert checkpoint.configs["unet"]["sample_size"] == 256 // 2   # a 2-level VAE downsamples by 2
    key = "conv_in.weight"
    assert checkpoint.state_dicts["unet"][key].dtype == np.float16
    np.testing.assert_array_equal(checkpoint.state_dicts["unet"][key],
                                  case["state_dicts"]["unet"][key].astype(np.float16))
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        read_single_file(case["path"], prediction_type="sample", **unseen(case["configs"]))


# ---------------------------------------------------------------------------------------------
# 3. The inference at the real SD 1.5 / SD 2.1 sizes, on shapes alone.

# SD 1.5's and SD 2.1's published unet/vae/text_encoder config.json fields.
REAL = {
    "sd1": dict(
        unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                  cross_attention_dim=768, use_linear_projection=False, sample_size=64, in_channels=4,
                  out_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, upcast_attention=False),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, hidden_act="quick_gelu", vocab_size=49408,
                          max_position_embeddings=77, projection_dim=768, bos_token_id=0,
                          eos_token_id=2, pad_token_id=1)),
    "sd2": dict(
        unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                  attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                  sample_size=96, in_channels=4, out_channels=4, upcast_attention=True,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu", vocab_size=49408,
                          max_position_embeddings=77, projection_dim=512, bos_token_id=0,
                          eos_token_id=2, pad_token_id=1)),
}
REAL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                in_channels=3, out_channels=3, scaling_factor=0.18215)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_size_inference(family):
    real = REAL[family]
    with torch.device("meta"):   # parameters without storage: only shapes
        unet = UNet2DConditionModel(**{k: v for k, v in real["unet"].items() if k != "upcast_attention"})
        vae = AutoencoderKL(**{k: v for k, v in REAL_VAE.items() if k != "scaling_factor"},
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        text = CLIPTextModel(CLIPTextConfig(**real["text_encoder"]))
    models = {"unet": unet, "vae": vae, "text_encoder": text}
    # Zero-byte stand-ins with the real shapes (uint8 keeps OpenCLIP's q/k/v concatenation small).
    state_dicts = {n: {k: np.broadcast_to(np.uint8(0), v.shape) for k, v in m.state_dict().items()}
                   for n, m in models.items()}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text.config.to_dict()}
    file = to_single_file_state_dict(state_dicts, configs, family)
    shapes = {k: v.shape for k, v in file.items()}
    arch, inferred = infer_arch(shapes)
    assert arch.model_type == ref.infer_diffusers_model_type(file) == {"sd1": "v1", "sd2": "v2"}[family]
    assert arch.prediction_type == ("epsilon" if family == "sd1" else "v_prediction")
    for component, expected in (("unet", real["unet"]), ("vae", REAL_VAE), ("text_encoder", real["text_encoder"])):
        for key, value in expected.items():
            assert inferred[component][key] == value, (component, key, inferred[component][key], value)
    yaml = ldm_yaml(inferred["unet"], inferred["vae"], family)
    theirs = ref.create_unet_diffusers_config_from_ldm(yaml, file)
    assert theirs == {k: inferred["unet"][k] for k in theirs}
    theirs = ref.create_vae_diffusers_config_from_ldm(yaml, file)
    assert theirs == {k: inferred["vae"][k] for k in theirs}
    assert set(file) == {k for m in key_maps(inferred, family).values() for k in m} | (
        {f"cond_stage_model.model.transformer.resblocks.23.{k}" for k in (
            "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
            "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")} | {"cond_stage_model.model.text_projection"}
        if family == "sd2" else set())
    # diffusers' converters map the real-size UNet and VAE keys to the models' keys and shapes.
    for component, convert in (("unet", ref.convert_ldm_unet_checkpoint), ("vae", ref.convert_ldm_vae_checkpoint)):
        converted = convert(file, configs[component])
        assert {k: tuple(v.shape) for k, v in converted.items()} == \
               {k: tuple(v.shape) for k, v in state_dicts[component].items()}


# SDXL base 1.0's and refiner 1.0's published unet/config.json fields; their text encoders
# (text_encoder/: CLIP ViT-L/14 as SD 1.5's; text_encoder_2/: OpenCLIP bigG); and the fields of
# sgm's sd_xl_base.yaml / sd_xl_refiner.yaml that diffusers maps to a UNet config.
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, projection_dim=1280,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
REAL_XL = {
    "sdxl": dict(
        unet=dict(block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
                  transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128, in_channels=4, out_channels=4,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        texts={"text_encoder": (CLIPTextModel, REAL["sd1"]["text_encoder"]),
               "text_encoder_2": (CLIPTextModelWithProjection, BIGG)},
        sgm=dict(model_channels=320, channel_mult=[1, 2, 4], transformer_depth=[1, 2, 10], context_dim=2048,
                 adm_in_channels=2816)),
    "sdxl_refiner": dict(
        unet=dict(block_out_channels=[384, 768, 1536, 1536], layers_per_block=2, attention_head_dim=[6, 12, 24, 24],
                  transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2560, sample_size=128, in_channels=4, out_channels=4,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        texts={"text_encoder_2": (CLIPTextModelWithProjection, BIGG)},
        sgm=dict(model_channels=384, channel_mult=[1, 2, 4, 4], transformer_depth=4, context_dim=[1280] * 4,
                 adm_in_channels=2560)),
}


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_xl_real_size_inference(family):
    """SDXL base / refiner at their real sizes, on shapes alone: the inferred configs are the
    published ones and diffusers' from sgm's yaml; diffusers' model-type inference agrees; and
    diffusers' converters give the same diffusers keys and shapes as jaxsd's key tables."""
    real = REAL_XL[family]
    vae_config = dict(REAL_VAE, scaling_factor=0.13025, force_upcast=True, sample_size=1024)
    with torch.device("meta"):   # parameters without storage: only shapes
        models = {"unet": UNet2DConditionModel(**real["unet"]),
                  "vae": AutoencoderKL(**vae_config, down_block_types=["DownEncoderBlock2D"] * 4,
                                       up_block_types=["UpDecoderBlock2D"] * 4),
                  **{n: cls(CLIPTextConfig(**kw)) for n, (cls, kw) in real["texts"].items()}}
    state_dicts = {n: {k: np.broadcast_to(np.uint8(0), v.shape) for k, v in m.state_dict().items()}
                   for n, m in models.items()}
    configs = {n: m.config.to_dict() if n.startswith("text") else dict(m.config) for n, m in models.items()}
    file = to_single_file_state_dict(state_dicts, configs, family)
    shapes = {k: v.shape for k, v in file.items()}
    meta = {k: torch.empty(s, dtype=torch.uint8, device="meta") for k, s in shapes.items()}
    arch, inferred = infer_arch(shapes)
    assert arch.family == family
    assert arch.model_type == ref.infer_diffusers_model_type(meta) == MODEL_TYPE[family]
    assert (arch.prediction_type, arch.upcast_attention, arch.image_size) == ("epsilon", False, 1024)
    for component, expected in (("unet", real["unet"]), ("vae", vae_config),
                                *((n, kw) for n, (_, kw) in real["texts"].items())):
        for key, value in expected.items():
            assert inferred[component][key] == value, (component, key, inferred[component][key], value)
    assert set(inferred) == set(models) | {"scheduler"}
    assert inferred["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
    assert {k: inferred["scheduler"][k] for k in ("_class_name", "beta_start", "beta_end", "beta_schedule",
                                                  "timestep_spacing", "steps_offset", "prediction_type",
                                                  "num_train_timesteps")} == {
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1,
        "prediction_type": "epsilon", "num_train_timesteps": 1000}
    # diffusers' mapping from sgm's yaml gives the same UNet and VAE fields.
    yaml = {"model": {"params": {"scale_factor": 0.13025, "network_config": {"params": dict(
        real["sgm"], num_classes="sequential", in_channels=4, out_channels=4, attention_resolutions=[4, 2],
        num_res_blocks=2, num_head_channels=64, use_linear_in_transformer=True)},
        "first_stage_config": {"params": {"ddconfig": dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                           in_channels=3, out_ch=3, z_channels=4)}}}}}
    theirs = ref.create_unet_diffusers_config_from_ldm(yaml, meta)
    assert theirs == {k: inferred["unet"][k] for k in theirs}
    theirs = ref.create_vae_diffusers_config_from_ldm(yaml, meta)
    assert theirs == {k: inferred["vae"][k] for k in theirs}
    # The same diffusers keys and shapes from jaxsd's tables, diffusers' converters and the models.
    ours = {n: {d: transform.to_diffusers(np.broadcast_to(np.uint8(0), shapes[ldm]))[i].shape
                for ldm, (ds, transform) in key_map.items() for i, d in enumerate(ds)}
            for n, key_map in key_maps(inferred, family).items()}
    theirs = {"unet": ref.convert_ldm_unet_checkpoint(meta, configs["unet"]),
              "vae": ref.convert_ldm_vae_checkpoint(meta, configs["vae"])}
    if "text_encoder" in models:
        theirs["text_encoder"] = {k.removeprefix("text_model."): v for k, v in ref.convert_ldm_clip_checkpoint(meta).items()}
    theirs["text_encoder_2"] = ref.convert_open_clip_checkpoint(
        models["text_encoder_2"], meta, prefix=DIFFUSERS_OPEN_CLIP_PREFIX[family, "text_encoder_2"])
    for n, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in theirs[n].items()} == expected, n
        assert ours[n] == expected, n


# ---------------------------------------------------------------------------------------------
# 4. An SDXL file end to end.

@pytest.mark.parametrize("name", ["sdxl", "sdxl_refiner"])
def test_xl_load_single_file(name, tmp_path):
    from jaxsd.checkpoints.sources import load_single_file

    family, models, configs, state_dicts = build(name)
    tensors = to_single_file_state_dict(state_dicts, configs, family)
    bigg, prefix = models["text_encoder_2"], DIFFUSERS_OPEN_CLIP_PREFIX[family, "text_encoder_2"]
    # OpenCLIP's layout: text_projection (width 48, embed_dim 24) is the Linear weight transposed;
    # in_proj_weight stacks q, k, v.
    np.testing.assert_array_equal(tensors[prefix + "text_projection"], bigg.text_projection.weight.detach().numpy().T)
    np.testing.assert_array_equal(tensors[prefix + "transformer.resblocks.2.attn.in_proj_weight"][48:96],
                                  bigg.text_model.encoder.layers[2].self_attn.k_proj.weight.detach().numpy())
    # What real SDXL files hold besides the networks is ignored.
    tensors.update({prefix + "logit_scale": np.float32(4.6), "denoiser.sigmas": np.ones(1000, np.float32)})
    if family == "sdxl":
        tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    save_safetensors(tmp_path / "xl.safetensors", tensors)
    c = load_single_file(tmp_path / "xl.safetensors", overrides=unseen(configs))
    assert c.is_xl and (c.text_encoder is None and c.tokenizer is None) == (family == "sdxl_refiner")
    assert c.pipeline_config == {"force_zeros_for_empty_prompt": family == "sdxl",
                                 "requires_aesthetics_score": family == "sdxl_refiner"}
    assert c.tokenizer_2.pad_token == "!" and (c.tokenizer is None or c.tokenizer.pad_token == "<|endoftext|>")
    assert c.scheduler_config["_class_name"] == "EulerDiscreteScheduler" and c.vae.config.scaling_factor == 0.13025
    assert c.unet.config.transformer_depth == ((1, 2, 3) if family == "sdxl" else (2, 2, 2, 2))
    assert c.unet.config.projection_class_embeddings_input_dim == XL_UNET["projection_class_embeddings_input_dim"] - (
        256 if family == "sdxl_refiner" else 0)
    # bigG's outputs, the projected pooled one (SDXL's text_embeds) included, match transformers'.
    ids = np.array([[0, 17, 5, 999, 1, 1], [0, 3, 998, 4, 999, 1]])   # 999: the largest id, <|endoftext|>'s role
    ours = c.text_encoder_2.apply({"params": c.text_params_2}, ids)
    with torch.no_grad():
        theirs = bigg(torch.from_numpy(ids))
    np.testing.assert_allclose(ours.text_embeds, theirs.text_embeds.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.last_hidden_state, theirs.last_hidden_state.numpy(), rtol=1e-4, atol=1e-5)


def test_xl_family_is_told_by_the_text_encoders():
    family, _, configs, state_dicts = build("sdxl")
    shapes = {k: v.shape for k, v in to_single_file_state_dict(state_dicts, configs, family).items()}
    overrides = unseen(configs)
    assert infer_arch(shapes, **overrides)[0].family == "sdxl"
    # A 9-channel base UNet is diffusers' "xl_inpaint".
    inpaint = dict(shapes, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)})
    assert infer_arch(inpaint, **overrides)[0].model_type == "xl_inpaint"
    # Without its CLIP ViT-L (conditioner.embedders.0.transformer.*) it is no known family ...
    no_clip = {k: v for k, v in shapes.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(SingleFileError, match=r"not a complete Stable Diffusion 1.x/2.x/XL.*"
                                              r"found UNet, VAE, SDXL OpenCLIP ViT-bigG/14"):
        infer_arch(no_clip, **overrides)
    # ... and with a refiner's embedder beside its own, two families.
    with pytest.raises(SingleFileError, match="more than one family"):
        infer_arch(dict(shapes, **{"conditioner.embedders.0.model.ln_final.weight": (48,)}), **overrides)
    # An SD 1 override for a component the file lacks is refused.
    refiner_family, _, refiner_configs, refiner_sds = build("sdxl_refiner")
    refiner = {k: v.shape for k, v in to_single_file_state_dict(refiner_sds, refiner_configs, refiner_family).items()}
    with pytest.raises(ValueError, match="text_encoder_config=.*has no text_encoder"):
        infer_arch(refiner, **unseen(refiner_configs), text_encoder_config={"num_attention_heads": 1})
    with pytest.raises(SingleFileError, match="9 input channels"):
        infer_arch(dict(refiner, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}),
                   **unseen(refiner_configs))


# ---------------------------------------------------------------------------------------------
# Errors, ignored keys, pickle.

def _tensors(path):
    file = SafetensorsFile(path)
    return {k: np.array(file[k]) for k in file}


SD1_UNSEEN = unseen(build("sd1")[2])


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    family, _, configs, state_dicts = build("sd1")
    path = tmp_path_factory.mktemp("sd1_errors") / "model.safetensors"
    write_single_file(path, state_dicts, configs, family)
    return path


def test_what_the_tensors_cannot_show_must_be_given(sd1_file):
    """A small (not released) architecture: head counts and GroupNorm groups are not guessed.
    Each missing one is named; a partial set is refused too (it used to load with SD's values)."""
    with pytest.raises(SingleFileError, match="not a released SD 1.x/2.x/XL architecture") as error:
        read_single_file(sd1_file)
    for name in ("unet_config['attention_head_dim']", "unet_config['norm_num_groups']",
                 "vae_config['norm_num_groups']", "text_encoder_config['num_attention_heads']"):
        assert name in str(error.value)
    for component, keys in UNSEEN.items():
        for key in keys if f"{component}_config" in SD1_UNSEEN else ():
            partial = {arg: {k: v for k, v in d.items() if (arg, k) != (f"{component}_config", key)}
                       for arg, d in SD1_UNSEEN.items()}
            with pytest.raises(SingleFileError) as error:
                read_single_file(sd1_file, **partial)
            assert str(error.value).count("_config[") == 1 and f"{component}_config[{key!r}]" in str(error.value)
    checkpoint = read_single_file(sd1_file, **SD1_UNSEEN)
    assert checkpoint.configs["unet"]["attention_head_dim"] == 8
    assert checkpoint.configs["text_encoder"]["num_attention_heads"] == 1


def test_overrides_that_contradict_the_file_or_are_unknown(sd1_file):
    given = lambda **unet: dict(SD1_UNSEEN, unet_config={**SD1_UNSEEN["unet_config"], **unet})
    # Repeating what the tensors say is fine (tuples or lists); changing it is not.
    read_single_file(sd1_file, **given(block_out_channels=(32, 64, 64), layers_per_block=2))
    with pytest.raises(SingleFileError, match=r"unet_config\['block_out_channels'\] = \[32, 64, 128\] "
                                              r"contradicts the file.*\[32, 64, 64\]"):
        read_single_file(sd1_file, **given(block_out_channels=[32, 64, 128]))
    with pytest.raises(ValueError, match=r"unknown unet config field\(s\) \['attention_heads'\]"):
        read_single_file(sd1_file, **given(attention_heads=8))
    with pytest.raises(ValueError, match=r"unet_config\['sample_size'\]: pass image_size="):
        read_single_file(sd1_file, **given(sample_size=32))
    with pytest.raises(TypeError, match="vae_config=32: expected a dict"):
        read_single_file(sd1_file, **dict(SD1_UNSEEN, vae_config=32))
    # Settings that are neither counted nor unseen may be given (here the norm epsilon).
    checkpoint = read_single_file(sd1_file, **given(norm_eps=1e-6))
    assert checkpoint.configs["unet"]["norm_eps"] == 1e-6


def test_known_extras_are_ignored(sd1_file, tmp_path, caplog):
    tensors = _tensors(sd1_file)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    tensors.update({
        "model_ema.decay": np.float32(0.9999), "model_ema.diffusion_modelinput_blocks00weight":
            tensors["model.diffusion_model.input_blocks.0.0.weight"],
        "alphas_cumprod": np.cumprod(1 - betas).astype(np.float32), "betas": betas.astype(np.float32),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None],
        "first_stage_model.loss.logvar": np.float32(0)})
    save_safetensors(tmp_path / "extras.safetensors", tensors)
    with caplog.at_level(logging.WARNING):
        checkpoint = read_single_file(tmp_path / "extras.safetensors", **SD1_UNSEEN)
    assert not caplog.records
    assert checkpoint.configs["scheduler"]["num_train_timesteps"] == 1000
    # A file whose own schedule buffer disagrees with the inferred scheduler config: a warning.
    tensors["alphas_cumprod"] = np.cumprod(1 - 2 * betas).astype(np.float32)
    save_safetensors(tmp_path / "odd.safetensors", tensors)
    with caplog.at_level(logging.WARNING):
        read_single_file(tmp_path / "odd.safetensors", **SD1_UNSEEN)
    assert "alphas_cumprod" in caplog.text


def test_unknown_and_missing_keys_are_listed(sd1_file, tmp_path):
    tensors = _tensors(sd1_file)
    tensors["model.diffusion_model.extra_block.weight"] = np.zeros(3, np.float32)
    tensors["lora_unet_down.alpha"] = np.float32(1)
    del tensors["first_stage_model.decoder.up.0.block.1.conv2.bias"]
    del tensors["model.diffusion_model.output_blocks.5.2.conv.weight"]
    save_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(SingleFileError) as error:
        read_single_file(tmp_path / "bad.safetensors", **SD1_UNSEEN)
    message = str(error.value)
    for key in ("model.diffusion_model.extra_block.weight", "lora_unet_down.alpha",
                "first_stage_model.decoder.up.0.block.1.conv2.bias",
                "model.diffusion_model.output_blocks.5.2.conv.weight"):
        assert key in message
    assert "2 missing" in message and "2 unknown" in message


def test_sd2_drops_the_last_open_clip_layer_only(tmp_path):
    family, _, configs, state_dicts = build("sd2")
    tensors = to_single_file_state_dict(state_dicts, configs, family)
    del tensors["cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.bias"]   # ignored: fine
    tensors["cond_stage_model.model.transformer.resblocks.24.ln_1.bias"] = np.zeros(64, np.float32)
    save_safetensors(tmp_path / "m.safetensors", tensors)
    # 25 resblocks now: the text encoder is read as 24 layers, so resblock 23 is needed in full.
    with pytest.raises(SingleFileError, match=r"resblocks\.23\.mlp\.c_fc\.bias"):
        read_single_file(tmp_path / "m.safetensors", **unseen(configs))


def test_not_a_stable_diffusion_file(tmp_path):
    clip = CLIPTextModel(CLIPTextConfig(**SD1_TEXT))
    save_safetensors(tmp_path / "clip.safetensors", {k: v.numpy() for k, v in clip.state_dict().items()})
    with pytest.raises(SingleFileError, match=r"not a complete Stable Diffusion.*model\.diffusion_model\.") as error:
        read_single_file(tmp_path / "clip.safetensors")
    assert "found none of them" in str(error.value)
    # A single-file text encoder alone (LDM prefix) is named for what it has.
    save_safetensors(tmp_path / "te.safetensors", {"cond_stage_model.transformer.text_model." + k: v.numpy()
                                                   for k, v in clip.state_dict().items()})
    with pytest.raises(SingleFileError, match="found CLIP"):
        read_single_file(tmp_path / "te.safetensors")
    with pytest.raises(SingleFileError, match="expected a .safetensors"):
        read_single_file(tmp_path / "model.gguf")


def test_pickle_needs_opt_in_and_reads_global_step(tmp_path):
    family, _, configs, state_dicts = build("sd2")
    tensors = to_single_file_state_dict(state_dicts, configs, family)
    path = tmp_path / "512-base-ema.ckpt"
    torch.save({"global_step": 875000, "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}},
               path)
    with pytest.raises(SingleFileError, match="pickle file.*allow_pickle=True"):
        read_single_file(path)
    checkpoint = read_single_file(path, allow_pickle=True, **unseen(configs))
    assert checkpoint.arch.global_step == 875000
    assert checkpoint.arch.prediction_type == "epsilon"   # SD 2.0-base's step: diffusers' rule
    for component in ("unet", "vae", "text_encoder"):
        assert_same_state_dict(checkpoint.state_dicts[component], state_dicts[component], component)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)   # no wrapper
    assert read_single_file(path, allow_pickle=True, **unseen(configs)).arch.prediction_type == "v_prediction"
