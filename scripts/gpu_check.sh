#!/usr/bin/env bash
# The GPU check of issue 24: on a fresh CUDA machine, from a clone, run as is:
#
#     bash scripts/gpu_check.sh
#
# 1. creates a virtual environment (.venv-gpu, ignored by git) and installs the project into it, without
#    constraints.txt (that file pins the CPU build of torch; here pip takes the CUDA build), plus pyautoattack,
#    whose pretrained CIFAR-10 ResNet-18 (examples/resnet.py, model_test.pt) is the audited model;
# 2. times the `standard` suite on the shared CIFAR-10 images (../shared/data/cifar10-test-1000.npz beside the
#    clone): 744 audited inputs and 256 clean reference inputs, the 1000 images, all default detectors;
# 3. times the default audit (the embedded MNIST CNN, default suite, 256 inputs);
# both with `advdetect bench --audit --device cuda` (no attack cache, so every attack runs), which prints each
# stage's and detector's seconds and each attack cell's passes, seconds and floor ratio; the JSON reports go
# to reports/gpu-check/ (ignored by git), beside each run's wall-clock seconds.
#
# Environment: DATA (the npz file), VENV (an environment that already has the project: nothing is installed
# then), BATCH_SIZE (--batch-size of both audits; default the audit's own, 128), OUT (the reports' folder).
set -euo pipefail

cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-test-1000.npz}
OUT=${OUT:-reports/gpu-check}
BATCH=()
if [[ -n "${BATCH_SIZE:-}" ]]; then BATCH=(--batch-size "$BATCH_SIZE"); fi
[[ -f "$DATA" ]] || { echo "gpu_check: no CIFAR-10 images at $DATA; set DATA=FILE.npz" >&2; exit 2; }

if [[ -z "${VENV:-}" ]]; then
    VENV=.venv-gpu
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e . pyautoattack
fi
PY="$VENV/bin/python"
"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.get_num_threads()} CPU threads", flush=True)
EOF
RA="$("$PY" -c 'import os, pyautoattack; print(os.path.dirname(pyautoattack.__file__))')/examples"
mkdir -p "$OUT"

# bench NAME ARGS...: one `bench --audit` on CUDA; its report as JSON into $OUT/NAME.json, and as text here
bench() {
    local name=$1; shift
    echo; echo "== $name: advdetect bench --audit $* --device cuda ${BATCH[*]+${BATCH[*]}}"
    local start=$SECONDS
    "$VENV/bin/advdetect" -q bench --audit "$@" --device cuda ${BATCH[@]+"${BATCH[@]}"} --json > "$OUT/$name.json"
    "$PY" -c 'import json, sys; from advdetect.cli.scaling import format_report
print(format_report(json.load(open(sys.argv[1]))))' "$OUT/$name.json"
    echo "$name: $((SECONDS - start)) s wall clock, with loading and the pass-cost measurement"
}

bench standard-cifar10 standard --model "$RA/resnet.py:ResNet18" --weights "$RA/model_test.pt" \
    --data "npz:$DATA" --sizes 744 --n-reference 256
bench default default --sizes 256
echo; echo "reports: $OUT/standard-cifar10.json, $OUT/default.json"
