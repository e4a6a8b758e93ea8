"""transformers rollout engine: slow but simple and exact.

The fallback where vLLM is not installed, and the reference vLLM is tested against. It follows
the conventions of `mcore_rl.rollout.base` (stopping, log-prob modes, seeds) so that, for the
same weights, greedy output and log-probs match vLLM's up to floating-point differences.
Prompts are generated one at a time (no padding, so no padding-dependent numerics).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .base import (LogprobsMode, RolloutEngine, RolloutOutput, Sampling, WeightTarget, model_eos_token_ids,
                   truncate_at_stop)


class HFEngine(RolloutEngine):
    """`transformers` model + `generate`.

    Args:
        model_path: HF checkpoint directory.
        dtype: parameter dtype (fp32 for exact comparisons); a name such as ``"bfloat16"``, or
            ``"auto"`` for the checkpoint's, is accepted too.
        device: default: CUDA if available, else CPU.
        seed: seeds the global torch RNG once (used when `Sampling.seed` is None).
        max_model_len: context length (prompt + completion); default: the model's
            ``max_position_embeddings``.
        logprobs_mode: ``"raw"`` (``generate``'s ``output_logits``) or ``"processed"``
            (``output_scores``: after temperature / top-k / top-p).
    """

    def __init__(self, model_path: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None,
                 seed: int = 0, max_model_len: int | None = None, logprobs_mode: LogprobsMode = "raw"):
        import transformers as tf

        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        self.model_path = str(model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.logprobs_mode = logprobs_mode
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        self.model = tf.AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        # Every generation knob is passed explicitly; a blank config keeps the checkpoint's
        # generation_config (e.g. top_k=50, its eos) from filling in unset values.
        self.model.generation_config = tf.GenerationConfig()
        self._gen_cfg_cls = tf.GenerationConfig
        self.eos_token_ids = model_eos_token_ids(self.model_path)
        self.max_model_len = int(max_model_len or getattr(self.model.config.get_text_config(),
                                                          "max_position_embeddings", 1 << 30))
        # state_dict(keep_vars=True) lists tied parameters under every name they have
        self._params = self.model.state_dict(keep_vars=True)
        self._target = WeightTarget(load_hf=self._load_hf,
                                    why_not_copy="the transformers engine takes HF-named tensors only")
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling | None = None
                 ) -> list[RolloutOutput]:
        sampling = sampling or Sampling()
        stop = self.stop_set(sampling)
        results: list[RolloutOutput] = []
        for i, prompt in enumerate(prompt_token_ids):
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            budget = min(sampling.max_tokens, self.max_model_len - ids.shape[1])
            if budget < 1:
                raise ValueError(f"prompt {i} ({ids.shape[1]} tokens) leaves no room in max_model_len={self.max_model_len}")
            seed = sampling.request_seed(i)
            if seed is not None:
                torch.manual_seed(seed)
            knobs = {} if sampling.greedy else dict(temperature=sampling.temperature, top_k=max(sampling.top_k, 0),
                                                     top_p=sampling.top_p)
            cfg = self._gen_cfg_cls(
                do_sample=not sampling.greedy, **knobs, max_new_tokens=budget,
                num_return_sequences=sampling.n, eos_token_id=sorted(stop) or None,
                pad_token_id=min(stop) if stop else 0, return_dict_in_generate=True,
                output_logits=sampling.logprobs and self.logprobs_mode == "raw",
                output_scores=sampling.logprobs and self.logprobs_mode == "processed")
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            new = out.sequences[:, ids.shape[1]:]
            steps = out.logits if self.logprobs_mode == "raw" else out.scores
            for k in range(sampling.n):
                row = new[k].tolist()
                keep, reason = truncate_at_stop(row, stop, budget)
                toks = row[:keep]
                lps: list[float] = []
                if sampling.logprobs:
                    lps = [float(torch.log_softmax(steps[t][k].float(), dim=-1)[tok]) for t, tok in enumerate(toks)]
                results.append(RolloutOutput(prompt_index=i, sample_index=k, token_ids=toks, logprobs=lps,
                                             finish_reason=reason))
        return results

    def weight_target(self) -> WeightTarget:
        return self._target

    @torch.no_grad()
    def _load_hf(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            param = self._params.get(name)
            if param is None:
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some checkpoints carry; recomputed
                    continue
                raise KeyError(f"{name!r} is not a parameter of {type(self.model).__name__}")
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
            param.copy_(tensor)

    def close(self) -> None:
        self.model = None
        self._params = {}
