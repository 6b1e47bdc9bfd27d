#!/usr/bin/env bash
# The prepared GPU check: run on a machine with one CUDA GPU, from the repository root.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Runs, in this order, each step's output into OUTDIR: the machine's facts (nvidia-smi, torch),
# the cuda-marked tests (`pytest -m cuda`), and `svdadapt bench --quick` of the layer, model and
# generate suites in bf16 on the GPU, with the compile suite. Stops itself after GPU_CHECK_SECONDS
# (default 540: 9 minutes), keeping what finished. Needs torch with CUDA and the project's
# dependencies already installed (it installs nothing: a GPU machine may have no network).
# Exit status: 0 all steps passed, 1 a step failed (see OUTDIR/summary.txt), 2 bad arguments,
# 3 no usable CUDA GPU, 124 the time ran out.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR   (OUTDIR: a new or empty directory for the results)" >&2; }
if [[ $# -ne 1 || -z "$1" || "$1" == -* ]]; then
    usage
    exit 2
fi
out=$1
if [[ -e "$out" && ! -d "$out" ]]; then
    echo "gpu_check: OUTDIR $out exists and is not a directory; name a new or empty directory" >&2
    exit 2
fi
if [[ -d "$out" && -n "$(ls -A "$out")" ]]; then
    echo "gpu_check: OUTDIR $out is not empty; name a new or empty directory (nothing is overwritten)" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
py=${PYTHON:-python}
budget=${GPU_CHECK_SECONDS:-540}
if ! [[ "$budget" =~ ^[0-9]+$ ]] || (( budget < 60 )); then
    echo "gpu_check: GPU_CHECK_SECONDS=$budget must be a whole number of seconds, at least 60" >&2
    exit 2
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$out/torch.err"; then
    echo "gpu_check: no usable CUDA GPU for $py (torch.cuda.is_available() is False or torch is missing; see $out/torch.err)" >&2
    exit 3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
deadline=$((SECONDS + budget))
status=0
: > "$out/summary.txt"

step() {  # step NAME COMMAND...: run with what is left of the budget, log to OUTDIR/NAME.log
    local name=$1 left=$((deadline - SECONDS)) rc
    shift
    if (( left <= 5 )); then
        echo "$name: not run (time budget spent)" | tee -a "$out/summary.txt"
        status=124
        return
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$left" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    if (( rc == 124 || rc == 137 )); then status=124; elif (( rc != 0 && status == 0 )); then status=1; fi
}

step machine bash -c "nvidia-smi || true; $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step tests "$py" -m pytest -q -m cuda tests/test_cuda.py
step bench "$py" -m svdadapt bench --quick --suite layer,model,generate --compile --dtype bf16,fp32 --device cuda \
    --output "$out/bench.json" --markdown "$out/bench.md"
echo "gpu_check: results in $out (summary.txt, *.log, bench.md); exit $status"
exit $status
