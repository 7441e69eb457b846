#!/usr/bin/env bash
# One prepared run for a lent NVIDIA GPU: every CUDA check of the project in one command.
#
#   bash benchmarks/device_check.sh            # from the repository root, on the GPU machine
#
# 1. the host-sync check of whole training steps (phase 1 and 2; the default recipe and every
#    registered method), fp32 and bf16 — exits non-zero on the first step that synchronises;
# 2. the speed benchmark on CUDA, fp32 and bf16 (tables written to $OUT or benchmarks/results/);
# 3. the main job on CUDA for a short budget (3 epochs, one of warm-up), fp32 and bf16.
# Each part logs to $OUT/device_<part>.log and the script prints a one-line summary per part, so
# one failing part does not hide the others. Run time on an H100/H200: a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
status=0

run() {  # run NAME CMD...: log to $OUT/device_NAME.log, print PASS/FAIL and the last line
  local name="$1"; shift
  local t0=$SECONDS
  if "$@" >"$OUT/device_${name}.log" 2>&1; then
    echo "PASS ${name} ($((SECONDS - t0)) s): $(tail -n 1 "$OUT/device_${name}.log")"
  else
    status=1
    echo "FAIL ${name} ($((SECONDS - t0)) s): $(tail -n 3 "$OUT/device_${name}.log" | tr '\n' ' ')"
  fi
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))" || exit 2

METHODS="$(python -c 'from examples.pase.step import METHODS; print(",".join(sorted(METHODS)))')"
run sync_fp32 python -m benchmarks.cuda_sync_check --device cuda
run sync_bf16 python -m benchmarks.cuda_sync_check --device cuda --amp bf16
for method in ${METHODS//,/ }; do  # one at a time: some methods cannot be combined
  run "sync_${method}" python -m benchmarks.cuda_sync_check --device cuda --methods "$method"
done
run speed_fp32 python -m benchmarks.speed --device cuda --out "$OUT"
run speed_bf16 python -m benchmarks.speed --device cuda --amp bf16 --out "$OUT"
run main_fp32 python examples/pase_mosi.py --device cuda --epochs 3 --switch-epoch 1 \
  --out "$OUT/device_main_fp32" --overwrite
run main_bf16 python examples/pase_mosi.py --device cuda --amp bf16 --epochs 3 --switch-epoch 1 \
  --out "$OUT/device_main_bf16" --overwrite
exit $status
