#!/usr/bin/env bash
# bench/gpu.sh: everything that needs a GPU, in one call of under 5 minutes on an H100.
#   1. installs the project's missing wheels from .whl/ (a folder carried with the working tree) into /tmp/site;
#   2. checks every Triton kernel against its reference on CUDA: pytest tests/kernels, fp16 and bf16, several shapes;
#   3. times each kernel against its PyTorch equivalent (bench/kernels.py, medians of triton.testing.do_bench);
#   4. times batch-1 decode of the default model, eager vs CUDA graphs, with MBU (tradeoff bench decode);
#   5. the speculative speedup over plain decoding, with target MBU (tradeoff bench spec);
#   6. a short batched sweep: throughput vs per-user speed at a few concurrencies (tradeoff bench sweep);
# then prints one summary table last. JSON, logs and the tests' JUnit XML go under $OUT (default: bench/out).
# The steps' time limits add up to under 5 minutes.
#
#   bench/gpu.sh            on a GPU machine
#   bench/gpu.sh --dry-run  on a CPU: the kernel tests under the Triton interpreter (fp32/fp16), the kernel
#                           bench with tiny shapes and no timing, and steps 4-6 with a few tokens on the CPU
#                           (plumbing only: CUDA graphs do not apply there)
#
# Steps 4-6 need the default model on the GPU machine, which has no network: carry the model cache folder as
# .tradeoff-cache/ (used when present, unless TRADEOFF_CACHE is set), and gguf etc. as wheels in .whl/.
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
if [ -z "${TRADEOFF_CACHE:-}" ] && [ -d .tradeoff-cache ]; then export TRADEOFF_CACHE="$PWD/.tradeoff-cache"; fi
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

if [ "$DRY" = 1 ]; then
    echo "dry run: CPU only; kernels run under the Triton interpreter, CUDA-only timings are skipped"
    step kernel_tests 240 env TRITON_INTERPRET=1 "$PY" -m pytest tests/kernels -q -p no:cacheprovider \
        --junitxml="$OUT/kernel_tests.xml"
    step kernel_bench 120 "$PY" -m bench.kernels --dry-run --json "$OUT/kernels.json"
    echo "dry run: decode, speculation and a batched sweep on the CPU, a few tokens, to check the plumbing (not GPU figures)"
    step decode 180 "$PY" -m tradeoff bench decode --device cpu --weights fp32 --cuda-graphs both --runs 1 --max-tokens 8 \
        --json "$OUT/decode.json"
    step spec 240 "$PY" -m tradeoff bench spec --drafters off,ngram --max-tokens 8 --json "$OUT/spec.json"
    step sweep 180 "$PY" -m tradeoff bench sweep --device cpu --concurrency 1,2 --min-requests 4 --prompt-tokens 16 \
        --output-tokens 8 --no-latency-point --json "$OUT/sweep.json" --plot ""
else
    # fp32 is covered by CI under the interpreter; on the GPU check the dtypes the engine runs in
    step kernel_tests 110 env TRITON_INTERPRET=0 "$PY" -m pytest tests/kernels -q -p no:cacheprovider -k "not float32" \
        --junitxml="$OUT/kernel_tests.xml"
    step kernel_bench 60 "$PY" -m bench.kernels --dtype bf16 --json "$OUT/kernels.json"
    step decode 45 "$PY" -m tradeoff bench decode --device cuda --weights bf16 --cuda-graphs both --runs 3 --max-tokens 128 \
        --json "$OUT/decode.json"
    step spec 40 "$PY" -m tradeoff bench spec --drafters off,ngram,auto --max-tokens 64 --json "$OUT/spec.json"
    step sweep 35 "$PY" -m tradeoff bench sweep --device cuda --concurrency 1,4,16 --min-requests 8 --level-s 10 --prompt-tokens 64 \
        --output-tokens 32 --no-latency-point --json "$OUT/sweep.json" --plot ""
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

decode = load("decode.json")
for r in decode["rows"] if decode else []:
    graphs = r["graphs"] == "on"
    result = f"{r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms, MBU {r['mbu_pct']:.0f}%"
    if r.get("vs_eager"):
        result += f", {r['vs_eager']:.2f}x eager"
    target = ">= 1500 tok/s" if graphs else ""
    status = ("meets" if r["decode_tok_s"] >= 1500 else "below") if graphs else "ok"
    add(f"decode {r['model']} {r['weights']} graphs {r['graphs']} {r['device']}" + (" (CPU plumbing check)" if dry else ""),
        result, target, status)

spec = load("spec.json")
for r in spec["rows"] if spec else []:
    result = f"{r['decode_tok_s']:.1f} tok/s"
    if r.get("speedup"):
        result += f", {r['speedup']:.2f}x off"
    if r.get("acceptance_rate") is not None:
        result += f", accept {r['acceptance_rate']:.2f}, {r['tokens_per_target_forward']:.2f} tok/forward"
    if r.get("target_mbu_pct") is not None:
        result += f", target MBU {r['target_mbu_pct']:.0f}%"
    add(f"spec {r['drafter']} ({r['quant']})" + (" (CPU plumbing check)" if dry else ""), result)

sweep = load("sweep.json")
for r in sweep["rows"] if sweep else []:
    add(f"sweep {r['mode']} N={r['concurrency']}" + (" (CPU plumbing check)" if dry else ""),
        f"{r['output_tok_s']:.1f} tok/s total, {r['tok_s_per_user']:.1f} tok/s/user, TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, "
        f"TBT p50 {r['tbt_p50_s'] * 1000:.1f} ms")

print()
print(table(rows, [("check", "check", ""), ("result", "result", ""), ("target", "target", ""), ("status", "status", "")]))
print(f"JSON: {write_json(out / 'gpu_summary.json', 'gpu', rows, dry_run=dry)}")
# Targets missed are measurements, not failures; a failed step, test or comparison is.
sys.exit(1 if any(r["status"] in ("FAIL", "MISMATCH") or r["status"].startswith(("failed", "timed out")) for r in rows) else 0)
EOF
