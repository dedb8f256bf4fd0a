"""Multi-worker trials on a GPU, with NCCL (skipped without CUDA; benchmarks/gpu_session.sh runs them
on a lent GPU). One GPU cannot host a 2-rank NCCL group (NCCL refuses two ranks on one device), so
the 2-rank behaviour is tested on gloo (tests/test_ddp.py); here a 1-rank NCCL group shows the
checkpoint's RNG gather on a real NCCL group and a 1-worker trial's checkpoints and resume on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from test_ddp import _free_port, plan_spec, results, run_group, with_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory):
    return plan_spec(tmp_path_factory.mktemp("ddp-gpu"))


@pytest.mark.timeout(120)
def test_rng_gather_on_an_nccl_group():
    """What the checkpoint's gather does under NCCL: a CPU tensor fails (the old _snapshot), the same
    state on the device collective_device picks goes through and comes back unchanged."""
    import os

    import torch.distributed as dist

    from helix_sweep.training.distributed import collective_device

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        state = torch.Generator().manual_seed(5).get_state()  # a CPU ByteTensor
        where = collective_device(str(dist.get_backend()), torch.device("cuda", 0))
        assert where.type == "cuda"
        gathered = [torch.empty_like(state, device=where)]
        dist.all_gather(gathered, state.to(where))
        assert torch.equal(gathered[0].cpu(), state)
        with pytest.raises(Exception):  # NCCL has no CPU tensors
            dist.all_gather([torch.empty_like(state)], state)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_one_worker_nccl_trial_checkpoints_mid_epoch_and_resumes_after_a_kill(base_spec, tmp_path):
    spec = with_train(base_spec, epochs=2, checkpoint_minutes=0.0,  # a checkpoint after every step
                         inject={"kill_at_step": 9, "kill_marker": str(tmp_path / "killed")})
    codes = run_group(spec, tmp_path / "run", tmp_path / "killed-out", world=1, backend="nccl")
    assert codes == [-9] and (tmp_path / "killed.9").exists(), codes
    assert run_group(spec, tmp_path / "run", tmp_path / "out", world=1, backend="nccl") == [0]
    [r] = results(tmp_path / "out", world=1)
    assert r["resumed_at"] == [1, 3, 9]  # mid epoch 2, from the checkpoint after step 9
    [end] = r["finished"]
    assert end["status"] == "finished" and [e["epoch"] for e in end["history"]] == [1, 2]
    assert end["global_step"] == 12  # one worker: 6 steps an epoch
    assert all(torch.isfinite(p).all() for p in r["params"])
