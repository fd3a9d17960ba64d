#!/usr/bin/env bash
# Exercise xbench's GPU paths on one CUDA device and print one summary table
# (docs/device-check.md): the GPU tests, `xbench run --device cuda` for every dtype x engine
# against a CPU fp32 reference made here, Stopwatch on an asynchronous kernel, a 2-process
# torchrun run against the single-process rows, and throughput / Score-CAM / RISE costs.
#
#   bash benchmarks/device_check.sh                         # on a machine with a CUDA GPU
#   DEVICE_CHECK_DEVICE=cpu bash benchmarks/device_check.sh # dry run of the same pipeline on CPU
#
# Python: the active interpreter ($PYTHON, else python3) when `import xbench` already resolves
# to this working tree; otherwise a fresh venv (--system-site-packages, so it sees the
# machine's CUDA torch) into which this tree is installed with --no-deps --no-index: nothing is
# downloaded, and torch==2.14.1/torchvision==0.29.1 and xbench's dependencies must already be
# installed. The model and images are the embedded ones (--data sample).
#
# Settings (environment): DEVICE_CHECK_DEVICE (cuda), DEVICE_CHECK_MODEL (efficientnet-lite0;
# digits-vgg in the CPU dry run), DEVICE_CHECK_ENGINES (eager compiled;
# onnxruntime runs on CPU only, xbench/engine.py), DEVICE_CHECK_DTYPES (fp32 bf16 fp16),
# DEVICE_CHECK_WORK (logs, runs, summary.md; default $OUT/device_check, else /tmp/...).
# Exit status: 0 when every check passed, 1 otherwise (the failed steps are listed last).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd -P)

DEVICE=${DEVICE_CHECK_DEVICE:-cuda}
WORK=${DEVICE_CHECK_WORK:-${OUT:-${TMPDIR:-/tmp}}/device_check}
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/throughput" || exit 1
: >"$WORK/checks.txt"

if [[ $DEVICE == cpu ]]; then
    # dry run: the same steps, small enough for a loaded 2-core CPU (tests/test_device_check.py
    # runs it): the shipped 32-px digits model, fp32 (CPU autocast is emulated and slow), eager
    MODEL=${DEVICE_CHECK_MODEL:-digits-vgg}
    DTYPES=${DEVICE_CHECK_DTYPES:-fp32}
    ENGINES=${DEVICE_CHECK_ENGINES:-eager}
    LIMIT=(--limit 1)
    SCORECAM=(-o scorecam.max_channels=8)
    OPTIONS=("${SCORECAM[@]}" -o rise.n_masks=16 -o insertion.step=256 -o deletion.step=256)
    EAGER_BATCHES=1,16
    COMPILED_BATCHES=16
    TORCHRUN_LIMIT=2
else
    MODEL=${DEVICE_CHECK_MODEL:-efficientnet-lite0}
    DTYPES=${DEVICE_CHECK_DTYPES:-fp32 bf16 fp16}
    ENGINES=${DEVICE_CHECK_ENGINES:-eager compiled}
    LIMIT=()  # the 6 embedded images
    SCORECAM=()
    OPTIONS=()  # the quick profile's Score-CAM channels and RISE masks
    TORCHRUN_LIMIT=4
    EAGER_BATCHES=16,32,64,128,256
    # one batch, the one Score-CAM/RISE use on GPU (masked_batch_size): each is a compile
    COMPILED_BATCHES=64
fi

# -- Python ----------------------------------------------------------------------------------
PY=${PYTHON:-python3}
if ! "$PY" - "$REPO" <<'EOF' 2>/dev/null
import pathlib, sys, xbench
sys.exit(pathlib.Path(xbench.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]))
EOF
then
    VENV=${TMPDIR:-/tmp}/xbench-device-check-venv
    echo "== installing this working tree into $VENV (no downloads)"
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages "$VENV" &&
        "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        >"$WORK/logs/install.log" 2>&1 || {
        echo "FAIL install: see $WORK/logs/install.log (needs setuptools in $PY)"; exit 1; }
    PY=$VENV/bin/python
fi
"$PY" -c 'import torch, torchvision, xbench, xbench_plugins, pytest' || {
    echo "FAIL python: $PY lacks torch, torchvision, pytest or xbench's dependencies; install" \
         "them first: pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[test]'"
    exit 1; }
CHECK=("$PY" benchmarks/device_check.py)

FAILED=()
# step NAME CMD...: run CMD with its output in logs/NAME.log; a failure is listed at the end
step() {
    local name=$1; shift
    local start=$SECONDS
    if "$@" >"$WORK/logs/$name.log" 2>&1; then
        echo "ok   $name ($((SECONDS - start)) s)"
        return 0
    fi
    echo "FAIL $name ($((SECONDS - start)) s, log $WORK/logs/$name.log):"
    tail -n 15 "$WORK/logs/$name.log" | sed 's/^/     /'
    FAILED+=("$name")
    return 1
}
# check NAME CMD...: a step whose output (its verdict lines) is always shown
check() {
    local name=$1
    step "$@"
    grep -E '^(ok|FAIL) ' "$WORK/logs/$name.log" | sed 's/^/     /'
}

echo "== device check on $DEVICE in $WORK"
step env "${CHECK[@]}" env --device "$DEVICE" || { cat "$WORK/logs/env.log"; exit 1; }
cat "$WORK/logs/env.log"

# -- tests with CUDA branches (tests marked gpu; they skip without CUDA) ---------------------
step gpu-tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_paths.py \
    tests/test_device_check.py
tail -n 1 "$WORK/logs/gpu-tests.log" | sed 's/^/     /'

# -- Stopwatch on a deliberately asynchronous kernel -----------------------------------------
check timing "${CHECK[@]}" timing --device "$DEVICE"
grep '^timing' "$WORK/logs/timing.log" | sed 's/^/     /'

# -- scores on the device against a CPU fp32 reference ---------------------------------------
RUN=(run --model "$MODEL" --data sample "${LIMIT[@]+"${LIMIT[@]}"}" --explainers gradcam,scorecam,rise
     --metrics average-drop,insertion,deletion,forward-passes,backward-passes,time
     --no-leaderboard --no-maps --overwrite --output "$WORK/runs"
     "${OPTIONS[@]+"${OPTIONS[@]}"}")
step cpu-reference "$PY" -m xbench "${RUN[@]}" --device cpu --engine eager --dtype fp32 \
    --name cpu-reference
THROUGHPUT=()
for dtype in $DTYPES; do
    # fp32 means fp32: cuDNN would otherwise run convolutions in TF32 on Ampere and later
    tf32=(); [[ $dtype == fp32 ]] && tf32=(NVIDIA_TF32_OVERRIDE=0)
    for engine in $ENGINES; do
        name=$engine-$dtype
        batches=$EAGER_BATCHES; [[ $engine == compiled ]] && batches=$COMPILED_BATCHES
        step "throughput-$name" env "${tf32[@]+"${tf32[@]}"}" "${CHECK[@]}" throughput \
            --model "$MODEL" --device "$DEVICE" --engine "$engine" --dtype "$dtype" \
            --batches "$batches" \
            --output "$WORK/throughput/$name.json" &&
            THROUGHPUT+=("$WORK/throughput/$name.json") &&
            grep '^throughput' "$WORK/logs/throughput-$name.log" | sed 's/^/     /'
        step "run-$name" env "${tf32[@]+"${tf32[@]}"}" "$PY" -m xbench "${RUN[@]}" \
            --device "$DEVICE" --engine "$engine" --dtype "$dtype" --name "$name"
        outcome="not run"
        if [[ -f $WORK/runs/cpu-reference/rows.jsonl && -f $WORK/runs/$name/rows.jsonl ]]; then
            if check "compare-$name" "${CHECK[@]}" compare "$WORK/runs/cpu-reference" \
                "$WORK/runs/$name" --dtype "$dtype"; then outcome=ok; else outcome=FAIL; fi
        fi
        echo "$name $outcome" >>"$WORK/checks.txt"
    done
done

# -- 2 processes by torchrun on one device against the single-process rows -------------------
SHARDED=(run --model "$MODEL" --data sample --limit "$TORCHRUN_LIMIT" --explainers gradcam,scorecam
         --metrics average-drop,deletion,forward-passes --batch-size 1 --no-leaderboard
         --no-maps --overwrite --output "$WORK/runs" --device "$DEVICE" --engine eager
         "${SCORECAM[@]+"${SCORECAM[@]}"}")
# torchrun gives each worker one thread; the single process gets the same for its reductions
export OMP_NUM_THREADS=1
step single-process "$PY" -m xbench "${SHARDED[@]}" --name single-process &&
    step torchrun "$PY" -m torch.distributed.run --nproc-per-node 2 \
        --master-port $((29500 + $$ % 1000)) -m xbench "${SHARDED[@]}" --name torchrun &&
    check torchrun-rows "${CHECK[@]}" same "$WORK/runs/single-process" "$WORK/runs/torchrun"
unset OMP_NUM_THREADS

# -- the table -------------------------------------------------------------------------------
if ((${#THROUGHPUT[@]})); then
    step summary "${CHECK[@]}" summary --runs "$WORK/runs" --checks "$WORK/checks.txt" \
        --title "(forwards/s at the best batch; s/img and \
x the forward-pass bound from the embedded-sample runs; scores vs CPU fp32)" \
        "${THROUGHPUT[@]}" && cp "$WORK/logs/summary.log" "$WORK/summary.md" &&
        { echo; cat "$WORK/summary.md"; echo; }
fi

if ((${#FAILED[@]})); then
    echo "device check FAILED: ${FAILED[*]} (logs in $WORK/logs)"
    exit 1
fi
echo "device check passed (logs in $WORK/logs)"
