"""Shared test setup: CPU JAX, deterministic torch, no network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The jaxsd command caches compiled programs in ~/.cache/jaxsd; tests write nothing there (the
# cache's own tests give their subprocesses a folder of their own).
os.environ["JAXSD_NO_CACHE"] = "1"
