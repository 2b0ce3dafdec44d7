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
# The 8 minutes hold by construction: each configuration is its own process
# under `timeout` with its share of a 470 s budget (and never more than what is
# left of it; 5 s more to kill one that ignores the signal, the device query
# at most 30 s of the budget); one that runs out prints "(stopped: its N s share of the budget)"
# and the next one runs. Every line says how long it took, the last line the
# total. Each configuration being its own process, every peak-memory figure is
# its own. A configuration that fails (e.g. out of memory) prints its error and
# the next one runs; the exit status is that of the last failure (0 when none
# failed).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
BUDGET=${GPU_CHECK_BUDGET_S:-470}
start=$SECONDS
status=0
# run SHARE_S ARGS...: one configuration, at most SHARE_S seconds (and at most
# what is left of the budget).
run() {
  local share=$1; shift
  local left=$(( BUDGET - (SECONDS - start) ))
  (( share > left )) && share=$left
  echo "== $*"
  if (( share < 5 )); then
    echo "(skipped: ${left} s of the ${BUDGET} s budget left)"; status=124; return
  fi
  local out rc t0=$SECONDS
  out=$(timeout --kill-after=5 "$share" "$PY" "$@" 2>&1); rc=$?
  printf '%s\n' "$out" | grep -v -e "^WARNING" -e "^W0000" -e "^I0000"
  if (( rc == 124 || rc == 137 )); then
    echo "(stopped: its ${share} s share of the budget)"; status=$rc
  elif (( rc != 0 )); then
    echo "(exit status $rc)"; status=$rc
  fi
  echo "   [$(( SECONDS - t0 )) s]"
}
timeout 30 "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ "${1:-}" = "--quick" ]; then
  run 120 benchmarks/train_step.py --model reference --batch 8 --new_tokens 8 --steps 1
  run 120 benchmarks/train_step.py --model gpt2-small --batch 2 --new_tokens 4 --steps 1 --lora 16
  run 120 benchmarks/train_step.py --model qwen2.5-0.5b --layers 1 --batch 2 --new_tokens 4 --steps 1 --dtype bfloat16
  run 120 benchmarks/decode.py --models gpt2 --lengths 8,64 --batch 4 --repeats 1
else
  run 50 benchmarks/train_step.py --model reference --steps 5
  for lora in 0 16; do
    run 70 benchmarks/train_step.py --model gpt2-small --dtype bfloat16 --steps 5 --lora $lora
    run 100 benchmarks/train_step.py --model qwen2.5-0.5b --dtype bfloat16 --steps 3 --lora $lora
  done
  run 80 benchmarks/decode.py --batch 16 --repeats 3
fi
echo "total: $(( SECONDS - start )) s (budget ${BUDGET} s)"
exit $status
