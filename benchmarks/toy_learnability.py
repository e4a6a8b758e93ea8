"""Is the toy task learnable in ~20 RL steps on a CPU? A plain-PyTorch GRPO/PPO loop on the toy HF model.

Samples with a manual loop (full recompute: sequences are 11 tokens), group-relative advantages
(or PPO's with a critic, `--adv gae`), PPO-clipped policy loss, Adam. Prints the reward per step
and the wall time, so the toy config defaults of the real trainer can be chosen from measured
numbers.

    python benchmarks/toy_learnability.py [--seeds 5] [--adv gae --prompts 128 --samples 1] [--verbose]

Defaults are `mcore_rl.toy.TOY_TRAIN_DEFAULTS`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def sample(model, prompt_ids, max_new, eos_id, temperature=1.0):
    """Returns (response ids [B, T], mask [B, T] valid up to and including the first eos, logp [B, T])."""
    seq = prompt_ids
    done = torch.zeros(seq.shape[0], dtype=torch.bool)
    outs, masks, logps = [], [], []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(seq).logits[:, -1].float() / temperature
            lp = F.log_softmax(logits, -1)
            tok = torch.multinomial(lp.exp(), 1).squeeze(1)
            masks.append(~done)
            outs.append(tok)
            logps.append(lp.gather(1, tok[:, None]).squeeze(1))
            done = done | (tok == eos_id)
            seq = torch.cat([seq, tok[:, None]], 1)
    return torch.stack(outs, 1), torch.stack(masks, 1).float(), torch.stack(logps, 1)


def token_logp(model, prompt_ids, resp_ids, temperature=1.0):
    full = torch.cat([prompt_ids, resp_ids], 1)
    logits = model(full).logits[:, prompt_ids.shape[1] - 1 : -1].float() / temperature
    return F.log_softmax(logits, -1).gather(2, resp_ids[..., None]).squeeze(2)


class Critic(torch.nn.Module):
    """Value model: the policy's trunk (a copy) + a zero-initialized scalar head (starts at V = 0)."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = torch.nn.Linear(trunk.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, prompt_ids, resp_ids):
        """V at each response token's input position (the state before that token is chosen)."""
        full = torch.cat([prompt_ids, resp_ids], 1)
        h = self.trunk(full).last_hidden_state[:, prompt_ids.shape[1] - 1 : -1]
        return self.head(h).squeeze(-1)


def run(args) -> dict:
    import transformers as tf

    from mcore_rl.toy import build_toy_model, toy_prompts, toy_reward

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory()
    d_model = tmp.name
    build_toy_model(d_model, seed=args.seed, **json.loads(args.model))
    tok = tf.AutoTokenizer.from_pretrained(d_model)
    model = tf.AutoModelForCausalLM.from_pretrained(d_model, dtype=torch.float32)
    t_build = time.time() - t0
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    critic = critic_opt = None
    if args.adv == "gae":  # PPO: a critic from the same checkpoint with a zero-initialized value head
        critic = Critic(tf.AutoModelForCausalLM.from_pretrained(d_model, dtype=torch.float32).model)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    k = args.response_len
    history = []
    t_train = time.time()
    for step in range(args.steps):
        rows = toy_prompts(args.prompts, seed=args.seed * 100003 + step, num_digits=args.digits, sep=args.sep)
        prompts = [r["prompt"] for r in rows for _ in range(args.samples)]
        gts = [r["ground_truth"] for r in rows for _ in range(args.samples)]
        enc = tok(prompts, return_tensors="pt")  # all prompts have the same length: no padding
        pids = enc.input_ids
        model.eval()
        resp, mask, old_lp = sample(model, pids, k, tok.eos_token_id)
        # cut at eos: tokens sampled after it are not part of the response
        texts = [tok.decode(r[: int(m.sum())], skip_special_tokens=True) for r, m in zip(resp, mask)]
        rewards = torch.tensor([toy_reward(p, t, g, k=k) for p, t, g in zip(prompts, texts, gts)])
        grp = rewards.view(args.prompts, args.samples)
        if args.adv == "grpo":  # group-relative: baseline and scale from the same prompt's samples
            adv = ((grp - grp.mean(1, keepdim=True)) / (grp.std(1, keepdim=True) + 1e-6)).view(-1)
        elif args.adv == "batch":  # whitened over the batch, no per-prompt baseline
            adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        else:  # "gae" with gamma = lambda = 1: A_t = R - V_t, whitened over valid tokens
            with torch.no_grad():
                old_v = critic(pids, resp)
            ret = rewards[:, None].expand_as(old_v)
            adv_tok = ret - old_v
            mu = (adv_tok * mask).sum() / mask.sum()
            var = (((adv_tok - mu) ** 2) * mask).sum() / mask.sum()
            adv_tok = (adv_tok - mu) / (var.sqrt() + 1e-6)
        model.train()
        n = pids.shape[0]
        mb = n // args.minibatches
        for _epoch in range(args.ppo_epochs):
            perm = torch.randperm(n)
            for i in range(args.minibatches):
                idx = perm[i * mb : (i + 1) * mb]
                lp = token_logp(model, pids[idx], resp[idx])
                ratio = (lp - old_lp[idx]).exp()
                a = adv_tok[idx] if args.adv == "gae" else adv[idx][:, None]
                loss_tok = -torch.min(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a)
                m = mask[idx]
                loss = (loss_tok * m).sum() / m.sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if critic is not None:
                    v = critic(pids[idx], resp[idx])
                    v_clip = old_v[idx] + (v - old_v[idx]).clamp(-args.clip_value, args.clip_value)
                    vl = torch.max((v - ret[idx]) ** 2, (v_clip - ret[idx]) ** 2)
                    vloss = 0.5 * (vl * m).sum() / m.sum().clamp(min=1)
                    critic_opt.zero_grad()
                    vloss.backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
                    critic_opt.step()
        history.append(round(rewards.mean().item(), 4))
        if args.verbose:
            print(f"step {step:3d} reward {history[-1]:.3f}  e.g. {prompts[0]!r} -> {texts[0]!r}", flush=True)
    t_train = time.time() - t_train
    tmp.cleanup()
    first, last = statistics.mean(history[:3]), statistics.mean(history[-3:])
    return dict(args=vars(args), rewards=history, first3=round(first, 4), last3=round(last, 4),
                gain=round(last - first, 4), build_s=round(t_build, 2), train_s=round(t_train, 2))


def parse_args(argv=None):
    from mcore_rl.toy import TOY_PROMPT_DIGITS, TOY_TRAIN_DEFAULTS as D

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=D["steps"])
    p.add_argument("--prompts", type=int, default=D["prompts_per_step"], help="prompts per step")
    p.add_argument("--samples", type=int, default=D["samples_per_prompt"], help="samples per prompt (group size)")
    p.add_argument("--lr", type=float, default=D["actor_lr"])
    p.add_argument("--adv", choices=["grpo", "batch", "gae"], default="grpo",
                   help="grpo: group-relative; batch: batch-whitened; gae: PPO with a critic (gamma=lambda=1)")
    p.add_argument("--critic-lr", type=float, default=D["critic_lr"])
    p.add_argument("--clip", type=float, default=D["clip_ratio"])
    p.add_argument("--clip-value", type=float, default=D["value_clip"])
    p.add_argument("--ppo-epochs", type=int, default=D["ppo_epochs"])
    p.add_argument("--minibatches", type=int, default=D["ppo_mini_batches"], help="optimizer steps per PPO epoch")
    p.add_argument("--digits", type=int, default=TOY_PROMPT_DIGITS, help="prompt digits")
    p.add_argument("--sep", default=":", help="text after the prompt digits")
    p.add_argument("--model", default="{}", help="JSON overrides of the toy LlamaConfig")
    p.add_argument("--response-len", type=int, default=D["response_length"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the matrices are tiny, and more threads than free cores is much slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.adv == "grpo" and args.samples < 2:
        p.error("grpo needs --samples >= 2 (group-relative advantages)")
    return args


def main(argv=None):
    args = parse_args(argv)
    base = args.seed
    for s in range(args.seeds):
        args.seed = base + s
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
