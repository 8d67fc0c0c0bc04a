"""Peak host memory of loading a real-size UNet (SDXL base: 2.6B parameters) with jaxsd.

    python benchmarks/load_memory.py [--folder /tmp/sdxl-unet-fp16] [--config sdxl]

Writes the UNet in diffusers' layout with random weights as a float16 ``variant="fp16"`` file
(5.1 GB for SDXL; kept in ``--folder`` for the next run), then loads it in a fresh process per
case with ``load_unet`` and reports, as multiples of the loaded parameters' size:

- ``peak anonymous``: the largest private memory seen (``RssAnon``, sampled every 20 ms): the
  arrays jaxsd holds. Loading must stay near 1.0x (never two float32 copies);
- ``peak RSS``: the kernel's high-water mark (``VmHWM``), which also counts the file's pages
  while they are memory-mapped and read (the OS can drop them at any time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import jax.numpy as jnp
from jaxsd.checkpoints.components import load_unet

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.02)
base = status("RssAnon")
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
model, params = load_unet(sys.argv[1], dtype=getattr(jnp, sys.argv[2]), variant="fp16")
seconds = time.perf_counter() - start
done.set(); thread.join()
import jax
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps(dict(dtype=sys.argv[2], seconds=seconds, params_bytes=nbytes, base_anon=base,
                      peak_anon=max(peak[0], status("RssAnon")), vm_hwm=status("VmHWM"))))
"""


def write_unet(folder: Path, config_name: str) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from jaxsd.models.unet import SD15, SDXL_BASE
    from jaxsd.training.export import unet_config_json

    config = {"sd15": SD15, "sdxl": SDXL_BASE}[config_name]
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(unet_config_json(config, 128 if config_name == "sdxl" else 64))
    model = model.to_empty(device="cpu").to(torch.float16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(torch.float16) * 0.02)
    model.save_pretrained(folder, variant="fp16", max_shard_size="20GB")
    return sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/jaxsd-bench-sdxl-unet-fp16"))
    p.add_argument("--config", choices=["sdxl", "sd15"], default="sdxl")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    if not (args.folder / "config.json").is_file():
        start = time.perf_counter()
        count = write_unet(args.folder, args.config)
        print(f"wrote {count / 1e9:.2f}B parameters as float16 to {args.folder} in "
              f"{time.perf_counter() - start:.0f} s")
    file_bytes = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    print(f"load average before: {os.getloadavg()}; file: {file_bytes / 1e9:.2f} GB (float16)")
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.folder), dtype], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        size = r["params_bytes"]
        print(f"load as {dtype:8s}: {r['seconds']:.1f} s; parameters {size / 1e9:.2f} GB; peak anonymous "
              f"{(r['peak_anon'] - r['base_anon']) / 1e9:.2f} GB above the start "
              f"= {(r['peak_anon'] - r['base_anon']) / size:.2f}x the parameters; peak RSS "
              f"{r['vm_hwm'] / 1e9:.2f} GB = {r['vm_hwm'] / size:.2f}x")


if __name__ == "__main__":
    main()
