"""What gloo forgives and NCCL does not, checked on CPU (harness: tests/strict_dist.py).

Host tensors handed to collectives and ranks issuing different collectives on a group pass
on gloo (or hang) and fail on GPUs. These tests run two gloo ranks under the strict harness:
its self-tests, the real trainer at DP=2 and TP=2, and the weight-sync path agreement.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
import torch

import strict_dist

# ------------------------------------------------------------------------------ self-tests


def _selftest_worker(out_dir: str) -> int:
    """Each case: 'ok', or the harness's message. Ends with a deliberate order mismatch."""
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    from mcore_rl.distributed import device, init_distributed

    init_distributed(1, 1)  # world of 2: DP=2, so megatron's gloo DP group exists
    rank, dev = dist.get_rank(), device()
    res: dict[str, str] = {}

    def case(key, fn):
        try:
            fn()
            res[key] = "ok"
        except strict_dist.HostTensorInCollective as e:
            res[key] = str(e)

    def reduced(t):
        dist.all_reduce(t)
        return t

    case("host_factory", lambda: dist.all_reduce(torch.tensor([1.0])))
    case("device_factory", lambda: res.setdefault("device_sum", str(reduced(torch.tensor([1.0], device=dev)).tolist())))
    case("host_to_device", lambda: dist.all_reduce(torch.tensor([1.0]).to(dev)))
    x = torch.ones(2, device=dev)
    case("device_cpu", lambda: dist.all_reduce(x.cpu()))
    case("device_after_cpu", lambda: dist.all_reduce(x))  # .cpu() copied: the original stays a device tensor
    case("host_plus_device", lambda: dist.all_reduce(x + torch.ones(2)))
    case("device_times_host_scalar", lambda: dist.all_reduce(x * torch.tensor(2.0)))
    case("device_add_host_in_place", lambda: dist.all_reduce(x.add_(torch.ones(2))))
    case("host_copy_from_device", lambda: dist.all_reduce(torch.zeros(2).copy_(x)))
    case("empty_on_t_device", lambda: dist.all_reduce(torch.empty(3, device=x.device).zero_()))
    case("zeros_like_host", lambda: dist.all_reduce(torch.zeros_like(torch.ones(2))))
    case("megatron_buffer", lambda: dist.all_reduce(torch.zeros(2, device=torch.cuda.current_device())))
    case("host_cuda", lambda: dist.all_reduce(torch.ones(2).cuda()))
    case("megatron_alias", lambda: mappings.dist_all_gather_func(torch.empty(4, device=dev), torch.ones(2),
                                                                 group=ps.get_data_parallel_group()))
    case("megatron_gloo_group", lambda: dist.all_reduce(torch.ones(1), group=ps.get_data_parallel_group_gloo()))
    case("all_gather_list", lambda: dist.all_gather([torch.empty(1, device=dev) for _ in range(2)], torch.ones(1)))
    peer = 1 - rank

    def p2p(make):
        send, recv = make(torch.full((3,), float(rank))), make(torch.empty(3))
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]):
            w.wait()
        res["p2p_received"] = str(recv.tolist())

    case("p2p_host", lambda: p2p(lambda t: t))
    case("p2p_device", lambda: p2p(lambda t: t.to(dev)))
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump(res, f)

    # The order mismatch: rank 0 all_reduce then broadcast, rank 1 the other way round, other
    # shapes. gloo waits (its own short timeout here) or errors; the log shows it either way.
    g = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    a, b = torch.ones(2, device=dev), torch.ones(3, device=dev)
    steps = [lambda: dist.all_reduce(a, group=g), lambda: dist.broadcast(b, src=0, group=g)]
    for step in steps if rank == 0 else steps[::-1]:
        try:
            step()
        except RuntimeError:
            pass
    dist.barrier()
    return 0


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """The self-test worker's log dir and per-rank results (one 2-rank run for all cases)."""
    out = tmp_path_factory.mktemp("selftest")
    p = strict_dist.launch("test_strict_dist:_selftest_worker", [str(out)], log_dir=out, timeout_s=30, wall_s=180)
    results = [json.load(open(out / f"result{r}.json")) for r in range(2) if (out / f"result{r}.json").exists()]
    assert len(results) == 2, strict_dist.excerpt(p.stdout)
    return out, results


HOST = ["host_factory", "device_cpu", "host_plus_device", "host_copy_from_device", "zeros_like_host",
        "megatron_alias", "all_gather_list", "p2p_host"]
DEVICE = ["device_factory", "host_to_device", "device_after_cpu", "device_times_host_scalar",
          "device_add_host_in_place", "empty_on_t_device", "megatron_buffer", "host_cuda", "megatron_gloo_group",
          "p2p_device"]


@pytest.mark.train
@pytest.mark.parametrize("case", HOST)
def test_host_tensor_in_collective_raises(selftest, case):
    _, results = selftest
    for res in results:
        assert res[case].startswith("host tensor in "), res[case]
        assert "test_strict_dist.py:" in res[case], res[case]  # the caller's file:line


@pytest.mark.train
def test_host_tensor_message_names_op_shape_and_caller(selftest):
    msg = selftest[1][0]["host_factory"]
    assert msg.startswith("host tensor in all_reduce on group default_pg [0, 1], called at tests/test_strict_dist.py:"), msg
    assert ": tensor float32[1], a host tensor since tests/test_strict_dist.py:" in msg and "(tensor)" in msg, msg
    alias = selftest[1][0]["megatron_alias"]
    assert alias.startswith("host tensor in all_gather_into_tensor on group DATA_PARALLEL_GROUP [0, 1]"), alias
    assert ": input_tensor float32[2], a host tensor since" in alias and "output_tensor" not in alias, alias


@pytest.mark.train
@pytest.mark.parametrize("case", DEVICE)
def test_device_tensor_in_collective_passes(selftest, case):
    _, results = selftest
    for res in results:
        assert res[case] == "ok", res[case]


@pytest.mark.train
def test_collectives_still_compute(selftest):
    _, results = selftest
    assert [r["device_sum"] for r in results] == ["[2.0]", "[2.0]"]
    assert [r["p2p_received"] for r in results] == ["[1.0, 1.0, 1.0]", "[0.0, 0.0, 0.0]"]


@pytest.mark.train
def test_device_is_plain_cpu_unless_strict(monkeypatch):
    """The strict hook changes nothing by default (CPU runs keep torch.device("cpu"))."""
    from mcore_rl.distributed import parallel

    if torch.cuda.is_available() or os.environ.get("MCORE_RL_STRICT_DEVICE") == "1":
        pytest.skip("CPU without strict mode only")
    assert parallel.device() == torch.device("cpu")
    monkeypatch.setattr(parallel, "_STRICT_DEVICE", False)
    parallel.strict_device_mode(True)
    assert parallel.device() == torch.device("cpu", 0)


@pytest.mark.train
def test_order_mismatch_is_reported(selftest):
    out, _ = selftest
    with pytest.raises(AssertionError) as e:
        strict_dist.check_logs(out, 2)
    lines = [line.strip() for line in str(e.value).splitlines()[1:]]
    hosts = [line for line in lines if line.startswith(("rank 0: host tensor in", "rank 1: host tensor in"))]
    assert len(hosts) == 2 * len(HOST), lines  # each host case, as it was raised on each rank
    # the deliberate mismatch, and nothing else: the host-tensor cases raised before communicating
    # and everything else was issued identically on both ranks
    lines = [line for line in lines if line not in hosts]
    assert len(lines) == 1, lines
    assert lines[0].startswith("group ") and "[0, 1]: call #0 differs" in lines[0], lines[0]
    assert "rank 0 issued all_reduce['float32[2]', {'op': 'SUM'}]" in lines[0], lines[0]
    assert "rank 1 issued broadcast['float32[3]', {'src': 0}]" in lines[0], lines[0]
    assert "test_strict_dist.py:" in lines[0]


# ------------------------------------------------------------------------------ the trainer
TOY = ["data.dataset_name=toy", "data.train_batch_size=4", "actor_rollout_ref.rollout.n=2",
       "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
       "critic.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
       "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4", "trainer.max_steps=1",
       "trainer.logger=[console]", "trainer.export_hf_at_end=false", "trainer.dist_timeout_s=60"]
TP2 = ["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"]
LAYOUTS = {  # name: (preset, overrides, the group that must have carried collectives)
    "dp2-grpo-hf": ("grpo", ["actor_rollout_ref.rollout.name=hf"], "DATA_PARALLEL_GROUP [0, 1]"),
    "dp2-ppo-hf": ("ppo", ["actor_rollout_ref.rollout.name=hf"], "DATA_PARALLEL_GROUP [0, 1]"),
    "tp2-rtp2-grpo-vllm": ("grpo", TP2 + ["actor_rollout_ref.rollout.name=vllm",
                                          "actor_rollout_ref.rollout.tensor_model_parallel_size=2"],
                           "TENSOR_MODEL_PARALLEL_GROUP [0, 1]"),
    "tp2-rtp1-ppo-hf": ("ppo", TP2 + ["actor_rollout_ref.rollout.name=hf",
                                      "actor_rollout_ref.rollout.tensor_model_parallel_size=1"],
                        "TENSOR_MODEL_PARALLEL_GROUP [0, 1]"),
    # LoRA adapters (TP regions in forward and backward, merged weights gathered for the sync; the
    # KL loss's reference is the actor with adapters off)
    "tp2-rtp1-grpo-hf-lora": ("grpo", TP2 + ["actor_rollout_ref.rollout.name=hf",
                                             "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                                             "actor_rollout_ref.model.lora_rank=4",
                                             "actor_rollout_ref.model.target_modules=q_proj,v_proj,down_proj"],
                              "TENSOR_MODEL_PARALLEL_GROUP [0, 1]"),
}


def run_trainer(tmp_path, preset: str, overrides: list[str], env: dict | None = None):
    """The trainer (`mcore_rl.commands.train.main`) on 2 gloo ranks under the harness; returns (process, log dir)."""
    logs = tmp_path / "logs"
    argv = [str(strict_dist.REPO / "configs" / f"{preset}.yaml"), *TOY, *overrides,
            f"trainer.output_dir={tmp_path / 'run'}"]
    p = strict_dist.launch("mcore_rl.commands.train:main", [argv], log_dir=logs, timeout_s=60, wall_s=420, env=env)
    return p, logs


@pytest.mark.train
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_collectives_take_device_tensors_in_one_order(layout, tmp_path):
    """One step of the real trainer: no host tensor in any collective, and per group the same
    sequence of collectives on both ranks."""
    preset, overrides, busy = LAYOUTS[layout]
    p, logs = run_trainer(tmp_path, preset, overrides)
    try:
        counts, problems = strict_dist.check_logs(logs, 2), ""
    except AssertionError as e:
        counts, problems = {}, str(e)
    assert p.returncode == 0 and not problems, f"{problems}\n--- exit code {p.returncode}, output:\n{strict_dist.excerpt(p.stdout)}"
    assert counts.get(busy, 0) > 0, counts  # the layout really communicated over that group
    for s in strict_dist.summaries(logs, 2):  # the checks were live: host tensors existed, device ones were checked
        assert s["host_tensors_made"] > 0 and s["tensors_checked"] > 0, s
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]


# ------------------------------------------------------------------------------ weight-sync path
def _sync_worker(hf_path: str, out_dir: str, agree: bool) -> int:
    """TP=2 actor; the fast-path probe says "applicable" on rank 0 only; then one sync into an
    HF engine whose weights were zeroed. Records the path each rank took and the result."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    import mcore_rl.resharding as resharding
    from converters.hf_io import load_hf_into_model
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.resharding import fast_path
    from mcore_rl.rollout.base import WeightTarget
    from mcore_rl.rollout.hf_engine import HFEngine

    init_distributed(2, 1)
    rank = dist.get_rank()
    spec = arch_from_hf_config(hf_path)
    model = build_model(spec, dtype=torch.float32)
    load_hf_into_model(model, spec, hf_path)
    engine = HFEngine(hf_path, dtype="float32")
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()

    class FakeFastSync:  # the real copy program needs CUDA and a GPU vLLM engine; this one copies nothing
        program = type("CopyProgram", (), {"copies": [], "gathers": []})()
        build_seconds = 0.0

        def __init__(self, model, engine):
            pass

        def sync(self):
            return {"sync/seconds": 0.0, "sync/bytes": 0, "sync/tensors": 0, "sync/GBps": 0.0}

    hf_target = engine.weight_target()  # the engine's own says no copies; this one says yes on rank 0 only
    target = WeightTarget(load_hf=hf_target.load_hf, copy_slots=lambda: None,
                          why_not_copy=None if dist.get_rank() == 0 else "probe says no")
    engine.weight_target = lambda: target
    fast_path.FastSync = FakeFastSync
    if not agree:
        resharding._agree = lambda reason: reason
    resharder = resharding.Resharder(model, bucket_mb=1)
    stats = resharder.sync(engine)
    ref = {}
    for f in glob.glob(os.path.join(hf_path, "*.safetensors")):
        ref.update(load_file(f))
    params = engine.model.state_dict()
    loaded = all(torch.equal(params[k], v) for k, v in ref.items())
    with open(os.path.join(out_dir, f"sync{rank}.json"), "w") as f:
        json.dump({"fast": stats["sync/fast"], "reason": resharder.fast_reason, "loaded": loaded}, f)
    return 0


@pytest.mark.sync
def test_weight_sync_ranks_agree_on_the_path(tiny_model_factory, tmp_path):
    """Rank 0 alone could take the fast path: both ranks take the HF-named one, load the
    checkpoint's weights, and issue the same TP all-gathers."""
    path = tiny_model_factory("llama")
    p = strict_dist.launch("test_strict_dist:_sync_worker", [path, str(tmp_path), True], log_dir=tmp_path / "logs",
                           timeout_s=30, wall_s=180)
    assert p.returncode == 0, strict_dist.excerpt(p.stdout)
    got = [json.load(open(tmp_path / f"sync{r}.json")) for r in range(2)]
    assert [g["fast"] for g in got] == [0.0, 0.0], got
    assert "rank 1" in got[0]["reason"] and "probe says no" in got[0]["reason"], got  # rank 0 says why it did not
    assert got[1]["reason"] == "probe says no", got
    assert all(g["loaded"] for g in got), got
    counts = strict_dist.check_logs(tmp_path / "logs", 2)
    assert counts.get("TENSOR_MODEL_PARALLEL_GROUP [0, 1]", 0) > 0, counts


@pytest.mark.sync
def test_weight_sync_without_agreement_is_caught_quickly(tiny_model_factory, tmp_path):
    """The same with the agreement step removed (the bug it fixes): rank 0 takes the fast path,
    rank 1 waits in the HF path's TP all-gather; the run fails within the group timeout and
    the order check names the all-gather rank 0 never issued."""
    path = tiny_model_factory("llama")
    t0 = time.perf_counter()
    p = strict_dist.launch("test_strict_dist:_sync_worker", [path, str(tmp_path), False],
                           log_dir=tmp_path / "logs", timeout_s=10, wall_s=120)
    assert p.returncode != 0, strict_dist.excerpt(p.stdout)
    assert time.perf_counter() - t0 < 100
    with pytest.raises(AssertionError) as e:
        strict_dist.check_logs(tmp_path / "logs", 2)
    tp = [line for line in str(e.value).splitlines() if "group TENSOR_MODEL_PARALLEL_GROUP [0, 1]: call #" in line]
    assert len(tp) == 1, str(e.value)
    assert "rank 0 issued nothing" in tp[0] and "rank 1 issued all_gather_into_tensor" in tp[0], tp[0]
    assert "converters/gather.py:" in tp[0], tp[0]


@pytest.mark.train
def test_split_placement_moves_device_tensors_in_one_order(tmp_path):
    """Split placement, 2 training ranks + 1 rollout rank, staleness 1: no host tensor in any
    collective of either side's world nor in the bridge's sends, receives and broadcasts, and the
    training ranks issue the same collectives."""
    logs = tmp_path / "logs"
    argv = [str(strict_dist.REPO / "configs" / "grpo.yaml"), *TOY, "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.placement=split", "actor_rollout_ref.rollout.n_gpus=1",
            "async_training.staleness=1", "trainer.max_steps=2", "trainer.dist_timeout_s=60",
            f"trainer.output_dir={tmp_path / 'run'}"]
    p = strict_dist.launch("mcore_rl.commands.train:main", [argv], log_dir=logs, nproc=3, timeout_s=60, wall_s=420)
    assert p.returncode == 0, strict_dist.excerpt(p.stdout)
    entries = strict_dist.read_logs(logs, 3)
    train = {r: [(e.get("op"), e.get("group")) for e in entries[r] if "op" in e] for r in (0, 1)}
    assert train[0] and train[0] == train[1]  # the training ranks: the same collectives, in the same order
    assert not any("violation" in e for r in entries for e in entries[r])
