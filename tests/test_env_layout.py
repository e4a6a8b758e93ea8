"""Launch-environment parsing (torchrun, srun, none) and the rank layout.

No cluster is needed: the variables torchrun and Slurm would set are written by the tests.
The layout is checked against megatron-core's own RankGenerator, the reference for which
rank is in which TP/PP/DP group.
"""

import itertools
import os

import pytest

from mcore_rl.distributed.env import (
    LaunchEnv,
    expand_hostlist,
    expand_tasks_per_node,
    export_for_torch,
    port_from_job_id,
    read_launch_env,
)
from mcore_rl.distributed.layout import describe_layout, rank_layout

pytestmark = pytest.mark.slurm

_POSITION = ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "num_nodes")


# --- host lists ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("localhost", ["localhost"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
    ("x[9-11]", ["x9", "x10", "x11"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ("rack1-n[08-09],rack2-n[1]", ["rack1-n08", "rack1-n09", "rack2-n1"]),
    ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
    ("a, b", ["a", "b"]),
    ("", []),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node1]", "node[3-1]", "node[a-b]", "node[1,,2]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(x)")


def test_port_from_job_id_is_stable_and_in_range():
    assert port_from_job_id("1234") == port_from_job_id(1234) == 21234
    assert 20000 <= port_from_job_id("987654321") < 30000
    assert port_from_job_id("1234_5") == port_from_job_id("12345")


# --- environments -------------------------------------------------------------------------

def torchrun_env(rank, nodes, per_node, master="node01", port=29400):
    return {"RANK": str(rank), "WORLD_SIZE": str(nodes * per_node), "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(rank // per_node), "MASTER_ADDR": master,
            "MASTER_PORT": str(port)}


def slurm_env(rank, nodes, per_node, nodelist="node[01-02]", job_id="4242", uniform_spec=True):
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node), "SLURM_LOCALID": str(rank % per_node),
           "SLURM_NODEID": str(rank // per_node), "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist,
           "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0"}
    if uniform_spec:
        env["SLURM_NTASKS_PER_NODE"] = str(per_node)
    else:
        env["SLURM_TASKS_PER_NODE"] = f"{per_node}(x{nodes})" if nodes > 1 else str(per_node)
    return env


def position(e: LaunchEnv):
    return tuple(getattr(e, k) for k in _POSITION)


@pytest.mark.parametrize("nodes, per_node", [(1, 1), (1, 2), (2, 1), (2, 4)])
@pytest.mark.parametrize("uniform_spec", [True, False])
def test_torchrun_and_slurm_agree(nodes, per_node, uniform_spec):
    nodelist = "node01" if nodes == 1 else "node[01-02]"
    world = nodes * per_node
    tp = min(per_node, 2)
    layouts = set()
    for rank in range(world):
        t = read_launch_env(torchrun_env(rank, nodes, per_node))
        s = read_launch_env(slurm_env(rank, nodes, per_node, nodelist=nodelist, uniform_spec=uniform_spec))
        assert (t.launcher, s.launcher) == ("torchrun", "slurm")
        assert position(t) == position(s) == (rank, world, rank % per_node, per_node, rank // per_node, nodes)
        assert s.master_addr == "node01" and s.master_port == 24242
        assert s.hostnames == tuple(expand_hostlist(nodelist))
        lt, ls = rank_layout(t.world_size, tp, 1), rank_layout(s.world_size, tp, 1)
        assert lt == ls and lt.coord(t.rank) == ls.coord(s.rank)
        layouts.add(lt)
    assert len(layouts) == 1


def test_slurm_master_overrides_and_uneven_nodes():
    env = slurm_env(0, 2, 2) | {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31000"}
    e = read_launch_env(env)
    assert (e.master_addr, e.master_port) == ("10.0.0.5", 31000)
    # 3 tasks over 2 nodes (2 + 1): the last task is alone on node 1.
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2,1", "SLURM_JOB_NODELIST": "a,b", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "7"}
    e = read_launch_env(env)
    assert (e.local_world_size, e.node_rank, e.master_addr) == (1, 1, "a")


def test_slurm_step_variables_win_over_job_variables():
    # srun over a subset of the allocation: the step's node list and counts are what ran.
    env = slurm_env(1, 1, 2, nodelist="n[1-4]") | {
        "SLURM_NNODES": "4", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "n3",
        "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2"}
    e = read_launch_env(env)
    assert (e.world_size, e.num_nodes, e.local_world_size, e.master_addr) == (2, 1, 2, "n3")


def test_torchrun_wins_inside_slurm():
    # `srun torchrun ...` in an sbatch: one Slurm task per node, torchrun's workers below it.
    env = slurm_env(1, 2, 1) | torchrun_env(5, 2, 4, master="node01", port=29555)
    e = read_launch_env(env)
    assert e.launcher == "torchrun"
    assert position(e) == (5, 8, 1, 4, 1, 2) and e.master_port == 29555
    assert e.hostnames == ("node01", "node02") and e.job_id == "4242"


def test_batch_shell_is_a_single_process():
    # The sbatch script itself sees SLURM_PROCID=0 and SLURM_NTASKS=N but no step id.
    env = slurm_env(0, 2, 2)
    del env["SLURM_STEP_ID"]
    e = read_launch_env(env)
    assert e.launcher == "single" and e.world_size == 1 and e.job_id == "4242"


def test_single_process():
    e = read_launch_env({})
    assert e.launcher == "single" and position(e) == (0, 1, 0, 1, 0, 1) and e.master_addr == "127.0.0.1"
    assert read_launch_env({"MASTER_PORT": "30001"}).master_port == 30001


def test_export_for_torch_roundtrip():
    src = read_launch_env(slurm_env(3, 2, 2))
    environ: dict[str, str] = {}
    export_for_torch(src, environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node01", "MASTER_PORT": "24242"}
    back = read_launch_env(environ)
    assert position(back) == position(src) and (back.master_addr, back.master_port) == (src.master_addr, src.master_port)


def test_export_for_torch_defaults_to_os_environ(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "0")  # setenv records the original state, so teardown removes what we add
    export_for_torch(LaunchEnv(0, 1, 0, 1, 0, 1, "127.0.0.1", 30123, "single"))
    assert os.environ["MASTER_PORT"] == "30123" and os.environ["WORLD_SIZE"] == "1"


def test_bad_env_values_are_reported():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        read_launch_env(slurm_env(0, 1, 1) | {"SLURM_PROCID": "x"})
    with pytest.raises(ValueError, match="rank"):
        read_launch_env(torchrun_env(0, 1, 1) | {"RANK": "4"})


# --- layout -------------------------------------------------------------------------------

def _megatron_cases():
    for world, tp, pp, cp in itertools.product([1, 2, 4, 8, 12, 16, 32], [1, 2, 4, 8], [1, 2, 4], [1, 2]):
        if world % (tp * pp * cp) == 0:
            yield world, tp, pp, cp


def test_layout_matches_megatron_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    n = 0
    for world, tp, pp, cp in _megatron_cases():
        dp = world // (tp * pp * cp)
        for order in ("tp-cp-ep-dp-pp", "tp-dp-pp", "tp-pp-dp"):
            if cp > 1 and "cp" not in order:
                continue
            ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
            lay = rank_layout(world, tp, pp, cp, order=order)
            for token, mine in (("tp", lay.tp_groups), ("pp", lay.pp_groups), ("dp", lay.dp_groups),
                                ("cp", lay.cp_groups), ("dp-cp", lay.dp_cp_groups)):
                assert [list(g) for g in mine] == ref.get_ranks(token), (world, tp, pp, cp, order, token)
            for c in lay.coords:  # each coordinate is the rank's index inside its group
                assert lay.tp_group(c.rank)[c.tp] == c.rank and lay.pp_group(c.rank)[c.pp] == c.rank
                assert lay.dp_group(c.rank)[c.dp] == c.rank and lay.cp_group(c.rank)[c.cp] == c.rank
            n += 1
    assert n > 50


def test_layout_example_16_ranks():
    lay = rank_layout(16, tp=4, pp=2, rollout_tp=8)
    assert lay.dp == 2 and lay.rollout_dp == 2
    assert lay.tp_groups[:2] == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert lay.pp_groups[0] == (0, 8) and lay.dp_groups[0] == (0, 4)
    assert lay.rollout_groups == (tuple(range(8)), tuple(range(8, 16)))
    c = lay.coord(13)
    assert (c.tp, c.dp, c.pp, c.rollout_tp, c.rollout_dp) == (1, 1, 1, 5, 1)


@pytest.mark.parametrize("args, msg", [
    ((6, 4, 1), "not divisible by tp\\*cp\\*pp"),
    ((8, 2, 3), "not divisible"),
    ((8, 2, 1, 1, 3), "rollout tensor parallel size 3 does not divide"),
    ((8, 0, 1), "positive"),
    ((8, 2, 1, 2, None, "tp-dp-pp"), "does not name 'cp'"),
])
def test_layout_validation(args, msg):
    with pytest.raises(ValueError, match=msg):
        rank_layout(*args)


def test_describe_layout_one_line_per_node():
    lay = rank_layout(16, tp=4, pp=2, rollout_tp=8)
    env = LaunchEnv(0, 16, 0, 8, 0, 2, "node01", 1, "slurm", hostnames=("node01", "node02"))
    lines = describe_layout(lay, env)
    nodes = [ln for ln in lines if ln.startswith("node ")]
    assert len(nodes) == 2
    assert nodes[0].startswith("node 0 (node01): ranks [0-7]") and "TP [0-3] [4-7]" in nodes[0]
    assert "PP [0,8]*" in nodes[0] and "rollout TP [0-7]" in nodes[0]
    assert "TP [8-11] [12-15]" in nodes[1]
    assert not any(ln.startswith("warning") for ln in lines)  # TP stays inside nodes
    # TP 4 over nodes of 2 GPUs: flagged.
    lines = describe_layout(rank_layout(8, tp=4, pp=1), LaunchEnv(0, 8, 0, 2, 0, 4, "a", 1, "torchrun"))
    assert any("TP groups span nodes" in ln for ln in lines)
