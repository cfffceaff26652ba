"""bench/gpu_decode.py, the GPU check's engine step, as it must run on the GPU machine: with none of the model-format,
web or UI libraries importable (that machine has torch and Triton only), on a CPU here in its dry-run form (the fused
kernels under Triton's interpreter), producing every kind of row, its correctness rows passing, and the CPU named in
its JSON. No figure is asserted: a dry run measures nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_decode import SHAPES, step_bytes

ROOT = Path(__file__).resolve().parents[2]
ABSENT = ("textual", "websockets", "gguf", "tokenizers", "jinja2", "safetensors", "tqdm", "starlette", "uvicorn")
# Makes the libraries above unimportable, as a missing package is, then runs the benchmark.
RUN_WITHOUT = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
from bench.gpu_decode import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_dry_run_needs_only_torch_and_triton_and_covers_every_row_kind(tmp_path):
    out = tmp_path / "gpu_decode.json"
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT, "--dry-run", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["machine"]["cpu"]["model"]
    rows = report["rows"]
    assert not [r for r in rows if r.get("error")]
    checks = [r for r in rows if r["kind"] == "correctness"]
    assert [r["weights"] for r in checks] == ["bf16", "int4"] and all(r["ok"] for r in checks)
    decodes = {(r["weights"], r["path"]) for r in rows if r["kind"] == "decode"}
    assert decodes == {("bf16", "eager"), ("bf16", "graphs"), ("int4", "eager"), ("int4", "graphs")}
    assert [r["rows"] for r in rows if r["kind"] == "verify cost"] == [4, 8]
    assert [r["batch"] for r in rows if r["kind"] == "batched decode"] == [1, 2]
    assert "decode" in done.stdout and "JSON:" in done.stdout  # the table


@pytest.mark.parametrize("weights, bytes_per_layer_param", [("bf16", 2), ("int4", 0.625)])
def test_a_decode_steps_bytes_are_its_layers_its_dense_head_and_its_kv(weights, bytes_per_layer_param):
    cfg = SHAPES["smollm2-135m"]
    # SmolLM2-135M: 30 layers of 576x(576 + 2 x 192) qkv, 576x576 o, 3 x 576x1536 MLP; a 49,152 x 576 head
    layer_params = 30 * (576 * 960 + 576 * 576 + 3 * 576 * 1536)
    kv = 2 * 30 * 100 * 192 * 2  # k and v, 30 layers, 100 positions, 3 heads x 64, bf16
    assert step_bytes(cfg, weights, 100) == pytest.approx(layer_params * bytes_per_layer_param + 49152 * 576 * 2 + kv)
