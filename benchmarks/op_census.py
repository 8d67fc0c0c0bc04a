"""Where a UNet call's time goes, op by op: jaxsd's kernels against PyTorch's on the same shapes.

    python benchmarks/op_census.py                         # SD 1.5, 64x64 latent, batch 2
    python benchmarks/op_census.py --config sdxl --size 128

Traces jaxsd's UNet once (shapes only) and records every convolution, dense layer and attention
call it makes with its shapes. Each distinct op is then timed on its own, jitted, against the
PyTorch call diffusers makes for it (``F.conv2d``, ``F.linear``, ``F.scaled_dot_product_attention``),
the two alternating, best of ``--repeats``; the table weights each by how often the UNet makes
it. What the census leaves out is everything elementwise (norms, activations, adds), which XLA
fuses into its neighbours and PyTorch runs as passes of their own, so the census's total ratio
is a little worse for jaxsd than the whole call's (``unet_speed.py``).
"""
from __future__ import annotations

import argparse
import collections
import os
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["sd15", "sd21", "sdxl"], default="sd15")
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--batch", type=int, default=2, help="2: one classifier-free guided step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=0, help="print only the N ops with the largest time difference")
    return p.parse_args()


def record_ops(model, inputs):
    """Trace ``model.init`` once and count each (kind, shapes) of op the UNet makes."""
    import jax
    import flax.linen as nn
    from jaxsd.models import layers, transformer

    ops = collections.Counter()
    conv_call, dense_call, attention = layers.Conv.__call__, nn.Dense.__call__, transformer.attention

    def conv_spy(self, x):
        ops[("conv", x.shape, self.kernel_size, self.stride, self.padding, self.features)] += 1
        return conv_call(self, x)

    def dense_spy(self, x):
        ops[("dense", x.shape, self.features, self.use_bias)] += 1
        return dense_call(self, x)

    def attention_spy(q, k, v, **kw):
        ops[("attention", q.shape, k.shape)] += 1
        return attention(q, k, v, **kw)

    layers.Conv.__call__, nn.Dense.__call__, transformer.attention = conv_spy, dense_spy, attention_spy
    try:
        jax.eval_shape(model.init, jax.random.key(0), *inputs)
    finally:
        layers.Conv.__call__, nn.Dense.__call__, transformer.attention = conv_call, dense_call, attention
    return ops


def runners(op, rng):
    """(jaxsd, torch) callables for one recorded op, on random inputs of its shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    import flax.linen as nn
    from jaxsd.models.layers import Conv, attention

    kind, shape = op[0], op[1]
    x = rng.standard_normal(shape, np.float32)
    if kind == "conv":
        _, _, k, s, padding, features = op
        module = Conv(features, k, s, padding)
        params = module.init(jax.random.key(0), jnp.asarray(x))
        apply, xj = jax.jit(module.apply), jnp.asarray(x)
        w = torch.from_numpy(np.asarray(params["params"]["kernel"])).permute(3, 2, 0, 1).contiguous()
        b = torch.from_numpy(np.asarray(params["params"]["bias"]))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        (top, bottom), (left, right) = padding
        xt = F.pad(xt, (left, right, top, bottom))
        return (lambda: apply(params, xj).block_until_ready()), (lambda: F.conv2d(xt, w, b, stride=s))
    if kind == "dense":
        _, _, features, use_bias = op
        module = nn.Dense(features, use_bias=use_bias)
        params = module.init(jax.random.key(0), jnp.asarray(x))
        apply, xj = jax.jit(module.apply), jnp.asarray(x)
        w = torch.from_numpy(np.asarray(params["params"]["kernel"]).T.copy())
        b = torch.from_numpy(np.asarray(params["params"]["bias"])) if use_bias else None
        xt = torch.from_numpy(x)
        return (lambda: apply(params, xj).block_until_ready()), (lambda: F.linear(xt, w, b))
    k_shape = op[2]
    q, k, v = x, rng.standard_normal(k_shape, np.float32), rng.standard_normal(k_shape, np.float32)
    qj, kj, vj = map(jnp.asarray, (q, k, v))
    attend = jax.jit(attention)
    # diffusers hands SDPA [B, N, T, H] views of its [B, T, N*H] projections: no copy.
    qt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    return (lambda: attend(qj, kj, vj).block_until_ready()), (lambda: F.scaled_dot_product_attention(qt, kt, vt))


def best_of(run, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def describe(op):
    kind, shape = op[0], op[1]
    if kind == "conv":
        _, _, k, s, _, features = op
        return f"conv {k}x{k}{' /2' if s == 2 else ''} {'x'.join(map(str, shape))} -> {features}"
    if kind == "dense":
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return f"dense {rows}x{shape[-1]} -> {op[2]}"
    B, T, N, H = shape
    return f"attention B{B} T{T} S{op[2][1]} {N}x{H}"


def main():
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import torch

    from jaxsd.models.unet import SD15, SD21, SDXL_BASE, UNet

    torch.set_grad_enabled(False)
    config = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL_BASE}[args.config]
    model = UNet(config)
    inputs = model.example_inputs(batch=args.batch, size=args.size)
    ops = record_ops(model, inputs)
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    rows, totals = [], collections.defaultdict(lambda: [0.0, 0.0])
    for op, count in ops.items():
        run_jaxsd, run_torch = runners(op, rng)
        run_jaxsd(), run_torch()  # compile / warm up
        t_jaxsd, t_torch = best_of(run_jaxsd, args.repeats), best_of(run_torch, args.repeats)
        for key in (op[0], "all"):
            totals[key][0] += count * t_jaxsd
            totals[key][1] += count * t_torch
        rows.append((count * (t_jaxsd - t_torch), describe(op), count, t_jaxsd, t_torch))
    rows.sort(reverse=True)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"config: {args.config}, batch {args.batch}, latent {args.size}x{args.size}, float32; "
          f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")
    print(f"load average before: {load_before}, after: {tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"{'op':48s} {'count':>5s} {'jaxsd ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'x count: diff ms':>17s}")
    for diff, name, count, t_jaxsd, t_torch in rows[:args.top or None]:
        print(f"{name:48s} {count:5d} {t_jaxsd * 1e3:9.1f} {t_torch * 1e3:9.1f} {t_jaxsd / t_torch:6.2f} {diff * 1e3:+17.0f}")
    for key, (t_jaxsd, t_torch) in totals.items():
        print(f"total {key:10s} jaxsd {t_jaxsd:7.2f} s  torch {t_torch:7.2f} s  ratio {t_jaxsd / t_torch:.2f}")


if __name__ == "__main__":
    main()
