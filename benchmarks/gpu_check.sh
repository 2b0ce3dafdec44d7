#!/usr/bin/env bash
# One-GPU check of the train-step presets (benchmarks/train_step.py) and the
# decode-time ratio (benchmarks/decode.py), in under 8 minutes on one GPU:
# tokens/s of sampling and of the update, MFU against a matmul roofline measured
# in the same process (printed beside it), and peak device memory, for GPT-2
# small and the full 24-layer Qwen2.5-0.5B shape in bfloat16, LoRA rank 16 and
# full fine-tuning; the reference config in float32 for comparison with the CPU
# figures of the README.
#
#   bash benchmarks/gpu_check.sh           # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --quick   # a tiny version of every line (CPU
#                                          # too): proves the script runs
#
# Each configuration is its own process, so every peak-memory figure is its own.
# A configuration that fails (e.g. out of memory) prints its error and the next
# one runs; the exit status is that of the last failure (0 when none failed).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
status=0
run() {
  echo "== $*"
  local out rc
  out=$("$PY" "$@" 2>&1); rc=$?
  printf '%s\n' "$out" | grep -v -e "^WARNING" -e "^W0000" -e "^I0000"
  [ "$rc" -eq 0 ] || { echo "(exit status $rc)"; status=$rc; }
}
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ "${1:-}" = "--quick" ]; then
  run benchmarks/train_step.py --model reference --batch 8 --new_tokens 8 --steps 1
  run benchmarks/train_step.py --model gpt2-small --batch 2 --new_tokens 4 --steps 1 --lora 16
  run benchmarks/train_step.py --model qwen2.5-0.5b --layers 1 --batch 2 --new_tokens 4 --steps 1 --dtype bfloat16
  run benchmarks/decode.py --models gpt2 --lengths 8,64 --batch 4 --repeats 1
else
  run benchmarks/train_step.py --model reference --steps 5
  for lora in 0 16; do
    run benchmarks/train_step.py --model gpt2-small --dtype bfloat16 --steps 5 --lora $lora
    run benchmarks/train_step.py --model qwen2.5-0.5b --dtype bfloat16 --steps 3 --lora $lora
  done
  run benchmarks/decode.py --batch 16 --repeats 3
fi
exit $status
