"""AdaWarm and AdaWarmScheduleFree under torch.distributed on CPU: 2 gloo ranks on localhost
against 1 process."""

from __future__ import annotations

import socket
import time

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp
from helpers import assert_close

from adawarm.quantization import FIRST_MOMENT, SECOND_MOMENT, quantize

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)
WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, tmp_path, *extra, attempts=3, world=WORLD):
    """Run ``worker`` on ``world`` ranks. Retried only for two failures outside AdaWarm: the
    rendezvous port taken between :func:`free_port` and the bind (torch's own distributed tests
    retry the same way), and a rank aborted by torch's C++ runtime ("terminate called without
    an active exception"), seen in about one run in ten of the checkpoint test on the 2-core CI
    machine and never reproduced in a plain script; the ranks print their threads' stacks then.
    """
    out = str(tmp_path / "result.pt")
    for attempt in range(attempts):
        try:
            join_within(
                mp.spawn(worker, args=(world, free_port(), out, *extra), nprocs=world, join=False)
            )
            break
        except mp.ProcessRaisedException as error:
            if "Address already in use" not in str(error) or attempt == attempts - 1:
                raise
        except mp.ProcessExitedException as error:
            if error.signal_name != "SIGABRT" or attempt == attempts - 1:
                raise
    return torch.load(out)


def join_within(context, seconds: float = 120.0) -> None:
    """Join the ranks, failing (not hanging CI) if they take longer than ``seconds``; a run of
    this file takes ~22 s on the 2-core CI machine."""
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed ranks still running after {seconds:.0f} s")


def assert_matches_single_process(params, kind):
    for index, (param, expected) in enumerate(
        zip(params, workers.single_process_reference(kind), strict=True)
    ):
        assert_close(param, expected, torch.float32, f"parameter {index}")


KINDS = list(workers.OPTIMIZERS)


EIGHT_BIT_KINDS = list(workers.EIGHT_BIT_OPTIMIZERS)


@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        *((kind, backend) for kind in KINDS + list(workers.MEASURED_OPTIMIZERS)
          for backend in ("torch", "triton")),
        # every rank codes the same moments from the same all-reduced gradients and streams
        *((kind, "torch") for kind in EIGHT_BIT_KINDS),
    ],
)  # fmt: skip
def test_ddp_on_two_ranks_matches_one_rank_on_the_whole_batch(tmp_path, kind, backend):
    # DDP's ranks hold the same parameters and all-reduced gradients, so each measures what one
    # rank on the whole batch does: the measured warmup needs no reduction of its own.
    assert_matches_single_process(spawn(workers.ddp_worker, tmp_path, kind, backend), kind)


@pytest.mark.parametrize("kind", KINDS + list(workers.MEASURED_OPTIMIZERS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fsdp2_sharded_training_matches_one_rank(tmp_path, kind, backend):
    # The measured warmup's sums of each shard are added up over the ranks (adawarm.shards):
    # every rank measures the whole tensors, as one rank does.
    assert_matches_single_process(spawn(workers.fsdp_worker, tmp_path, kind, backend), kind)


@pytest.mark.parametrize("kind", EIGHT_BIT_KINDS)
def test_fsdp2_with_8_bit_moments_blocks_each_shard_and_trains_as_one_rank(tmp_path, kind):
    # Each rank codes its shard in blocks of its own (the worker checks their scales), with
    # streams keyed by its local elements, so the codes differ from one rank's on the whole
    # tensors by up to a code (about 1.4 % of a block's largest moment): over 14 steps at lr
    # 0.01 that moves a parameter by at most 14 * 0.01 * 0.014 ~ 2e-3 (seen: 1.1e-3).
    params = spawn(workers.fsdp_worker, tmp_path, kind, "torch")
    for index, (param, expected) in enumerate(
        zip(params, workers.single_process_reference(kind), strict=True)
    ):
        torch.testing.assert_close(param, expected, rtol=0, atol=2e-3, msg=f"parameter {index}")


@pytest.mark.parametrize("kind", KINDS + list(workers.MEASURED_OPTIMIZERS) + EIGHT_BIT_KINDS)
def test_distributed_checkpoint_mid_warmup_resumes_exactly(tmp_path, kind):
    result = spawn(workers.checkpoint_worker, tmp_path, kind, str(tmp_path / "checkpoint"))
    assert result["steps"] == {float(workers.STEPS)}
    for resumed, uninterrupted in zip(result["resumed"], result["uninterrupted"], strict=True):
        assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("kind", EIGHT_BIT_KINDS)
def test_8_bit_moments_saved_on_two_ranks_resume_on_one_coded_by_its_blocks(tmp_path, kind):
    # The checkpoint holds sharded 8-bit moments as their values; one rank loads them as the
    # nearest codes of its own blocks (the whole tensors), and trains on.
    directory = str(tmp_path / "checkpoint")
    saved = spawn(workers.reshard_save_worker, tmp_path, kind, directory)
    result = spawn(workers.reshard_load_worker, tmp_path, kind, directory, world=1)
    assert result["steps"] == {float(workers.STEPS)}
    for index, (before, after) in enumerate(zip(saved, result["loaded"], strict=True)):
        for key, code in (("exp_avg", FIRST_MOMENT), ("exp_avg_sq", SECOND_MOMENT)):
            if key not in before:
                continue  # schedule-free keeps no exp_avg
            codes, scales = quantize(before[key], code)
            assert torch.equal(after[key], codes), (index, key)
            assert torch.equal(after[f"{key}_scales"], scales), (index, key)
