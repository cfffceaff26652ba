#!/usr/bin/env bash
# bench/gpu.sh: everything that needs a GPU, in one call of under 5 minutes on an H200 or H100.
#   1. installs the wheels this Python lacks from .whl/ (`make gpu-wheels`: pytest and its deps) into /tmp/site;
#   2. checks every Triton kernel against its reference on CUDA: pytest tests/tradeoff_kernels, fp16 and bf16, several shapes;
#   3. times each kernel against its PyTorch equivalent (bench/kernels.py, medians of triton.testing.do_bench);
#   4. the engine on the GPU (bench/gpu_decode.py, random weights in the default model's shape and a 1B one):
#      correctness of the fused path on a tiny model against the CPU, batch-1 decode tok/s and MBU eager vs CUDA
#      graphs over the Triton kernels (bf16 and int4), the cost of a k + 1 verification, a short batched sweep;
#   5. the same decode step through torch.compile ("reduce-overhead", then "max-autotune"), against our graphs;
# then prints one summary table last. JSON, logs and the tests' JUnit XML go under $OUT (default: bench/out).
# The steps' time limits add up to 290 s. Nothing travels but this working tree and .whl/ (~10 MB together): no
# model (the default GGUF is 98 MB, the tree 64 MiB at most), no network; the engine's model path imports with torch
# alone, and tests/tradeoff_kernels needs pytest besides.
#
#   make gpu-wheels         here, first: fills .whl/ (ignored by git: carry it, `run`'s carry [".whl"])
#   bench/gpu.sh            on a GPU machine
#   bench/gpu.sh --dry-run  on a CPU: the kernel tests under the Triton interpreter (fp32/fp16), the kernel bench
#                           with tiny shapes and no timing, and step 4 on a tiny shape (plumbing only)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# record NAME EXIT_CODE START_SECONDS LIMIT: one line of $OUT/steps.tsv, which the summary reads.
record() {
    local status
    case $2 in
        0) status=ok ;;
        124) status="timed out after ${4}s" ;;
        *) status="failed (exit $2)" ;;
    esac
    printf '%s\t%s\t%s\n' "$1" "$status" "$((SECONDS - $3))" >> "$OUT/steps.tsv"
}

# step NAME LIMIT_S COMMAND...: run it under a time limit, keep its output in $OUT/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    record "$name" "${PIPESTATUS[0]}" "$start" "$limit"
}

# 1. wheels whose distribution this Python lacks
install_wheels() {
    local missing
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "no .whl/ folder: nothing to install"
        return 0
    fi
    missing=$("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md
import os
import sys

for path in sys.argv[1:]:
    try:
        md.version(os.path.basename(path).split("-")[0])
    except md.PackageNotFoundError:
        print(path)
EOF
)
    if [ -z "$missing" ]; then
        echo "every wheel in .whl/ is installed already"
        return 0
    fi
    echo "installing into /tmp/site:" $missing
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site $missing
}
echo "=== wheels"
start=$SECONDS
install_wheels 2>&1 | tee "$OUT/wheels.log"
record wheels "${PIPESTATUS[0]}" "$start" -

# pytest: without the plugins this Python may carry (they need packages the GPU machine lacks)
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
if [ "$DRY" = 1 ]; then
    echo "dry run: CPU only; kernels run under the Triton interpreter, CUDA-only timings are skipped"
    step kernel_tests 240 env TRITON_INTERPRET=1 "$PY" -m pytest tests/tradeoff_kernels -q -p no:cacheprovider \
        --junitxml="$OUT/kernel_tests.xml"
    step kernel_bench 120 "$PY" -m bench.kernels --dry-run --json "$OUT/kernels.json"
    step engine 120 "$PY" -m bench.gpu_decode --dry-run --json "$OUT/gpu_decode.json"
else
    # fp32 is covered by CI under the interpreter; on the GPU check the dtypes the engine runs in
    step kernel_tests 75 env TRITON_INTERPRET=0 "$PY" -m pytest tests/tradeoff_kernels -q -p no:cacheprovider -k "not float32" \
        --junitxml="$OUT/kernel_tests.xml"
    step kernel_bench 35 "$PY" -m bench.kernels --dtype bf16 --json "$OUT/kernels.json"
    step engine 50 "$PY" -m bench.gpu_decode --paths eager,graphs --json "$OUT/gpu_decode.json"
    # compiles take tens of seconds each: rows are written as they are measured, so a limit keeps what was done
    step compile 80 "$PY" -m bench.gpu_decode --paths compile --json "$OUT/gpu_compile.json"
    step autotune 50 "$PY" -m bench.gpu_decode --paths max-autotune --shapes smollm2-135m --weights bf16 \
        --json "$OUT/gpu_autotune.json"
fi

# The summary: one table, last; also written to $OUT/gpu_summary.json.
"$PY" - "$OUT" "$DRY" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.report import table, write_json

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
rows = []


def add(check, result, target="", status=""):
    rows.append({"check": check, "result": result, "target": target, "status": status})


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    add(f"step {name}", f"{seconds} s", "", status)

if (out / "kernel_tests.xml").exists():
    suite = ET.parse(out / "kernel_tests.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    bad = n["failures"] + n["errors"]
    add("kernel tests" + (" (interpreter)" if dry else " (cuda, fp16+bf16)"),
        f"{passed} passed, {bad} failed, {n['skipped']} skipped", "all pass", "ok" if bad == 0 and passed else "FAIL")

kernels = load("kernels.json")
if kernels:
    if kernels.get("copy_bandwidth_gb_s"):
        add("device-to-device copy bandwidth", f"{kernels['copy_bandwidth_gb_s']:.0f} GB/s")
    for r in kernels["rows"]:
        name = f"{r['kernel']} {r['shape']}"
        if r.get("triton_us") is None:
            add(name, f"max rel err {r['max_rel_err']:.1e} (not timed: dry run)", "", "ok" if r["ok"] else "MISMATCH")
            continue
        result = f"{r['triton_us']:.1f} us, {r['speedup']:.2f}x {r['torch_op']}, {r['pct_copy_bw']:.0f}% copy bw"
        if r.get("int4mm_us"):
            result += f", torch int4mm {r['int4mm_us']:.1f} us"
        target, met = "", None
        if r["kernel"] == "paged decode attention" and r["shape"].startswith("B=1 ctx=4096 new=1"):
            target, met = ">= 70% of copy bw", r["pct_copy_bw"] >= 70
        elif r["kernel"].startswith("w4a16") and r["shape"].startswith("1x"):
            target, met = ">= 2.5x F.linear", r["speedup"] >= 2.5
        status = "MISMATCH" if not r["ok"] else {True: "meets", False: "below", None: "ok"}[met]
        add(name, result, target, status)
    for note in kernels.get("notes", []):
        add("note", note)

graphs = {}  # (shape, weights) -> tok/s of our graphs, for the compile rows
for name in ("gpu_decode.json", "gpu_compile.json", "gpu_autotune.json"):
    for r in (load(name) or {"rows": []})["rows"]:
        where = f"{r.get('shape', '')} {r.get('weights', '')} {r.get('path', '')}".strip()
        if r["kind"] == "correctness":
            add(f"engine: {r['check']}", f"err/RMS {r['max_err_vs_rms']:.1e}, greedy {r['greedy_agreement']:.3f}", "",
                "ok" if r["ok"] else "MISMATCH")
        elif r.get("error"):
            add(f"decode {where}", r["error"], "", "failed")
        elif r["kind"] == "copy bandwidth":
            if not kernels and name == "gpu_decode.json":  # each run measures it; show it once
                add("device-to-device copy bandwidth", f"{r['gb_s']:.0f} GB/s")
        elif r["kind"] == "decode":
            result = f"{r['tok_s']:.0f} tok/s" + (f", MBU {r['mbu_pct']:.0f}%" if r.get("mbu_pct") else "")
            if r["path"] == "graphs":
                graphs[r["shape"], r["weights"]] = r["tok_s"]
            if r.get("vs_eager"):
                result += f", {r['vs_eager']:.2f}x eager"
            if r["path"] != "graphs" and (r["shape"], r["weights"]) in graphs:
                result += f", {r['tok_s'] / graphs[r['shape'], r['weights']]:.2f}x our graphs"
            target, met = "", None
            if not dry and r["path"] == "graphs" and r["shape"] == "smollm2-135m":
                target, met = ">= 1500 tok/s", r["tok_s"] >= 1500
            elif not dry and r["path"] == "graphs" and r["shape"] == "llama-3.2-1b" and r["weights"] == "bf16":
                target, met = "MBU >= 70%", r.get("mbu_pct", 0) >= 70
            add(f"decode {where}" + (" (CPU plumbing check)" if dry else ""), result, target,
                {True: "meets", False: "below", None: "ok"}[met])
        elif r["kind"] == "verify cost":
            add(f"verify {r['rows']} rows, {where}", f"{r['step_ms']:.2f} ms, {r['vs_one_row']:.2f}x one row")
        elif r["kind"] == "batched decode":
            add(f"batched B={r['batch']} {where}", f"{r['step_ms']:.2f} ms/step, {r['tok_s']:.0f} tok/s total, "
                f"{r['tok_s_per_user']:.0f} tok/s/user")

print()
print(table(rows, [("check", "check", ""), ("result", "result", ""), ("target", "target", ""), ("status", "status", "")]))
print(f"JSON: {write_json(out / 'gpu_summary.json', 'gpu', rows, dry_run=dry)}")
# Targets missed are measurements, not failures; a failed step, test or comparison is.
sys.exit(1 if any(r["status"] in ("FAIL", "MISMATCH") or r["status"].startswith(("failed", "timed out")) for r in rows) else 0)
EOF
