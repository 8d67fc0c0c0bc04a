"""The benchmark scripts run (at tiny configs on the CPU), so that they are ready when a GPU is."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_end_to_end_at_a_tiny_config(tmp_path):
    """benchmarks/gpu.sh as it runs on a GPU machine, here on the CPU with a tiny random model
    (torch.compile skipped: its CPU compilation alone takes a minute): every system and batch
    measured, the Markdown table printed, the JSON written."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny",
                          "--batches", "1,2", "--steps", "3", "--size", "64", "--repeats", "1",
                          "--no-torch-compile"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert [(r["system"], r["batch"]) for r in results["rows"]] == [
        ("jaxsd fp32", 1), ("jaxsd fp32", 2), ("diffusers fp32", 1), ("diffusers fp32", 2)]
    for row in results["rows"]:
        assert row["warm_s"] > 0 and row["cold_s"] > 0 and row["unet_its"] > 0
    table = [line for line in out.stdout.splitlines() if line.startswith("| jaxsd fp32 | 2 |")]
    assert len(table) == 1 and table[0].endswith("x |")
    assert results["device"].startswith("cpu")
