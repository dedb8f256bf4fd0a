"""Gradient accumulation in the training loop: one optimizer step over a batch in micro-batches gives
the gradients of the same step over the whole batch (augmentation and mixup drawn once, on the full
batch, from the same generator state; each micro-batch's loss divided by the full batch size)."""

from __future__ import annotations

import torch

from helix_sweep.config import ModelConfig, TrainConfig, TrialSpec
from helix_sweep.training.loop import build, train_step

B, TOKENS, CLASSES = 8, 24, 5


def spec(micro_batch: int | None, pattern: str = "MMAM") -> TrialSpec:
    return TrialSpec(
        key="accum/test/split", experiment="accum", dataset="synth-commands", variant="test",
        pattern=pattern, frontend="raw", clip_seconds=TOKENS * 160 / 16000, num_classes=CLASSES,
        tokens=TOKENS, data_root="/nonexistent",
        model=ModelConfig(d_model=32, d_state=8, expand=2, num_heads=2, attention_impl="naive"),
        # grad_clip out of reach: the step's gradients stay as backward left them, for comparison
        train=TrainConfig(epochs=1, batch_size=B, micro_batch=micro_batch, lr=1e-3, grad_clip=1e9,
                          precision="fp32"),
    )


def one_step(micro_batch: int | None, x, y, gen_seed: int = 7):
    s = spec(micro_batch)
    torch.manual_seed(0)  # same initial weights for every setup
    setup = build(s, CLASSES, n_train=B, world_size=1)
    gen = torch.Generator().manual_seed(gen_seed)  # same augmentation + mixup draws
    loss, correct, _ = train_step(setup, s, x.clone(), y.clone(), gen, CLASSES, s.train.augment, global_step=0)
    # train_step zeroes the gradients at its start, not its end: after it, .grad holds the step's
    grads = {n: p.grad.detach().clone() for n, p in setup.model.named_parameters()}
    return setup, loss, correct, grads


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, TOKENS * 160, generator=g) * 0.1  # (B, T) raw waveform
    y = torch.randint(0, CLASSES, (B,), generator=g)
    s_full, loss_full, correct_full, g_full = one_step(None, x, y)
    s_micro, loss_micro, correct_micro, g_micro = one_step(2, x, y)
    assert s_full.micro_batch == B and s_micro.micro_batch == 2  # the loop honours train.micro_batch

    assert s_full.model.training and spec(None).train.augment.mixup
    assert abs(loss_micro - loss_full) <= 1e-6 * abs(loss_full)
    assert correct_micro == correct_full
    assert g_full.keys() == g_micro.keys() and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_micro[name], g_full[name], rtol=1e-4, atol=1e-7, msg=name)
    # the gradients are not trivially equal: another mixup/augmentation draw changes them
    *_, g_other = one_step(2, x, y, gen_seed=8)
    assert max((g_other[n] - g_full[n]).abs().max().item() for n in g_full) > 1e-3


def test_an_uneven_split_still_divides_by_the_full_batch():
    # micro-batch 3 of 8: chunks 3, 3, 2; each chunk's loss is divided by 8, not by its size
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, TOKENS * 160, generator=g) * 0.1
    y = torch.randint(0, CLASSES, (B,), generator=g)
    *_, g_full = one_step(None, x, y)
    *_, g_micro = one_step(3, x, y)
    for name in g_full:
        torch.testing.assert_close(g_micro[name], g_full[name], rtol=1e-4, atol=1e-7, msg=name)


def _ddp_rank(rank: int, world: int, port: int, out: dict) -> None:
    import os

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        s = spec(micro_batch=2)  # 4 samples per rank: 2 micro-batches
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, TOKENS * 160, generator=g) * 0.1
        y = torch.randint(0, CLASSES, (B,), generator=g)
        half = slice(rank * B // world, (rank + 1) * B // world)
        setups = {}
        for w in (1, world):  # this rank's step alone (its local gradient), then the DDP step
            torch.manual_seed(0)
            setups[w] = build(s, CLASSES, n_train=B, world_size=w)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(setups[w], s, x[half].clone(), y[half].clone(), torch.Generator().manual_seed(7 + rank),
                           CLASSES, s.train.augment, global_step=0)
            calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("gloo:")}
            out[(rank, w)] = {"calls": calls,
                              "grads": [p.grad.clone() for p in setups[w].model.parameters() if p.grad is not None]}
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_once_per_step_not_per_micro_batch():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(2, port, out), nprocs=2, join=True)
    # alone: no collective at all; in DDP: the step's decision (helix_sweep.training.distributed.agree)
    # and one all-reduce of every gradient, once per optimizer step: micro-batches accumulate locally
    assert out[(0, 1)]["calls"] == out[(1, 1)]["calls"] == {}
    assert out[(0, 2)]["calls"] == out[(1, 2)]["calls"] == {"gloo:all_reduce": 2}
    # after it every rank holds the mean of the ranks' local gradients
    for mine, other, alone0, alone1 in zip(out[(0, 2)]["grads"], out[(1, 2)]["grads"], out[(0, 1)]["grads"],
                                           out[(1, 1)]["grads"]):
        assert torch.equal(mine, other)
        torch.testing.assert_close(mine, (alone0 + alone1) / 2, rtol=1e-5, atol=1e-8)
