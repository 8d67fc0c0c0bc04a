"""How jaxsd runs on this process's devices: XLA's compilation cache, and the device mesh.

Part 1, the compilation cache.

Compiling the sampling loop costs seconds to minutes (the built-in model: most of a cold
`jaxsd generate`). JAX can keep compiled programs on disk and read them back in a later process
(its persistent compilation cache); `jaxsd` turns it on for every command, in

    $JAXSD_CACHE_DIR, else $XDG_CACHE_HOME/jaxsd, else ~/.cache/jaxsd      (programs in xla/)

unless the command gets ``--no-cache`` or the environment has ``JAXSD_NO_CACHE=1``. A user who set
JAX's own ``JAX_COMPILATION_CACHE_DIR`` keeps it. In Python, call ``enable_compilation_cache()``
before the first compilation (JAX decides once per process whether it uses a cache).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Every program goes to the cache: measured on the built-in model, the small ones (noise, text
# encoder, decoder) together still cost a cold run about half a second more than reading them.
MIN_COMPILE_SECONDS = 0.0


def cache_dir() -> Path:
    """Where jaxsd keeps what it caches (the environment decides; nothing is created here)."""
    if os.environ.get("JAXSD_CACHE_DIR"):
        return Path(os.environ["JAXSD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxsd"


def cache_disabled() -> bool:
    """``JAXSD_NO_CACHE`` set to anything but "", "0" or "false"."""
    return os.environ.get("JAXSD_NO_CACHE", "").strip().lower() not in ("", "0", "false")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (default folder: ``cache_dir() / "xla"``).

    Returns the folder in use, or None when ``JAXSD_NO_CACHE`` is set. A cache folder that
    cannot be created is an error naming it (point ``JAXSD_CACHE_DIR`` elsewhere, or turn the
    cache off); a cache already chosen by JAX's own ``JAX_COMPILATION_CACHE_DIR`` is kept.
    """
    if cache_disabled():
        return None
    current = jax.config.jax_compilation_cache_dir
    if path is None and current:
        return Path(current)
    folder = Path(path).expanduser() if path is not None else cache_dir() / "xla"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the compilation cache folder {str(folder)!r} ({error.strerror}); "
                      "set JAXSD_CACHE_DIR to a writable folder, or JAXSD_NO_CACHE=1 "
                      "(--no-cache) to run without it") from error
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()  # JAX decided at its first compilation; decide again
    return folder


# ---------------------------------------------------------------------------------------------
# Part 2, data parallel: one batch spread over every device JAX can see.
#
# A generation's batch axis is split over a one-axis mesh ("batch") of the devices: the
# latents, text embeddings and image latents of image i live on one device, the parameters on
# all of them (replicated once per pipeline), and the same jitted programs run on every device
# at once (XLA partitions them from the inputs' shardings). A batch that does not divide is
# padded with copies of its last image, and the copies are dropped at the end. On several hosts
# (after `initialize_distributed`), jax.devices() spans all processes: the arrays below are
# global, each process holding its own devices' rows, and `to_host` gathers them everywhere.

BATCH = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None, batch: int | None = None) -> Mesh | None:
    """A one-axis mesh over ``devices`` (default: every device, all processes), or None for one.

    With ``batch``, at most that many devices: a batch of 3 on 8 devices uses 3, not 8 with 5
    rows of padding (a batch of 10 uses 8, padded to 16)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices=[] has no device to run on; pass None for all of jax.devices()")
    if batch is not None:
        devices = devices[:max(1, batch)]
    return Mesh(np.array(devices), (BATCH,)) if len(devices) > 1 else None


def padded_size(batch: int, mesh: Mesh) -> int:
    """The batch rounded up to a multiple of the mesh's device count."""
    n = mesh.devices.size
    return -(-batch // n) * n


def shard_batch(x, mesh: Mesh, size: int) -> jax.Array:
    """[B, ...] -> a global [size, ...] array split along axis 0, rows B.. copies of the last."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):  # one key per image
        data = shard_batch(jax.random.key_data(x), mesh, size)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    if x.shape[0] < size:
        x = np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])
    sharding = NamedSharding(mesh, PartitionSpec(BATCH))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh: Mesh):
    """Every array of ``tree`` whole on every device of the mesh (PRNG keys and scalars too)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def to_host(x) -> np.ndarray:
    """A (possibly global, multi-process) array as one NumPy array, the same in every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed() -> tuple[int, int]:
    """Join this process to a multi-host run: ``jax.distributed.initialize`` from the environment.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` when set; whatever is missing, JAX's own cluster detection fills in
    (SLURM, Open MPI, Cloud TPU, Kubernetes). Call it before anything else touches JAX. Returns
    (this process's index, the number of processes); afterwards ``jax.devices()`` lists every
    process's devices and the pipelines split their batches over all of them.
    """
    kwargs = {}
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            kwargs[arg] = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be an integer") from None
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as error:
        raise RuntimeError(f"could not start the multi-host run ({error}); set JAX_COORDINATOR_ADDRESS "
                           "(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run "
                           "under SLURM, Open MPI or on a Cloud TPU, which JAX detects") from error
    return jax.process_index(), jax.process_count()
