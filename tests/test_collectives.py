"""Collectives are device-correct by construction: every one minigrpo calls goes through
minigrpo/collectives.py, which puts a tensor where the backend needs it (NCCL: the rank's GPU;
gloo: CPU). NCCL refuses CPU tensors, so a direct `dist.all_reduce(cpu_tensor)` elsewhere is a
crash at step 1 of every GPU run. Checked statically here and, in a two-rank run over gloo, at run
time: every call into torch.distributed from minigrpo code must come from collectives.py."""

import ast
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minigrpo import collectives
from tiny_task import free_port

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_NAMES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single",
    "send", "recv", "isend", "irecv", "monitored_barrier",
}


def test_no_minigrpo_file_but_collectives_calls_a_collective():
    offenders = []
    for path in sorted((ROOT / "minigrpo").rglob("*.py")):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVE_NAMES):
                continue
            target = ast.unparse(node.func.value)  # dist.all_reduce, torch.distributed.barrier, self.group.broadcast
            if target in ("dist", "torch.distributed") or target.lower().endswith("group"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {target}.{node.func.attr}(...)")
    assert not offenders, "collectives outside minigrpo/collectives.py:\n" + "\n".join(offenders)


def test_without_a_process_group_collectives_are_the_identity():
    assert not collectives.active() and collectives.rank() == 0 and collectives.world_size() == 1
    t = torch.tensor([1.0, 2.0])
    out = collectives.all_reduce(t, "max")
    assert out.tolist() == [1.0, 2.0] and out is not t
    assert collectives.all_reduce_scalars([3.0, 4.0]) == [3.0, 4.0]
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    collectives.barrier()


_TWO_RANKS = textwrap.dedent("""
    import os, sys, time, datetime, json
    import torch, torch.distributed as dist
    from minigrpo import collectives
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    out = {}
    t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)], dtype=torch.float64)
    out["sum"] = collectives.all_reduce(t).tolist()
    out["max"] = collectives.all_reduce(t, "max").tolist()
    out["min"] = collectives.all_reduce_scalars([rank + 1.0], "min")
    out["input_unchanged"] = t.tolist()
    out["object"] = collectives.broadcast_object({"from": rank}, src=1)
    collectives.barrier()
    # a side group whose peer never joins the broadcast: a real deadline, not the group's 60 s
    store = dist.TCPStore("127.0.0.1", int(sys.argv[3]), 2, rank == 0, timeout=datetime.timedelta(seconds=60))
    group = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60))
    if rank == 0:
        start = time.monotonic()
        try:
            collectives.broadcast_in(group, torch.zeros(4), 1, 2.0, "a test broadcast")
            out["deadline"] = "no error"
        except TimeoutError as err:
            out["deadline"] = [str(err), time.monotonic() - start]
    collectives.barrier()
    print("RESULT", json.dumps(out), flush=True)
    os._exit(0)  # rank 0's broadcast is still pending in gloo; nothing to tear down
""")


@pytest.mark.process
def test_collectives_over_two_gloo_ranks_and_a_real_broadcast_deadline(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    port, store_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, store_port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    import json

    results = []
    for (stdout, stderr), p in zip(outs, procs):
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[7:]))
    for r in results:
        assert r["sum"] == [3.0, 30.0] and r["max"] == [2.0, 20.0] and r["min"] == [1.0]
        assert r["object"] == {"from": 1}
    assert results[0]["input_unchanged"] == [1.0, 10.0]
    message, waited = results[0]["deadline"]
    assert "a test broadcast did not complete within 2 s" in message
    assert 1.9 < waited < 10.0, waited  # the 2 s deadline, not gloo's 60 s


@pytest.mark.slow
def test_a_two_rank_run_calls_torch_distributed_only_through_collectives(tmp_path):
    """ZeRO-2 (the ZeRO optimizer calls GuardedAdamW's vote), beta > 0, bnpo (its token count),
    evaluation, a checkpoint, the replica check and the signal vote, over 2 gloo ranks, with every
    torch.distributed collective wrapped: a call whose nearest caller outside torch.distributed and
    deepspeed.comm is a minigrpo file other than collectives.py fails the run."""
    from tiny_task import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(ROOT / "tests" / "tiny_task.py"), str(model), str(tmp_path / "out"), "--audit-collectives",
           "rollout=torch", "max_steps=2", "beta=0.04", "loss_type=bnpo", "eval_steps=1", "save_steps=2",
           f"deepspeed={ROOT / 'recipes' / 'deepspeed_zero2.json'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[audit] collectives checked:" in proc.stdout
    counted = [int(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("[audit] collectives checked:")]
    assert min(counted) > 20, counted  # the wrapper really saw the run's collectives
