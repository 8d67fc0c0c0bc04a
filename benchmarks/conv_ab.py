"""A/B of CPU convolution kernels in one process: the SD 1.5 UNet (batch 2, 64x64, float32,
random weights) with ``Conv`` as it is (every convolution through ``lax.conv_general_dilated``),
against two variants that were tried and withdrawn (benchmarks/RESULTS.md): 1x1 kernels as a
matmul, and also 3x3 kernels with at most 512 output pixels as one matmul over gathered patches
(im2col; it crashed XLA's CPU compiler in CI). Calls alternate.

    python benchmarks/conv_ab.py --repeats 5

The variants swap ``layers._lax_conv`` while their program is traced; nothing in jaxsd changes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


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
    real_conv = layers._lax_conv

    def matmul_1x1(x, w, stride, padding):
        if w.shape[:2] == (1, 1) and stride == 1:
            return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])
        return real_conv(x, w, stride, padding)

    def and_small_as_im2col(x, w, stride, padding):
        (top, bottom), (left, right) = padding
        k = w.shape[0]
        B, H, W, _ = x.shape
        rows = B * ((H + top + bottom - k) // stride + 1) * ((W + left + right - k) // stride + 1)
        if k > 1 and rows <= 512:
            return patch_matmul_conv(x, w, stride, padding)
        return matmul_1x1(x, w, stride, padding)

    variants, outputs, n_conv = {"as is": as_is}, {}, {}
    for name, conv in (("1x1 as matmul", matmul_1x1), ("+ small 3x3 as im2col", and_small_as_im2col)):
        layers._lax_conv = conv
        try:
            variants[name] = jax.jit(UNet(SD15).apply)
            outputs[name] = variants[name](params, *inputs).block_until_ready()
            n_conv[name] = variants[name].lower(params, *inputs).compile().as_text().count(" convolution(")
        finally:
            layers._lax_conv = real_conv
    n_conv["as is"] = as_is.lower(params, *inputs).compile().as_text().count(" convolution(")

    load_before = os.getloadavg()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run(params, *inputs).block_until_ready()
            times[name].append(time.perf_counter() - start)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load before {load_before}, "
          f"after {tuple(round(x, 2) for x in os.getloadavg())}")
    print(f"output scale {float(jnp.abs(out_as_is).max()):.3f}")
    base = statistics.median(times["as is"])
    for name, ts in times.items():
        diff = float(jnp.abs(outputs[name] - out_as_is).max()) if name in outputs else 0.0
        print(f"{name:22s} median {statistics.median(ts):7.3f} s (min {min(ts):.3f}), "
              f"{statistics.median(ts) / base:.2f}x as is; {n_conv[name]} convolutions compiled; "
              f"outputs differ by {diff:.1e}")


def patch_matmul_conv(x_BHWC, kernel_kkIO, stride: int, padding):
    """The same convolution as one matrix product over the k*k shifted copies of the input."""
    import jax.numpy as jnp

    k, _, C_in, C_out = kernel_kkIO.shape
    x_BHWC = jnp.pad(x_BHWC, ((0, 0), *padding, (0, 0)))
    B, H, W, _ = x_BHWC.shape
    H_out, W_out = (H - k) // stride + 1, (W - k) // stride + 1
    # patches[b, i, j, (di, dj, c)] = x[b, s*i + di, s*j + dj, c]: the kernel's own HWI order
    patches = jnp.concatenate([x_BHWC[:, di:di + stride * (H_out - 1) + 1:stride,
                                      dj:dj + stride * (W_out - 1) + 1:stride, :]
                               for di in range(k) for dj in range(k)], axis=-1)
    return jnp.einsum("bhwp,po->bhwo", patches, kernel_kkIO.reshape(k * k * C_in, C_out))


if __name__ == "__main__":
    main()
