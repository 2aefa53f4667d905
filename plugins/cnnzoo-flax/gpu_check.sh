#!/usr/bin/env bash
# The Flax backend's GPU check, one prepared command for a GPU machine with cnnzoo and this
# plugin installed (run from cnnzoo's root): plugins/cnnzoo-flax/gpu_check.sh OUT_DIR
#   1. the default job with hardware=gpu (bf16-mixed) and hardware=auto (float32): val_acc,
#      the device, the ONNX file of the GPU-trained model verified on the CPU;
#   2. resume: a deterministic run killed (SIGKILL) once its first epoch's checkpoint is
#      written, then run again, ends with the uninterrupted run's weights_sha256;
#   3. python -m bench on the GPU: LeNet-5 and ResNet-50 (224x224, batches of 128, bf16)
#      through the product next to the plugin's hand-written jitted loop.
# Exit 1 when a check fails; every result stays in OUT_DIR. (GPU_CHECK_HARDWARE=cpu and
# GPU_CHECK_BENCH=0 rehearse steps 1-2 on a machine without a GPU.)
set -uo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
failed=0

python -c "import jax, flax, optax, numpy; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'numpy', numpy.__version__); print(jax.devices())"

field() {  # field RUN_DIR EXPRESSION: a value of the run's results.json
    python -c "import json,sys; r=json.load(open(sys.argv[1]+'/results.json')); v=($2)
print(*v) if isinstance(v, tuple) else print(v)" "$1"
}

hardware="${GPU_CHECK_HARDWARE:-gpu}"
for hw in "$hardware" auto; do
    dir="$out/default-$hw"
    start=$(date +%s.%N)
    python run.py backend=flax "hardware=$hw" "hydra.run.dir=$dir" > "$dir.log" 2>&1
    rc=$?
    wall=$(python -c "import time; print(round(time.time() - $start, 1))")
    if [ $rc -ne 0 ]; then echo "default job hardware=$hw: FAILED (exit $rc)"; tail -5 "$dir.log"; failed=1; continue; fi
    echo "default job hardware=$hw: $(field "$dir" "r['hardware']['device'], r['hardware']['precision'], 'val_acc', r['metrics']['val_acc'], 'images/s', r['timings']['images_per_s'], 'onnx passed', r['export']['passed'], 'max abs diff', r['export']['max_abs_diff']"), wall ${wall} s"
    [ "$(field "$dir" "r['export']['passed'] and r['metrics']['val_acc'] >= 0.95")" = True ] || failed=1
done

# resume after SIGKILL, deterministic kernels
args=(backend=flax "hardware=$hardware" trainer.max_epochs=3 trainer.deterministic=true export.enabled=false)
python run.py "${args[@]}" "hydra.run.dir=$out/resume-whole" > "$out/resume-whole.log" 2>&1
python run.py "${args[@]}" "hydra.run.dir=$out/resume-cut" > "$out/resume-cut.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null && [ ! -e "$out/resume-cut/checkpoints/epoch-0001" ]; do sleep 0.05; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
ls "$out/resume-cut/checkpoints"
python run.py "${args[@]}" "hydra.run.dir=$out/resume-cut" >> "$out/resume-cut.log" 2>&1
a=$(field "$out/resume-whole" "r['weights_sha256']")
b=$(field "$out/resume-cut" "r['weights_sha256'], r.get('resumed_from_epoch')")
echo "resume: uninterrupted ${a:0:12}, killed and re-run ${b:0:12} (resumed from epoch ${b#* })"
[ "${a}" = "${b%% *}" ] || { echo "resume: FAILED"; failed=1; }

# throughput next to the hand-written loop
[ "${GPU_CHECK_BENCH:-1}" = 1 ] || exit $failed
python -m bench --parts training --archs lenet5 --backends flax --hardware gpu --variants none \
    --out "$out/bench-lenet5" 2>&1 | grep -E "GAP|PASS|failed|wrote"
python -m bench --parts training --archs resnet50 --backends flax --hardware gpu --variants none \
    --batch-sizes 128 --steps 16 --out "$out/bench-resnet50" 2>&1 | grep -E "GAP|PASS|failed|wrote"
grep -h "flax" "$out"/bench-*/results.md | grep -E "^\| (lenet5|resnet50) "
exit $failed
