"""The GPU table: SD 1.5 text-to-image, jaxsd vs diffusers (SDPA) vs diffusers + torch.compile.

    bash benchmarks/gpu.sh                         # on a GPU machine: the table, in under 8 minutes
    python benchmarks/gpu.py --tiny --device cpu   # the same script at a tiny config (the test runs this)

One process builds a random-weight checkpoint in SD 1.5's exact layout (diffusers folder, fp16
files; the speed does not depend on the weights, and nothing is downloaded), then, for each
batch size, times in turn:

- jaxsd, bfloat16 (its compilation cache off, so "cold" is a real first call);
- diffusers, float16, PyTorch's SDPA attention (its default);
- diffusers, float16, with ``torch.compile`` on the UNet (``--no-torch-compile`` skips it).

For each: the cold call (first in the process: compilation or autotuning included), the warm
call (the median of ``--repeats``), images/s of the warm call, UNet evaluations/s (a call that
stops at the latents, divided into its evaluations: 2 x steps images' worth with guidance), and
the peak device memory (jaxsd: XLA's peak so far in the process, so with batches in rising
order, the peak of that batch; PyTorch: reset per batch). Every call is 50 Euler steps (the same ``EulerDiscreteScheduler`` config
in both), guidance 7.5, 512 x 512. The table goes to stdout as Markdown, with the device named,
and as JSON to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
             "timestep_spacing": "leading", "prediction_type": "epsilon"}
PROMPT = "a photograph of an astronaut riding a horse"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (to test the script)")
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--repeats", type=int, default=2, help="warm calls per measurement (median)")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def build_checkpoint(folder: str, tiny: bool) -> None:
    """A random-weight SD 1.5 (or tiny) diffusers folder, saved in float16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxsd.checkpoints.tokenizer import BUILTIN_VOCABULARY

    torch.manual_seed(0)
    if tiny:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=4)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=64)
    else:  # stable-diffusion-v1-5's configs
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                hidden_act="quick_gelu", projection_dim=768, **text))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(BUILTIN_VOCABULARY),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)


def timed(call, repeats: int):
    """(cold seconds, median warm seconds): the first call, then `repeats` more."""
    start = time.perf_counter()
    call()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm)


def bench_jaxsd(folder, args, batches):
    import jax
    import jax.numpy as jnp

    from jaxsd import StableDiffusion

    pipe = StableDiffusion.from_pretrained(folder, jnp.bfloat16 if args.device == "gpu" else jnp.float32)
    pipe.devices = [jax.devices()[0]]  # one device, as the PyTorch side
    device = jax.devices()[0]
    rows = []
    for B in batches:
        kw = dict(batch_size=B, num_steps=args.steps, guidance_scale=7.5, scheduler="euler",
                  height=args.size, width=args.size, seed=0)
        cold, warm = timed(lambda: pipe.text_to_image(PROMPT, **kw), args.repeats)
        _, latents_only = timed(lambda: pipe.text_to_image(PROMPT, output="latents", **kw), args.repeats)
        stats = device.memory_stats() or {}
        rows.append(dict(system="jaxsd bf16" if args.device == "gpu" else "jaxsd fp32", batch=B,
                         cold_s=cold, warm_s=warm, images_per_s=B / warm,
                         unet_its=args.steps / latents_only,
                         peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30))
        report(rows[-1])
    return rows, f"{device.platform}: {device.device_kind}"


def bench_diffusers(folder, args, batches, compiled: bool):
    import torch
    from diffusers import StableDiffusionPipeline

    gpu = args.device == "gpu"
    dtype = torch.float16 if gpu else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe = pipe.to("cuda" if gpu else "cpu")
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet = torch.compile(pipe.unet)
    rows = []
    for B in batches:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        kw = dict(num_images_per_prompt=B, num_inference_steps=args.steps, guidance_scale=7.5,
                  height=args.size, width=args.size)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        run = lambda **more: (pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw, **more), sync())
        cold, warm = timed(run, args.repeats)
        _, latents_only = timed(lambda: run(output_type="latent"), args.repeats)
        name = ("diffusers fp16" if gpu else "diffusers fp32") + (" + torch.compile" if compiled else "")
        rows.append(dict(system=name, batch=B, cold_s=cold, warm_s=warm, images_per_s=B / warm,
                         unet_its=args.steps / latents_only,
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")))
        report(rows[-1])
    return rows


def report(row: dict) -> None:
    """One measurement as it is taken (a run cut short by a time limit keeps what it printed)."""
    print(f"measured: {json.dumps(row)}", flush=True)


def table(rows, device: str, args) -> str:
    lines = [f"device: {device}; {args.size} x {args.size}, {args.steps} Euler steps, guidance 7.5"
             f"{' (tiny random model)' if args.tiny else ' (SD 1.5 architecture, random weights)'}",
             "", "| system | batch | cold (s) | warm (s) | images/s | UNet it/s | peak memory (GiB) | vs diffusers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["batch"]: r["warm_s"] for r in rows if r["system"].startswith("diffusers") and "compile" not in r["system"]}
    for r in rows:
        ratio = base[r["batch"]] / r["warm_s"] if r["batch"] in base else float("nan")
        lines.append(f"| {r['system']} | {r['batch']} | {r['cold_s']:.1f} | {r['warm_s']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['unet_its']:.1f} | {r['peak_gib']:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    os.environ["JAXSD_NO_CACHE"] = "1"
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder, args.tiny)
        print(f"checkpoint built in {time.perf_counter() - start:.0f} s", flush=True)
        rows, device = bench_jaxsd(folder, args, batches)
        rows += bench_diffusers(folder, args, batches, compiled=False)
        if not args.no_torch_compile:
            rows += bench_diffusers(folder, args, batches, compiled=True)
    print(table(rows, device, args))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows, "args": vars(args)}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
