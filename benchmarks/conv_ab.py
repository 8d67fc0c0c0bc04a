"""A/B of jaxsd's CPU convolution kernels in one process: the SD 1.5 UNet (batch 2, 64x64,
float32, random weights) with ``Conv``'s kernel choice as it is (1x1 as a matmul, small 3x3 as
im2col), against the same UNet with every convolution through ``lax.conv_general_dilated``,
calls alternating.

    python benchmarks/conv_ab.py --repeats 5

The "all XLA convolutions" variant is made by setting ``layers.GEMM_MAX_ROWS = 0`` and routing
the 1x1 matmul back to a convolution while that program is traced; nothing in jaxsd changes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import types


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsd.checkpoints.convert import expected_shapes, unflatten
    from jaxsd.models import layers
    from jaxsd.models.unet import SD15, UNet

    model = UNet(SD15)
    shapes = expected_shapes(model, *model.example_inputs())
    keys = iter(jax.random.split(jax.random.key(0), len(shapes)))
    params = {"params": unflatten({path: 0.02 * jax.random.normal(next(keys), shape) for path, shape in shapes.items()})}
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.standard_normal((2, 64, 64, 4)), jnp.float32), jnp.full((2,), 500, jnp.int32),
              jnp.asarray(rng.standard_normal((2, 77, 768)), jnp.float32))

    as_is = jax.jit(model.apply)
    out_as_is = as_is(params, *inputs).block_until_ready()

    real_jnp, real_rows = layers.jnp, layers.GEMM_MAX_ROWS

    def einsum(spec, a, b, **kw):  # Conv's 1x1 matmul, back to a convolution
        if spec == "bhwc,co->bhwo":
            return layers._lax_conv(a, b[None, None], 1, ((0, 0), (0, 0)))
        return real_jnp.einsum(spec, a, b, **kw)

    shim = types.SimpleNamespace(**{n: getattr(real_jnp, n) for n in dir(real_jnp) if not n.startswith("__")})
    shim.einsum = einsum
    layers.jnp, layers.GEMM_MAX_ROWS = shim, 0
    try:
        all_xla = jax.jit(UNet(SD15).apply)
        out_all_xla = all_xla(params, *inputs).block_until_ready()
        n_conv = all_xla.lower(params, *inputs).compile().as_text().count(" convolution(")
    finally:
        layers.jnp, layers.GEMM_MAX_ROWS = real_jnp, real_rows
    n_conv_as_is = as_is.lower(params, *inputs).compile().as_text().count(" convolution(")

    load_before = os.getloadavg()
    times = {"all XLA convolutions": [], "as is": []}
    for _ in range(args.repeats):
        for name, run in (("all XLA convolutions", all_xla), ("as is", as_is)):
            start = time.perf_counter()
            run(params, *inputs).block_until_ready()
            times[name].append(time.perf_counter() - start)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load before {load_before}, "
          f"after {tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"convolutions in the compiled UNet: {n_conv} all XLA, {n_conv_as_is} as is; outputs differ by at most "
          f"{float(jnp.abs(out_all_xla - out_as_is).max()):.1e} (output scale {float(jnp.abs(out_as_is).max()):.3f})")
    for name, ts in times.items():
        print(f"{name:22s} median {statistics.median(ts):7.3f} s (min {min(ts):.3f})")
    print(f"as is / all XLA: {statistics.median(times['as is']) / statistics.median(times['all XLA convolutions']):.2f}")


if __name__ == "__main__":
    main()
