# Device-side driver for the GPU tests and benchmarks; `source`d by the `run` calls in README.md.
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh megatron   # call 1: carries $PARTS/c1, .whl
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh vllm       # call 2: carries $PARTS/c2, .whl
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh sync       # call 3: same carry, same warm machine
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh rollout    # call 4: same carry, same warm machine
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh toy        # 10-step GRPO and PPO toy runs (same carry)
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh grpo       # one GRPO step's breakdown, 1.5B (same carry)
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh multi      # 2-GPU layout matrix (nvidia-h200-x2; same carry)
#   PARTS=.gpuparts PERF2="dp" source benchmarks/gpu/run_device.sh perf2  # 2-GPU benchmarks: dp, tp, rollout (same carry)
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh packing    # packed micro-batches: kernels, toy, 4096/8192 (2 GPUs)
#   PARTS=.gpuparts source benchmarks/gpu/run_device.sh split      # split placement, 1 training + 1 rollout GPU, staleness 0 and 1
#   source benchmarks/gpu/run_device.sh lora                       # LoRA vs full: memory of a 7B step at TP=2 (carry .whl only)
#   PARTS=.gpuparts LORA_RUNS="1.5B:1 7B:2" source benchmarks/gpu/run_device.sh lorarollout  # LoRA rollout: merged vs adapter
# Logs and JSON land in $OUT (brought back by the tool). Each step has its own time limit so
# that one hang cannot eat the call's 600 s. pytest runs with `-o addopts=`: pyproject's `-n 2`
# (pytest-xdist, not on the device) is for the CPU suite, and `-s` shows the gpu-test lines.
_phase=${1:-}
_t_call=$(date +%s)  # the call's start: a step given "what is left" stops before the call's 600 s
mkdir -p "${OUT:=/tmp/out}"
case "$_phase" in
megatron)
  source benchmarks/gpu/setup.sh device1 || return 1
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
  python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name())"
  timeout 200 python3 -m pytest -o addopts= tests/test_gpu.py -q -s -p no:cacheprovider -k "${MEGATRON_TESTS:-logits or export or converter or chunked}" \
    2>&1 | tee "$OUT/pytest_megatron.log" | grep -E "gpu-test|passed|failed|Error|error" | cut -c1-600
  timeout 300 python3 benchmarks/train_step.py ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step.log" | grep -v -i warn | tail -12
  ;;
vllm)
  source benchmarks/gpu/setup.sh device2 || return 1
  timeout 500 python3 -m pytest -o addopts= tests/test_gpu.py -q -s -p no:cacheprovider \
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
  timeout 560 python3 -m pytest -o addopts= tests/test_gpu.py -q -s -p no:cacheprovider -k toy \
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
  #   rollout: generation tokens/s at rollout TP=2, our engine vs standalone vLLM (alternating runs, --compare)
  #   split: split placement (staleness 0, 1) against colocated on the two GPUs (benchmarks/split_step.py)
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
      # one engine per process at TP=2, so the two engines alternate, wrapper, standalone, standalone,
      # wrapper (run-to-run drift on this machine is larger than the difference measured). The wrapper's
      # runs also time its own engine through vLLM's call (wrapper-raw: our Python around the call left
      # out) and, in the first, with per-sample seeds as the trainer samples (wrapper-seeded)
      for _r in ${ROLLOUT_ROUNDS:-1 2}; do
        _ord="wrapper standalone"; [ $_r = 2 ] && _ord="standalone wrapper"
        for _e in $_ord; do
          _eng=$_e; _lim=110
          if [ $_e = wrapper ]; then _eng="wrapper,wrapper-raw"; _lim=160; fi
          if [ $_e = wrapper ] && [ $_r = 1 ] && [ "${ROLLOUT_SEEDED:-1}" = 1 ]; then
            _eng="wrapper,wrapper-raw,wrapper-seeded"; _lim=200; fi
          _launch="benchmarks/rollout.py"  # ROLLOUT_PIN=1: each rank on its own half of the cores
          [ "${ROLLOUT_PIN:-0}" = 1 ] && _launch="--no-python bash benchmarks/gpu/pin.sh python3 benchmarks/rollout.py"
          timeout $_lim torchrun --nproc_per_node=2 --master_port=$((29600 + _r)) $_launch --tp 2 --engines $_eng \
            --reps ${ROLLOUT_REPS:-3} --workloads ${ROLLOUT_WORKLOADS:-32x8x512} --out "$OUT" --name rollout_tp2_${_e}_r$_r 2>&1 \
            | tee "$OUT/rollout_tp2_${_e}_r$_r.log" | grep -v -i "warn\|INFO" | tail -5
        done
        python3 benchmarks/rollout.py --compare "$OUT/rollout_tp2_wrapper_r$_r.json" "$OUT/rollout_tp2_standalone_r$_r.json" \
          2>&1 | tee "$OUT/rollout_tp2_compare_r$_r.txt"
      done ;;
    split)
      # split placement (1 training GPU + 1 rollout GPU, staleness 1 and 0) against colocated DP=2, 1.5B,
      # 2048 new tokens: step tokens/s and each side's wait; the runs share what is left of the call.
      # SPLIT_ARGS="--lengths realistic ..." for long-tailed response lengths
      _left=$(( 580 - ($(date +%s) - _t_call) ))
      timeout $_left python3 benchmarks/split_step.py --out "$OUT" --budget-s $(( _left - 15 )) ${SPLIT_ARGS:-} 2>&1 | tee "$OUT/split_step.log" \
        | grep -v -i "warn\|INFO" | tail -10 ;;
    *) echo "perf2: unknown part $_p2 (dp, tp, rollout, split)" >&2 ;;
    esac
    echo "perf2 $_p2: $(( $(date +%s) - _p2_t0 )) s"
  done
  ;;
lorarollout)
  # LoRA rollout, merged weights vs vLLM serving the adapters (and full fine-tuning): sync, wake/sleep,
  # generation tokens/s, rollout/trainer mismatch. LORA_RUNS: "size:tp" pairs, one after the other
  source benchmarks/gpu/setup.sh device2 || return 1
  for _lr in ${LORA_RUNS:-1.5B:1}; do
    _left=$(( 575 - ($(date +%s) - _t_call) ))
    [ $_left -gt 60 ] || { echo "lorarollout: no time left for $_lr"; break; }
    timeout $_left python3 benchmarks/lora_rollout.py --size ${_lr%%:*} --tp ${_lr##*:} --out "$OUT" \
      --timeout $(( _left - 5 )) ${LORA_ROLLOUT_ARGS:-} > "$OUT/lora_rollout_${_lr%%:*}.log" 2>&1
    echo "lorarollout $_lr: rc $?"
    grep -E "^=== |rc [0-9]|Error|error:|out of memory" "$OUT/lora_rollout_${_lr%%:*}.log" | cut -c1-300 | tail -12
  done
  python3 benchmarks/lora_rollout.py --table --out "$OUT"
  ;;
lora)
  # LoRA against full fine-tuning: GPU memory of a 7B-shaped actor's training step at TP=2. Megatron
  # only, so one call that carries just .whl (the working tree and the vLLM part 1 pass 64 MiB)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mcsite .whl/*.whl || return 1
  export PYTHONPATH=$PWD:/tmp/mcsite PYTHONUNBUFFERED=1
  timeout $(( 580 - ($(date +%s) - _t_call) )) python3 benchmarks/lora_memory.py --out "$OUT" ${LORA_ARGS:-} 2>&1 \
    | tee "$OUT/lora_memory.log" | grep -v -i "warn\|INFO" | tail -8
  ;;
packing)
  # Packed micro-batches on the GPU: the attention kernels against a float64 reference and packed
  # vs padded toy runs (GPU 0), then the 1.5B realistic-length comparison (grpo_step.py --compare:
  # realistic padded, realistic packed, all-max packed) at 4096 new tokens on GPU 0 and 8192 on
  # GPU 1, side by side. Padded micro-batches get the packed budget's tokens (16,384: 4 rows at
  # 4096, 2 at 8192). One step each after one warm-up at 4096; at 8192 one step, no warm-up
  # (a step there is ~2 min; engine graphs and compilation happen at engine build, not in a step).
  _pk_t0=$(date +%s)
  source benchmarks/gpu/setup.sh device2 || return 1
  CUDA_VISIBLE_DEVICES=1 timeout $(( 560 - ($(date +%s) - _pk_t0) )) python3 benchmarks/grpo_step.py --response-len 8192 \
    --prompts 8 --mini 4 --micro 2 --warmup 0 --steps 1 --compare --reuse --out "$OUT" --name grpo_step_8192 \
    > "$OUT/grpo_step_8192.log" 2>&1 &
  _pk_8k=$!
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -o addopts= tests/test_packing.py tests/test_gpu.py -q -s -p no:cacheprovider \
    -k "${PACKING_TESTS:-packed_attention_kernels_on_gpu or toy_packed_equals_padded_on_gpu}" 2>&1 \
    | tee "$OUT/pytest_packing.log" | grep -E "gpu-test|passed|failed|Error |error:|assert" | cut -c1-900
  CUDA_VISIBLE_DEVICES=0 timeout $(( 560 - ($(date +%s) - _pk_t0) )) python3 benchmarks/grpo_step.py --response-len 4096 \
    --prompts 16 --mini 8 --micro 4 --warmup 1 --steps 1 --compare --reuse --out "$OUT" --name grpo_step_4096 \
    > "$OUT/grpo_step_4096.log" 2>&1
  wait $_pk_8k
  for _f in 4096 8192; do
    echo "=== $_f"; grep -v -i "warn\|INFO" "$OUT/grpo_step_$_f.log" | grep -E "^(===|step|run |  |lengths|speedup|packed|real|\|)|Error|error|OOM|out of memory" | tail -30
  done
  echo "packing: $(( $(date +%s) - _pk_t0 )) s"
  ;;
split)
  # the toy GRPO task as the layout matrix runs it (bf16, CUDA graphs), on GPU 0 (training) and GPU 1
  # (rollout), 10 steps at staleness 0 and at staleness 1; metrics.jsonl of each to $OUT.
  # SPLIT_EXTRA="key=value ...": more overrides (e.g. data.val_files=toy trainer.test_freq=3)
  source benchmarks/gpu/setup.sh device2 || return 1
  _sp="configs/toy_grpo.yaml actor_rollout_ref.model.dtype=bfloat16 actor_rollout_ref.rollout.gpu_memory_utilization=0.2
    actor_rollout_ref.rollout.placement=split actor_rollout_ref.rollout.n_gpus=1 trainer.max_steps=10
    trainer.logger=[console] trainer.export_hf_at_end=false trainer.dist_timeout_s=90"
  for _s in ${SPLIT_STALENESS:-0 1}; do
    timeout 170 torchrun --nproc_per_node=2 --master_port=$((29700 + _s)) -m mcore_rl.cli train $_sp \
      async_training.staleness=$_s trainer.output_dir=/tmp/split_s$_s ${SPLIT_EXTRA:-} > "$OUT/split_s$_s.log" 2>&1
    echo "split, staleness $_s: rc $?"
    cp /tmp/split_s$_s/metrics.jsonl "$OUT/metrics_split_s$_s.jsonl" 2>/dev/null
    grep -E "^ *step |Error|error" "$OUT/split_s$_s.log" | cut -c1-240 | tail -12
  done
  ;;
*)
  echo "usage: source benchmarks/gpu/run_device.sh megatron|vllm|sync|rollout|toy|grpo|multi|perf2|packing|split|lora|lorarollout" >&2; return 2 ;;
esac
