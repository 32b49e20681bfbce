"""The measured warmup in the kernels: its factor, and the per-tensor sums after a launch.

A step launch with ``MEASURED`` set multiplies its rate by :func:`measured_factor` of the group's
``(update_sq, param_sq)`` sums (summed by the launcher from the tensors' ``relative_update``
entries before the launch), and each of its programs writes its block's part of those sums at
rate 1 to a scratch of two floats per program. :func:`launch_measured_sums` then adds each
tensor's parts up, in order, into its entry: one program per tensor, in a second launch on the
same stream, so every part is written before it is read and the sums are the same at every run
(no atomics). The math is ``adawarm.schedule.measured_factor``'s, which the tests check this
against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adawarm.kernels.common import float_bits, from_bits


@triton.jit
def measured_factor(rate, update_sq, param_sq, cap):
    """``min(1, cap / rho)`` with ``rho = rate sqrt(update_sq / param_sq)``; 1 where ``rho`` is
    0 or the norm is (fp64 scalars)."""
    safe_param_sq = tl.where(param_sq > 0.0, param_sq, 1.0)
    rho = tl.where(param_sq > 0.0, rate * tl.sqrt(update_sq / safe_param_sq), 0.0)
    safe_rho = tl.where(rho > 0.0, rho, 1.0)
    return tl.where(rho > 0.0, tl.minimum(1.0, cap / safe_rho), 1.0)


@triton.jit
def apply_measured_factor(rate, moving_rate, group_sums_ptr, cap_bits, factor_ptr):
    """``rate`` (fp64) times :func:`measured_factor` of the group's sums at ``moving_rate`` (the
    rate the measured tensors' share moves at); the launch's first program writes the factor to
    ``factor_ptr`` (fp32), for logging without a host sync. A step calls this first: values
    loaded before its fp64 division and square root, whose subroutine calls ptxas saves live
    registers around, were spilled in sm_90 variants."""
    factor = measured_factor(
        moving_rate,
        tl.load(group_sums_ptr).to(tl.float64),
        tl.load(group_sums_ptr + 1).to(tl.float64),
        from_bits(cap_bits),
    )
    if tl.program_id(0) == 0:
        tl.store(factor_ptr, factor.to(tl.float32))
    return rate * factor


@triton.jit
def sum_of_squares(values, mask, FULL: tl.constexpr):
    """A block's sum of squares of ``values`` (fp32); a ``FULL`` block has no masked lanes,
    others hold whatever the masked load left there."""
    # over every axis: a block is a row, or rows of 8-bit states' blocks
    if FULL:
        total = tl.sum(values * values, axis=None)
    else:
        total = tl.sum(tl.where(mask, values * values, 0.0), axis=None)
    return total


@triton.jit
def store_part(partials_ptr, pid, moved_sq, old_sq, rate):
    """Program ``pid``'s part of its tensor's sums: ``moved_sq``, the squared move at rate 1,
    and ``old_sq``, of the old values. At ``rate`` 0 (fp32, the rate the step applied to the
    tensor) nothing was measured: the move's part is -1, on which the sums kernel leaves the
    tensor's entry as it was."""
    tl.store(partials_ptr + 2 * pid, tl.where(rate > 0.0, moved_sq, -1.0))
    tl.store(partials_ptr + 2 * pid + 1, old_sq)


@triton.jit
def _measured_sums_kernel(
    relative_update_ptrs,
    numels,
    block_starts_of_tensors,
    partials_ptr,
    found_inf_ptr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program ``i`` sums the parts of tensor ``i`` (its blocks' two floats, from its first
    block on) into its ``relative_update`` entry. Nothing is written after a skipped step, or
    where the step applied rate 0 (every block of a tensor applies the same rate)."""
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    tensor = tl.program_id(0)
    first = tl.load(block_starts_of_tensors + tensor)
    if tl.load(partials_ptr + 2 * first) < 0.0:
        return
    blocks = tl.maximum(tl.cdiv(tl.load(numels + tensor), BLOCK), 1)
    moved_sq = tl.zeros((CHUNK,), dtype=tl.float32)
    old_sq = tl.zeros((CHUNK,), dtype=tl.float32)
    for chunk in range(0, blocks, CHUNK):
        index = chunk + tl.arange(0, CHUNK)
        inside = index < blocks
        part = partials_ptr + 2 * (first + index)
        moved_sq += tl.load(part, mask=inside, other=0.0)
        old_sq += tl.load(part + 1, mask=inside, other=0.0)
    entry = tl.load(relative_update_ptrs + tensor).to(tl.pointer_type(tl.float32))
    tl.store(entry, tl.sum(moved_sq, axis=0))
    tl.store(entry + 1, tl.sum(old_sq, axis=0))


# Parts a program of the sums kernel reads at once: a tensor of 2^28 elements has 2^18 blocks
# of 1024, 256 chunks.
SUMS_CHUNK = 1024


def measured_scratch(tables: dict[str, torch.Tensor | int]) -> dict[str, torch.Tensor]:
    """What a measured launch adds to its tables: two floats per program for the parts, each
    tensor's first program, and the factor the launch applied (written by its first program)."""
    block_tensors = tables["block_tensors"]
    device = block_tensors.device
    counts = torch.bincount(block_tensors.long(), minlength=tables["numels"].numel())
    first = torch.cumsum(counts, 0) - counts
    return {
        "partials": torch.zeros(2 * block_tensors.numel(), dtype=torch.float32, device=device),
        "first_blocks": first.to(torch.int64),
        "factor": torch.ones((), dtype=torch.float32, device=device),
    }


def launch_measured_sums(
    tables: dict[str, torch.Tensor | int], *, found_inf: torch.Tensor | None
) -> None:
    """Write each tensor's ``relative_update`` entry from the parts its blocks left in
    ``tables["partials"]`` (after a measured step launch on the same stream)."""
    _measured_sums_kernel[(tables["numels"].numel(),)](
        tables["relative_update_ptrs"],
        tables["numels"],
        tables["first_blocks"],
        tables["partials"],
        found_inf if found_inf is not None else tables["numels"],
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=tables["block_size"],
        CHUNK=SUMS_CHUNK,
    )


@triton.jit
def _factor_kernel(sums_ptr, out_ptr, lr_bits, cap_bits):
    """Write :func:`measured_factor` of each row ``(update_sq, param_sq)`` (tests check it
    against ``adawarm.schedule.measured_factor``). One program per row."""
    row = tl.program_id(0)
    factor = measured_factor(
        from_bits(lr_bits),
        tl.load(sums_ptr + 2 * row),
        tl.load(sums_ptr + 2 * row + 1),
        from_bits(cap_bits),
    )
    tl.store(out_ptr + row, factor)


def kernel_factors(lr: float, sums: torch.Tensor, cap: float) -> torch.Tensor:
    """The kernel's factors at ``lr`` for fp64 ``sums`` rows ``(update_sq, param_sq)``."""
    out = torch.empty(sums.shape[0], dtype=torch.float64, device=sums.device)
    _factor_kernel[(sums.shape[0],)](sums, out, float_bits(lr), float_bits(cap))
    return out
