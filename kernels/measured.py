"""The measured warmup in the kernels: its factor, and the per-tensor sums after a launch.

A step launch with ``MEASURED`` set multiplies its rate by :func:`measured_factors` of the
group's sums (added up by the launcher from the tensors' ``relative_update`` entries before the
launch, ``adawarm.state.group_measurement``), and each of its programs writes its block's part
of those sums to a scratch of ``PARTS`` floats per program: ``(update_sq, param_sq)``, the move
at rate 1 and the old values, and with the cap's release (``RELEASE``, AdaWarm's) also
``(grad_dot_direction, grad_sq, direction_sq)``. :func:`launch_measured_sums` then adds each
tensor's parts up, in order, into its entry, and writes there the release the launch applied:
one program per tensor, in a second launch on the same stream, so every part is written before
it is read and the sums are the same at every run (no atomics). The math is
``adawarm.schedule.measured_factors``', which the tests check this against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adawarm.kernels.common import float_bits, from_bits
from adawarm.schedule import ALIGNMENT_GAIN, ALIGNMENT_TARGET

_ALIGNMENT_GAIN = tl.constexpr(ALIGNMENT_GAIN)
_ALIGNMENT_TARGET = tl.constexpr(ALIGNMENT_TARGET)
# The parts of a block: the cap's two, and with its release the alignment's three more.
CAP_PARTS = 2
RELEASE_PARTS = 5
_CAP_PARTS = tl.constexpr(CAP_PARTS)


@triton.jit
def measured_factor(rate, update_sq, param_sq, cap):
    """``min(1, cap / rho)`` with ``rho = rate sqrt(update_sq / param_sq)``; 1 where ``rho`` is
    0 or the norm is (fp64 scalars)."""
    safe_param_sq = tl.where(param_sq > 0.0, param_sq, 1.0)
    rho = tl.where(param_sq > 0.0, rate * tl.sqrt(update_sq / safe_param_sq), 0.0)
    safe_rho = tl.where(rho > 0.0, rho, 1.0)
    return tl.where(rho > 0.0, tl.minimum(1.0, cap / safe_rho), 1.0)


@triton.jit
def released_factor(released, grad_dot_direction, grad_sq, direction_sq, cap_factor):
    """``adawarm.schedule.released_factor`` in fp32, the precision of its sums and of the
    release an entry keeps (fp64 took the sm_90 step past its budget of fp64 instructions,
    tests/machine_code.py): the norms' product from their square roots, which cannot overflow
    where the sums did not. ``cap_factor`` is fp64, the result fp32."""
    norms = tl.sqrt(grad_sq) * tl.sqrt(direction_sq)
    alignment = grad_dot_direction / tl.where(norms > 0.0, norms, 1.0)
    grown = tl.minimum(1.0, released * tl.exp((alignment - _ALIGNMENT_TARGET) * _ALIGNMENT_GAIN))
    kept = tl.where(norms > 0.0, grown, released)
    return tl.where(released == 0.0, cap_factor.to(tl.float32), kept)


@triton.jit
def measured_factors(rate, sums_ptr, cap, RELEASE: tl.constexpr):
    """``adawarm.schedule.measured_factors`` of the group's sums at ``sums_ptr`` (fp32; six
    with ``RELEASE``, else two): the factor (fp64) and the release (fp64; 0 without one)."""
    factor = measured_factor(
        rate, tl.load(sums_ptr).to(tl.float64), tl.load(sums_ptr + 1).to(tl.float64), cap
    )
    released = factor * 0.0
    if RELEASE:
        released = released_factor(
            tl.load(sums_ptr + 5).to(tl.float32),
            tl.load(sums_ptr + 2).to(tl.float32),
            tl.load(sums_ptr + 3).to(tl.float32),
            tl.load(sums_ptr + 4).to(tl.float32),
            factor,
        ).to(tl.float64)
        factor = tl.maximum(factor, released)
    return factor, released


@triton.jit
def apply_measured_factor(
    rate, moving_rate, group_sums_ptr, cap_bits, factor_ptr, released_ptr, RELEASE: tl.constexpr
):
    """``rate`` (fp64) times the factor of :func:`measured_factors` of the group's sums at
    ``moving_rate`` (the rate the measured tensors' share moves at); the launch's first program
    writes the factor to ``factor_ptr`` (fp32), for logging without a host sync, and with
    ``RELEASE`` the release to ``released_ptr`` (fp32), for the sums kernel to record. A step
    calls this first: values loaded before its fp64 division and square root, whose subroutine
    calls ptxas saves live registers around, were spilled in sm_90 variants."""
    factor, released = measured_factors(moving_rate, group_sums_ptr, from_bits(cap_bits), RELEASE)
    if tl.program_id(0) == 0:
        tl.store(factor_ptr, factor.to(tl.float32))
        if RELEASE:
            tl.store(released_ptr, released.to(tl.float32))
    return rate * factor


@triton.jit
def block_sum(values, mask, FULL: tl.constexpr):
    """A block's sum of ``values`` (fp32); a ``FULL`` block has no masked lanes, others hold
    whatever the masked load left there."""
    if FULL:
        total = tl.sum(values, axis=0)
    else:
        total = tl.sum(tl.where(mask, values, 0.0), axis=0)
    return total


@triton.jit
def alignment_parts(grad, exp_avg, exp_avg_sq, eps, mask, FULL: tl.constexpr):
    """A block's ``(g . d, ||g||^2, ||d||^2)``, ``d = m / (sqrt(v) + eps)`` of the moments
    before the step's update (``adawarm.schedule.released_factor``)."""
    direction = exp_avg / (tl.sqrt(exp_avg_sq) + eps)
    return (
        block_sum(grad * direction, mask, FULL),
        block_sum(grad * grad, mask, FULL),
        block_sum(direction * direction, mask, FULL),
    )


@triton.jit
def store_part(
    partials_ptr, pid, rate, moved_sq, old_sq, dot, grad_sq, direction_sq, PARTS: tl.constexpr
):
    """Program ``pid``'s ``PARTS`` parts of its tensor's sums: the squared move at rate 1, the
    squared old values, then (``RELEASE_PARTS``) the alignment's three. At ``rate`` 0 (fp32,
    the rate the step applied to the tensor) nothing was measured: the move's part is -1, on
    which the sums kernel leaves the tensor's entry as it was."""
    row = partials_ptr + PARTS * pid
    tl.store(row, tl.where(rate > 0.0, moved_sq, -1.0))
    tl.store(row + 1, old_sq)
    if PARTS > _CAP_PARTS:
        tl.store(row + 2, dot)
        tl.store(row + 3, grad_sq)
        tl.store(row + 4, direction_sq)


@triton.jit
def _measured_sums_kernel(
    relative_update_ptrs,
    numels,
    block_starts_of_tensors,
    partials_ptr,
    released_ptr,
    found_inf_ptr,
    HAS_FOUND_INF: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program ``i`` sums the parts of tensor ``i`` (its blocks' ``PARTS`` floats, from its
    first block on) into its ``relative_update`` entry, followed, after the alignment's parts,
    by the release the launch applied. Nothing is written after a skipped step, or where the
    step applied rate 0 (every block of a tensor applies the same rate)."""
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    tensor = tl.program_id(0)
    first = tl.load(block_starts_of_tensors + tensor)
    if tl.load(partials_ptr + PARTS * first) < 0.0:
        return
    blocks = tl.maximum(tl.cdiv(tl.load(numels + tensor), BLOCK), 1)
    entry = tl.load(relative_update_ptrs + tensor).to(tl.pointer_type(tl.float32))
    for slot in tl.static_range(PARTS):
        total = tl.zeros((CHUNK,), dtype=tl.float32)
        for chunk in range(0, blocks, CHUNK):
            index = chunk + tl.arange(0, CHUNK)
            part = partials_ptr + PARTS * (first + index) + slot
            total += tl.load(part, mask=index < blocks, other=0.0)
        tl.store(entry + slot, tl.sum(total, axis=0))
    if PARTS > _CAP_PARTS:
        tl.store(entry + PARTS, tl.load(released_ptr))


# Parts a program of the sums kernel reads at once: a tensor of 2^28 elements has 2^18 blocks
# of 1024, 256 chunks.
SUMS_CHUNK = 1024


def measured_scratch(tables: dict[str, torch.Tensor | int], release: bool) -> dict:
    """What a measured launch adds to its tables: its parts, ``RELEASE_PARTS`` floats per
    program with the cap's release (AdaWarm's), else ``CAP_PARTS``, each tensor's first program,
    and the factor and release the launch applied (written by its first program)."""
    parts = RELEASE_PARTS if release else CAP_PARTS
    block_tensors = tables["block_tensors"]
    device = block_tensors.device
    counts = torch.bincount(block_tensors.long(), minlength=tables["numels"].numel())
    first = torch.cumsum(counts, 0) - counts
    return {
        "partials": torch.zeros(parts * block_tensors.numel(), dtype=torch.float32, device=device),
        "first_blocks": first.to(torch.int64),
        "factor": torch.ones((), dtype=torch.float32, device=device),
        "released": torch.zeros((), dtype=torch.float32, device=device),
        "measured_parts": parts,
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
        tables["released"],
        found_inf if found_inf is not None else tables["numels"],
        HAS_FOUND_INF=found_inf is not None,
        PARTS=tables["measured_parts"],
        BLOCK=tables["block_size"],
        CHUNK=SUMS_CHUNK,
    )


@triton.jit
def _factors_kernel(sums_ptr, out_ptr, lr_bits, cap_bits, WIDTH: tl.constexpr):
    """Write :func:`measured_factors` (factor, release) of each row of ``WIDTH`` group sums
    (tests check it against ``adawarm.schedule.measured_factors``). One program per row."""
    row = tl.program_id(0)
    factor, released = measured_factors(
        from_bits(lr_bits), sums_ptr + WIDTH * row, from_bits(cap_bits), WIDTH > _CAP_PARTS
    )
    tl.store(out_ptr + 2 * row, factor)
    tl.store(out_ptr + 2 * row + 1, released)


def kernel_factors(lr: float, sums: torch.Tensor, cap: float) -> torch.Tensor:
    """The kernel's (factor, release) rows at ``lr`` for group ``sums`` rows (two numbers, the
    cap's, or six, with its release; fp32 as the launcher's, or fp64)."""
    out = torch.empty((sums.shape[0], 2), dtype=torch.float64, device=sums.device)
    _factors_kernel[(sums.shape[0],)](
        sums.contiguous(), out, float_bits(lr), float_bits(cap), WIDTH=sums.shape[1]
    )
    return out
