"""benchmarks/gpu_check.py --tiny: the GPU suite end to end on CPU at tiny sizes (kernels interpreted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_tiny_runs_every_section(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "FEWSTEP_KERNELS")}
    env.update(OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out",
                           str(tmp_path / "results")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "gpu-cpu-tiny.json").read_text())
    written = (tmp_path / "results" / "gpu-cpu-tiny.json").read_text()
    assert (tmp_path / "out" / "gpu-cpu-tiny.json").read_text() == written
    assert "| shared | 1 |" in (tmp_path / "out" / "gpu-cpu-tiny.md").read_text()
    sections = report["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {"dmd2": "ok", "ops": "ok", "kernel_tests": "ok"}
    assert sections["kernel_tests"]["counts"]["passed"] >= 2 and "failed" not in sections["kernel_tests"]["counts"]
    rows = sections["ops"]["rows"]
    assert {r["op"] for r in rows} == {"guided_x0", "add_fresh_noise", "dmd_loss"}
    assert all(isinstance(r["ms"][v], float) for r in rows for v in ("eager", "compiled", "fused", "fused+compiled"))
    rows = sections["dmd2"]["modes"]
    assert all(m["status"] == "ok" and m["seconds_per_iteration"] > 0 for m in rows)
    modes = {m["mode"]: m for m in rows if m["batch"] == 1}
    # throughput at each mode's best batch: shared ran batch 1 and 4, the baselines batch 1
    best = sections["dmd2"]["images_per_second_best"]
    assert best["shared"] == max(m["batch"] / m["seconds_per_iteration"] for m in rows if m["mode"] == "shared")
    assert sections["dmd2"]["speedup"]["throughput shared / baseline-full (each at its best batch)"] == \
        pytest.approx(best["shared"] * modes["baseline-full"]["seconds_per_iteration"])
    assert [m["batch"] for m in rows if m["mode"] == "shared"] == [1, 4]
    assert rows[-1]["forward_tflop"] == pytest.approx(4 * modes["shared"]["forward_tflop"])
    # model FLOPs, pass by pass, from one counted forward F: 9F with full networks, 7F for two LoRA networks
    forward = modes["shared"]["forward_tflop"]
    assert forward > 0 and modes["baseline-full"]["forward_tflop"] == forward
    assert modes["baseline-full"]["model_tflop_per_iteration"] == pytest.approx(9 * forward)
    assert modes["baseline-lora"]["model_tflop_per_iteration"] == pytest.approx(8 * forward)
    assert modes["shared"]["model_tflop_per_iteration"] == pytest.approx(7 * forward)


def test_sdxl_config_builds_sdxl_base_unet_on_meta():
    """benchmarks/sdxl_unet.json is SDXL-base's UNet architecture: 2.567 B parameters (the SDXL report's
    "2.6B UNet"), built on the meta device without memory or weights."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import dmd2_iteration
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**dmd2_iteration.sdxl_config())
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 2567
