"""Pieces of the training loop that are easy to get subtly wrong: the epoch averages over
workers and skipped steps, gradient accumulation at the end of an epoch, and what of the
loop's spec Ray Train's controller sees."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks
from torch import nn

from micl.config import Config
from micl.train import (
    EpochSums,
    LoopSpec,
    StepResult,
    TrainState,
    checkpoint_state,
    grouped,
    mix_batches,
    open_spec,
    seal_spec,
    timed,
    train_step,
    unwrap,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sums = EpochSums()
    # Rank 0 applied 3 steps of loss 1; rank 1 applied 1 step of loss 3 (its other steps
    # were skipped as non-finite and must count nowhere).
    for loss in ([1.0, 1.0, 1.0] if rank == 0 else [3.0]):
        sums.add(StepResult(torch.tensor(loss), {"loss_rec": torch.tensor(2 * loss)}, 8, True))
    total = sums.reduce(torch.device("cpu"))
    if rank == 0:
        torch.save({"means": total.means(), "steps": total.steps, "images": total.images}, out)
    dist.destroy_process_group()


def test_the_epoch_loss_averages_applied_steps_over_all_workers(tmp_path):
    out = str(tmp_path / "out.pt")
    run_ranks(_reduce_worker, args=(_free_port(), out))
    got = torch.load(out)
    # 4 applied steps in all: (1 + 1 + 1 + 3) / 4 = 1.5; the objective's metrics likewise.
    assert got["means"] == {"loss": pytest.approx(1.5), "loss_rec": pytest.approx(3.0)}
    assert got["steps"] == 4 and got["images"] == 32


def test_mixed_batches_keep_every_row_once_and_its_columns_together():
    """mix_batches regroups the rows of each window into new batches of the same size: no row
    lost or repeated, each row's columns still belong to one sample, and rows from different
    stream batches meet (the stream's own batches do not come back)."""
    ids = torch.arange(10 * 8)
    stream = [{"sample_id": ids[i:i + 8], "image": ids[i:i + 8, None].repeat(1, 3) * 2}
              for i in range(0, len(ids), 8)]  # 10 batches of 8 neighbouring rows
    out = list(mix_batches(stream, 32, torch.Generator().manual_seed(0)))
    assert [len(b["sample_id"]) for b in out] == [8] * 10
    assert sorted(torch.cat([b["sample_id"] for b in out]).tolist()) == ids.tolist()
    for b in out:
        assert torch.equal(b["image"], b["sample_id"][:, None].repeat(1, 3) * 2)
    windows = [{int(i) // 32 for i in b["sample_id"]} for b in out]
    assert all(len(w) == 1 for w in windows)  # within a window of 32 rows (4 batches) ...
    originals = {frozenset(b["sample_id"].tolist()) for b in stream}
    assert not originals & {frozenset(b["sample_id"].tolist()) for b in out}  # ... mixed
    assert [b["sample_id"].tolist() for b in mix_batches(stream, 0, torch.Generator())] == \
        [b["sample_id"].tolist() for b in stream]  # 0: the stream's order


def test_mixed_batches_do_not_depend_on_the_order_the_stream_delivers():
    """Ray Data delivers a stream's blocks in a varying order; the same rows in a window give
    the same batches whatever that order (seen before: a 96-image run's epoch-1 loss 3.79 or
    3.56 from one run to the next)."""
    ids = torch.arange(6 * 16)
    blocks = [{"sample_id": ids[i:i + 16], "image": ids[i:i + 16] * 3} for i in range(0, 96, 16)]

    def mixed(stream):
        return [b["sample_id"].sort().values.tolist()
                for b in mix_batches(stream, 2048, torch.Generator().manual_seed(7))]

    assert mixed(blocks) == mixed(blocks[::-1]) == mixed([blocks[i] for i in (2, 0, 5, 1, 4, 3)])


def test_no_applied_step_gives_nan_not_zero():
    assert torch.isnan(torch.tensor(EpochSums().means()["loss"]))


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 1)

    def forward(self, batch):
        loss = self.w(batch["image"]).pow(2).mean()
        return loss, {"half": loss.detach() / 2}


def test_accumulation_never_carries_gradients_past_a_step():
    torch.manual_seed(0)
    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [{"image": torch.randn(8, 4)} for _ in range(5)]
    groups = list(grouped(batches, 2))
    assert [len(g) for g in groups] == [2, 2]  # the fifth micro-batch is dropped, not kept
    # One step over two micro-batches = one step on their mean loss (equal sizes).
    reference = Linear()
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    merged = {"image": torch.cat([b["image"] for b in groups[0]])}
    reference(merged)[0].backward()
    ref_opt.step()
    result = train_step(model, opt, groups[0])
    assert result.finite and result.images == 16
    assert all(p.grad is None for p in model.parameters())  # cleared after every step
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_a_non_finite_step_is_not_applied():
    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, opt, [{"image": torch.full((2, 4), float("inf"))}])
    assert not result.finite
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_waits_for_data_are_timed_the_first_apart():
    """data_start_s is the stream's start (the first batch); data_wait_s the waits after it:
    what tells a user whether the accelerator starved for data."""
    def slow_stream():
        for delay in (0.3, 0.05, 0.05, 0.05):
            time.sleep(delay)
            yield {"image": torch.zeros(1)}

    sums = EpochSums()
    assert len(list(timed(slow_stream(), sums))) == 4
    assert 0.3 <= sums.data_start < 0.45
    assert 0.15 <= sums.data_wait < 0.3
    assert sums.data_batches == 4  # the stream's end is no wait for a batch


def test_a_compiled_model_checkpoints_under_its_plain_names():
    """run.compile wraps the module; its checkpoint must load into an uncompiled one."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert unwrap(compiled) is model
    state = checkpoint_state(compiled, torch.optim.SGD(model.parameters(), lr=0.1),
                             Config(), LoopSpec({}, 0, "", "", ""), TrainState())
    assert set(state["model"]) == set(model.state_dict())
    nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).load_state_dict(state["model"])


def test_the_controller_unpickles_the_loop_spec_without_importing_torch():
    """Ray Train's controller unpickles train_loop_config with its other arguments. Sealed, a
    fine-tuning spec (initial weights included) costs it no import of torch or of the loop's
    module, and the workers get the spec back whole."""
    spec = LoopSpec({"optim": {"epochs": 2}}, 64, "/runs/a", "micl-clock-a", "run-id",
                    hooks=(print,))
    sealed = seal_spec((spec, {"weight": torch.ones(3)}))
    opened, weights = open_spec(pickle.loads(pickle.dumps(sealed)))
    assert opened == spec and torch.equal(weights["weight"], torch.ones(3))
    # What a fresh controller process sees: a dict of bytes, whatever it imported before.
    probe = ("import pickle, sys; config = pickle.loads(sys.stdin.buffer.read()); "
             "print(sorted(config), [m for m in ('torch', 'micl', 'micl.train', 'timm') "
             "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], input=pickle.dumps(sealed),
                         capture_output=True, check=True).stdout.decode().strip()
    assert out == "['micl_spec'] []", out
