"""Time one UNet call (one guided step: batch 2) for jaxsd (jitted) against diffusers, same run.

    python benchmarks/unet_speed.py                        # CPU, float32, SD 1.5, 64x64 latent
    python benchmarks/unet_speed.py --device gpu --dtype bfloat16   # jaxsd bf16 vs diffusers fp16 + SDPA
    python benchmarks/unet_speed.py --config sdxl --size 128 --sequential --repeats 2   # SDXL at 1024 px

Both models get the same random weights (the speed does not depend on them). Calls alternate
between the two implementations, after a warm-up call each (jaxsd's includes compilation, timed
apart), so that other work on the machine slows both alike; the median of the repeats is
reported together with the host load average before and after. ``--sequential`` holds one
model at a time (jaxsd's first, with its own random weights, then diffusers'), for a UNet whose
two float32 copies do not fit in memory together (SDXL: 10.3 GB each).
Extra XLA options go through the usual ``XLA_FLAGS`` environment variable.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="jaxsd compute and parameter dtype; on GPU diffusers runs float16 when this "
                        "is bfloat16 (its usual half-precision setting), on CPU the same dtype")
    p.add_argument("--config", choices=["sd15", "sd21", "sdxl"], default="sd15")
    p.add_argument("--size", type=int, default=64, help="latent height and width (64: 512x512 images)")
    p.add_argument("--batch", type=int, default=2, help="2: one classifier-free guided step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=["jaxsd", "diffusers"], help="time one implementation only")
    p.add_argument("--sequential", action="store_true", help="one model in memory at a time: "
                   "jaxsd's runs, then diffusers' (no alternation)")
    return p.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import diffusers
    from diffusers import UNet2DConditionModel

    from jaxsd.checkpoints.convert import convert, expected_shapes, unet_table
    from jaxsd.models.unet import SD15, SD21, SDXL_BASE, AddedCond, UNet

    config = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL_BASE}[args.config]
    load_before = os.getloadavg()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = UNet(config, dtype=dtype)
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    torch_dtype = {"float32": torch.float32,
                   "bfloat16": torch.float16 if args.device == "gpu" else torch.bfloat16}[args.dtype]

    def build_reference():
        """diffusers' model with random weights (built on the meta device: its own init is slow)."""
        from jaxsd.training.export import unet_config_json
        torch.manual_seed(0)
        with torch.device("meta"):
            reference = UNet2DConditionModel.from_config(unet_config_json(config, args.size))
        reference = reference.to_empty(device="cpu").eval()
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0.0, 0.02)
        return reference

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((args.batch, args.size, args.size, config.in_channels), np.float32)
    text = rng.standard_normal((args.batch, 77, config.cross_attention_dim), np.float32)
    timesteps = np.full((args.batch,), 500, np.int32)
    added = None
    if config.addition_embed_type:  # SDXL: pooled text [B, 1280] and six size numbers
        added = AddedCond(rng.standard_normal((args.batch, 1280), np.float32),
                          np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (args.batch, 1)))

    def jaxsd_runner(state=None):
        if state is None:  # --sequential: jaxsd's own random weights, no torch copy alive
            shapes = expected_shapes(model, *model.example_inputs())
            keys = iter(jax.random.split(jax.random.key(0), len(shapes)))
            from jaxsd.checkpoints.convert import unflatten
            params = unflatten({path: 0.02 * jax.random.normal(next(keys), shape, dtype)
                                for path, shape in shapes.items()})
        else:
            params = convert(state, unet_table(config), expected_shapes(model, *model.example_inputs()), dtype=dtype)
        apply = jax.jit(model.apply)
        jax_args = ({"params": params}, jnp.asarray(sample, dtype), jnp.asarray(timesteps), jnp.asarray(text, dtype),
                    None, added)
        return lambda: apply(*jax_args).block_until_ready()

    def diffusers_runner(reference):
        reference = reference.to(torch_device, torch_dtype)
        torch_args = (torch.from_numpy(sample).permute(0, 3, 1, 2).to(torch_device, torch_dtype),
                      torch.from_numpy(timesteps).to(torch_device),
                      torch.from_numpy(text).to(torch_device, torch_dtype))
        kwargs = {}
        if added is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(added.text_embeds).to(torch_device, torch_dtype),
                                           "time_ids": torch.from_numpy(added.time_ids).to(torch_device, torch_dtype)}

        def run():
            with torch.inference_mode():
                reference(*torch_args, **kwargs)
            if torch_device == "cuda":
                torch.cuda.synchronize()
        return run

    def measure(runs, warmup, times):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            warmup[name] = time.perf_counter() - start
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    names = [args.only] if args.only else ["jaxsd", "diffusers"]
    warmup, times = {}, {name: [] for name in names}
    if args.sequential:  # one model alive at a time
        for name in names:
            run = jaxsd_runner() if name == "jaxsd" else diffusers_runner(build_reference())
            measure({name: run}, warmup, times)
            del run
    else:
        reference = build_reference()
        state = {k: v.numpy() for k, v in reference.state_dict().items()}
        runs = {"jaxsd": jaxsd_runner(state), "diffusers": diffusers_runner(reference)}
        del state
        measure({name: runs[name] for name in names}, warmup, times)
    runs = times
    load_after = os.getloadavg()

    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; torch threads {torch.get_num_threads()})")
    print(f"versions: jax {jax.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"config: {args.config}, batch {args.batch}, latent {args.size}x{args.size}, text 77x"
          f"{config.cross_attention_dim}; jaxsd {args.dtype}, diffusers {str(torch_dtype).split('.')[-1]}"
          f"{'; sequential (one model at a time)' if args.sequential else ''}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {tuple(round(x, 2) for x in load_after)}")
    for name in runs:
        print(f"{name:10s} median {statistics.median(times[name]):7.3f} s  (min {min(times[name]):.3f}, "
              f"max {max(times[name]):.3f}, {args.repeats} repeats; first call {warmup[name]:.1f} s)")
    if len(runs) == 2:
        ratio = statistics.median(times["jaxsd"]) / statistics.median(times["diffusers"])
        print(f"jaxsd / diffusers time: {ratio:.2f}")


if __name__ == "__main__":
    main()
