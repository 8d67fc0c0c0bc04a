"""How jaxsd runs on this process's devices: XLA's compilation cache, and the device mesh.

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

import jax

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
