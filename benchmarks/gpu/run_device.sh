# Device-side driver for the GPU tests and benchmarks; `source`d by the `run` calls in README.md.
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh megatron   # call 1: carries $PARTS/c1, .whl
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh vllm       # call 2: carries $PARTS/c2, .whl
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh sync       # call 3: same carry, same warm machine
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh rollout    # call 4: same carry, same warm machine
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh toy        # 10-step GRPO and PPO toy runs (same carry)
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh grpo       # one GRPO step's breakdown, 1.5B (same carry)
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh multi      # 2-GPU layout matrix (nvidia-h200-x2; same carry)
#   PARTS=.gpuparts PERF2="dp" source benchmarks/gpu/run_device.sh perf2  # 2-GPU benchmarks: dp, tp, rollout (same carry)
# Logs and JSON land in $OUT (brought back by the tool). Each step has its own time limit so
# that one hang cannot eat the call's 600 s.
_phase=${1:-}
mkdir -p "${OUT:=/tmp/out}"
case "$_phase" in
megatron)
  source benchmarks/gpu/setup.sh device1 || return 1
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
  python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name())"
  timeout 200 python3 -m pytest tests/test_gpu.py -q -s -p no:cacheprovider -k "${MEGATRON_TESTS:-logits or export or converter or chunked}" \
    2>&1 | tee "$OUT/pytest_megatron.log" | grep -E "gpu-test|passed|failed|Error|error" | cut -c1-600
  timeout 300 python3 benchmarks/train_step.py ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step.log" | grep -v -i warn | tail -12
  ;;
vllm)
  source benchmarks/gpu/setup.sh device2 || return 1
  timeout 500 python3 -m pytest tests/test_gpu.py -q -s -p no:cacheprovider \
    -k "${VLLM_TESTS:-(live_sync or fast_path or resharder_auto or sleep or logprob) and not chunked}" \
    2>&1 | tee "$OUT/pytest_vllm.log" | grep -E "gpu-test|passed|failed|Error |error:|assert" | cut -c1-700
  ;;
sync)
  source benchmarks/gpu/setup.sh device2 || return 1
  timeout 560 python3 benchmarks/sync.py ${SYNC_ARGS:-} 2>&1 | tee "$OUT/sync.log" | grep -v -i "warn\|INFO" | tail -16
  ;;
rollout)
  source benchmarks/gpu/setup.sh device2 || return 1
  timeout 560 python3 benchmarks/rollout.py ${ROLLOUT_ARGS:-} 2>&1 | tee "$OUT/rollout.log" | grep -v -i "warn\|INFO" | tail -14
  ;;
toy)
  source benchmarks/gpu/setup.sh device2 || return 1
  timeout 560 python3 -m pytest tests/test_gpu.py -q -s -p no:cacheprovider -k toy \
    2>&1 | tee "$OUT/pytest_toy.log" | grep -E "gpu-test|passed|failed|Error |error:|assert" | cut -c1-1500
  ;;
grpo)
  source benchmarks/gpu/setup.sh device2 || return 1
  timeout 560 python3 benchmarks/grpo_step.py ${GRPO_ARGS:-} 2>&1 | tee "$OUT/grpo_step.log" | grep -v -i "warn\|INFO" | tail -24
  ;;
multi)
  # The layout matrix (benchmarks/multi_gpu.py): every run is its own torchrun under its own limit;
  # the driver stops starting runs when its budget is spent (what is left of 560 s after setup)
  # and writes $OUT/multi_gpu.json after every run, its logs to $OUT/multi_gpu_logs/.
  _mr_t0=$(date +%s)
  source benchmarks/gpu/setup.sh device2 || return 1
  _mr_budget=$(( ${MULTI_BUDGET:-560} - ($(date +%s) - _mr_t0) ))
  echo "multi: driver budget ${_mr_budget}s; MULTI_ARGS=${MULTI_ARGS:-}"
  timeout -s TERM $(( _mr_budget + 12 )) python3 benchmarks/multi_gpu.py --budget-s "$_mr_budget" \
    --out "$OUT/multi_gpu.json" ${MULTI_ARGS:-} 2>&1 | tee "$OUT/multi_gpu.log" | cut -c1-400 | tail -90
  ;;
perf2)
  # The 2-GPU benchmarks, each under its own limit (a 600 s call holds about two of them):
  #   dp: 1.5B GRPO step on GPU 0 alone, then at DP=2 with twice the prompts (same work per GPU)
  #   tp: 7B GRPO step at TP=2, rollout TP=2 (train MFU; sync against the copy floor of per-rank bytes)
  #   rollout: generation tokens/s at rollout TP=2, our engine vs standalone vLLM (two runs, --compare)
  source benchmarks/gpu/setup.sh device2 || return 1
  for _p2 in ${PERF2:-dp}; do
    _p2_t0=$(date +%s)
    case "$_p2" in
    dp)
      # both under torchrun (same launcher and environment, e.g. its OMP_NUM_THREADS=1)
      CUDA_VISIBLE_DEVICES=0 timeout 240 torchrun --nproc_per_node=1 benchmarks/grpo_step.py --out "$OUT" --name grpo_step_1gpu \
        2>&1 | tee "$OUT/grpo_step_1gpu.log" | grep -v -i "warn\|INFO" | tail -8
      timeout 300 torchrun --nproc_per_node=2 benchmarks/grpo_step.py --prompts 64 --mini 32 --out "$OUT" \
        --name grpo_step_dp2 2>&1 | tee "$OUT/grpo_step_dp2.log" | grep -v -i "warn\|INFO" | tail -8 ;;
    tp)
      timeout 420 torchrun --nproc_per_node=2 benchmarks/grpo_step.py --size 7B --prompts 16 --mini 8 --micro 8 \
        --out "$OUT" --name grpo_step_7b_tp2 actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2 \
        actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
        2>&1 | tee "$OUT/grpo_step_7b_tp2.log" | grep -v -i "warn\|INFO" | tail -10 ;;
    rollout)
      for _e in wrapper standalone; do
        timeout 200 torchrun --nproc_per_node=2 benchmarks/rollout.py --tp 2 --engines $_e --out "$OUT" \
          --name rollout_tp2_$_e 2>&1 | tee "$OUT/rollout_tp2_$_e.log" | grep -v -i "warn\|INFO" | tail -5
      done
      python3 benchmarks/rollout.py --compare "$OUT/rollout_tp2_wrapper.json" "$OUT/rollout_tp2_standalone.json" \
        2>&1 | tee "$OUT/rollout_tp2_compare.txt" ;;
    *) echo "perf2: unknown part $_p2 (dp, tp, rollout)" >&2 ;;
    esac
    echo "perf2 $_p2: $(( $(date +%s) - _p2_t0 )) s"
  done
  ;;
*)
  echo "usage: source benchmarks/gpu/run_device.sh megatron|vllm|sync|rollout|toy|grpo|multi|perf2" >&2; return 2 ;;
esac
