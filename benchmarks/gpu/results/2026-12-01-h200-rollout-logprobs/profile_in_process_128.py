"""The script behind profile_in_process_128.txt (run from the repository root on one H200, vLLM 0.26):
standalone vLLM in this process, 16 prompts x 8 samples of long-tailed lengths (as rollout.py
--lengths realistic), each generate timed plainly and then under cProfile, with and without
log-probs; the top functions by own time."""
import cProfile, io, os, pstats, random, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "benchmarks/gpu")
import common
from grpo_step import length_sampler
import vllm
cfg = common.qwen25_config("1.5B", max_position_embeddings=4352)
path = "/tmp/prof-1.5B"; common.write_hf_config_dir(path, cfg)
llm = vllm.LLM(model=path, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16", seed=0, max_model_len=4352,
               enable_prefix_caching=True, gpu_memory_utilization=0.3, logprobs_mode="raw_logprobs")
rng = random.Random(0); draw = length_sampler(4096, random.Random(0))
P, N = 16, 8
prompts = [{"prompt_token_ids": [rng.randrange(100, 150000) for _ in range(128)]} for _ in range(P) for _ in range(N)]
lens = [draw() for _ in prompts]
def params(lp):
    return [vllm.SamplingParams(n=1, temperature=1.0, max_tokens=L, ignore_eos=True, logprobs=lp, detokenize=False,
                                flat_logprobs=True, seed=1234 + k) for k, L in enumerate(lens)]
llm.generate(prompts, params(0), use_tqdm=False)
for lp in (0, None):
    t = time.perf_counter(); llm.generate(prompts, params(lp), use_tqdm=False); print("plain", lp, round(time.perf_counter() - t, 2), flush=True)
for lp in (0, None):
    pr = cProfile.Profile(); t = time.perf_counter(); pr.enable(); llm.generate(prompts, params(lp), use_tqdm=False); pr.disable()
    print(f"=== profiled logprobs={lp}: {time.perf_counter() - t:.2f} s", flush=True)
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[-6000:], flush=True)
