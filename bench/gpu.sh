#!/usr/bin/env bash
# The GPU checks, in one go (about 6 minutes on one NVIDIA H200; each stage is time-limited):
#   1. the CUDA tests (tests/test_cuda.py, and the CUDA cases of the batched and warm spectral tests) and the
#      NCCL cases of the DDP hook's tests (tests/test_ddp.py);
#   2. bench/codecs.py on the GPU (ResNet-18, batch 128: encode/decode times against the backward pass);
#   3. bench/warm.py on the GPU (ResNet-18, batch 128): svd s=3 exact against the warm basis (r = 16, 32, 64,
#      n/8) at equal expected bytes, and PowerSGD on the same gradients, each encode against the backward pass
#      (the targets: spectral encode <= 0.3x of the backward);
#   4. bench/syncs.py on the GPU: host syncs and encode time of the batched path against the per-layer one;
#   5. a short DDP training run with NCCL (examples/ddp_train.py under torchrun, one process per GPU, at most 2).
# Then a summary: each stage passed or failed, with its key figures. Logs and results go to $OUT
# (default bench/results/gpu). Run from anywhere: bash bench/gpu.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to torch: nothing to check" >&2
    exit 2
fi
GPU="$(python -c 'import torch; print(torch.cuda.get_device_name(0))')"
GPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
RANKS=$((GPUS < 2 ? GPUS : 2))
echo "$GPUS x $GPU, torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')"

declare -A STATUS
stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, its output to $OUT/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo; echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    STATUS[$name]="$([ "$rc" -eq 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
}

stage tests 240 python -m pytest tests/test_cuda.py tests/test_ddp.py tests/test_batched_probabilities.py \
    tests/test_warm_spectral.py -k "cuda or nccl" -q -rs -p no:cacheprovider
stage codecs 180 python bench/codecs.py --device cuda --models resnet18 --batch 128 --repeats 5 --samples 3 \
    --out "$OUT/codecs.json"
stage warm 150 python bench/warm.py --device cuda --batch 128 --repeats 5 --samples 0 --out "$OUT/warm.json"
stage syncs 90 python bench/syncs.py --device cuda --batch 128 --repeats 5
stage ddp 90 torchrun --nproc_per_node "$RANKS" examples/ddp_train.py --codec svd --budget 3 --steps 300

echo; echo "== summary: $GPUS x $GPU"
for name in tests codecs warm syncs ddp; do
    printf '%-7s %s\n' "$name" "${STATUS[$name]}"
done
echo "tests:  $(tail -n 1 "$OUT/tests.log")"
grep -E "^(resnet18|codec |svd rows s=3 |qsgd 4 bits)" "$OUT/codecs.log" | sed 's/^/codecs: /'
grep -E "^(resnet18|exact s=3|warm r=|powersgd r=)" "$OUT/warm.log" | sed 's/^/warm:   /'
grep -E "^(svd s=3|entrywise|fourier)" "$OUT/syncs.log" | sed 's/^/syncs:  /'
grep -E "^test accuracy|^bytes sent" "$OUT/ddp.log" | sed "s/^/ddp ($RANKS ranks, NCCL): /"
for name in tests codecs warm syncs ddp; do
    [[ "${STATUS[$name]}" == passed* ]] || exit 1
done
