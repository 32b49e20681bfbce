"""The Triton kernels' machine code, compiled for sm_90 and sm_80 on this CPU machine: 128-bit
accesses for every streamed array on the full-block path (8-bit codes: 4 a 32-bit access), no
spills, bounded registers, no layout conversions of a block's tiles through shared memory, fp64
only per program.

By default a representative set of variants; ``MACHINE_CODE_VARIANTS=all pytest
tests/test_kernel_machine_code.py`` compiles every variant the backends can launch (CI runs it).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from machine_code import Variant, compile_variant, problems

REPRESENTATIVE = [
    Variant(),
    Variant(rectify=False, flags=True),
    Variant(param_dtype=torch.bfloat16),  # mixed width: 8-byte parameter accesses
    Variant(param_dtype=torch.bfloat16, state_dtype=torch.bfloat16, kahan=True),
    Variant(param_dtype=torch.bfloat16, stochastic=True),
    Variant(state_dtype=torch.bfloat16),  # stochastic rounding of the moments
    # the most hashing: stochastic rounding of the parameters and both moments
    Variant(param_dtype=torch.bfloat16, state_dtype=torch.bfloat16, stochastic=True),
    Variant(aligned=False),
    Variant(arch=80),
    # 8-bit moments: codes, a table search and block maxima; with the most else live
    Variant(state_dtype=torch.uint8),
    Variant(
        param_dtype=torch.bfloat16,
        state_dtype=torch.uint8,
        stochastic=True,
        flags=True,
        measured=True,
        arch=80,
    ),
    Variant(measured=True),
    # the measured warmup with the most else live: every flag, stochastic rounding, sm_80
    Variant(param_dtype=torch.bfloat16, stochastic=True, flags=True, measured=True, arch=80),
    Variant(kernel="schedule-free"),
    Variant(
        kernel="schedule-free",
        param_dtype=torch.bfloat16,
        state_dtype=torch.bfloat16,
        stochastic=True,
        flags=True,
    ),
    Variant(kernel="schedule-free", param_dtype=torch.float16, kahan=True, arch=80),
    Variant(kernel="schedule-free", measured=True),
    Variant(kernel="schedule-free", state_dtype=torch.uint8),  # an 8-bit exp_avg_sq, fp32 z
    Variant(
        kernel="schedule-free",
        param_dtype=torch.bfloat16,
        state_dtype=torch.uint8,
        stochastic=True,
        flags=True,
        measured=True,
        arch=80,
    ),
    Variant(
        kernel="schedule-free",
        param_dtype=torch.bfloat16,
        state_dtype=torch.bfloat16,
        stochastic=True,
        flags=True,
        measured=True,
        arch=80,
    ),
    Variant(kernel="switch"),
    Variant(kernel="switch", param_dtype=torch.bfloat16, kahan=True),
]


def every_variant() -> list[Variant]:
    """Every constexpr variant the backends launch, for sm_90 and sm_80: both steps (with and
    without the measured warmup), and the switch (which has no schedule, flags or state
    stores)."""
    variants = []
    for kernel, param, state, rectify, aligned, flags, arch in itertools.product(
        ("adamw", "schedule-free", "switch"),
        (torch.float32, torch.bfloat16, torch.float16),
        (torch.float32, torch.bfloat16, torch.uint8),
        (True, False),
        (True, False),
        (False, True),
        (90, 80),
    ):
        if kernel == "switch" and (not rectify or flags):
            continue
        if state == torch.uint8 and kernel == "switch":  # the switch reads z, never 8-bit
            continue
        modes = [{}]
        if state != torch.float32 and kernel != "switch":
            modes.append({"nearest_state": True})  # rounding_seed=None
        if param != torch.float32:
            modes.append({"kahan": True})
        if param == torch.bfloat16:
            modes.append({"stochastic": True})
        for mode, measured in itertools.product(modes, (False, True)):
            if measured and kernel == "switch":
                continue
            variants.append(Variant(param, state, rectify=rectify, aligned=aligned, flags=flags,
                                    arch=arch, kernel=kernel, measured=measured,
                                    **mode))  # fmt: skip
    return variants


VARIANTS = every_variant() if os.environ.get("MACHINE_CODE_VARIANTS") == "all" else REPRESENTATIVE


@pytest.fixture(scope="module")
def machine_code():
    # This session runs Triton's interpreter (conftest.py), under which nothing compiles; the
    # workers are fresh processes started without it. Compiling takes seconds a variant, and
    # both cores of the CI machine share the work.
    interpreter = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(
            max(1, min(2, os.cpu_count() or 1)), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            return dict(zip(VARIANTS, pool.map(compile_variant, VARIANTS), strict=True))
    finally:
        if interpreter is not None:
            os.environ["TRITON_INTERPRET"] = interpreter


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_the_kernel_compiles_to_what_a_memory_bound_step_needs(machine_code, variant):
    code = machine_code[variant]
    print(
        f"{variant}: {code.registers} registers, {code.fp64_instructions} fp64 instructions, "
        f"{code.sass['LDG.E.128']} LDG.E.128, {code.sass['STG.E.128']} STG.E.128"
    )
    assert problems(code) == []


def test_the_check_fails_for_a_kernel_that_loses_vectorization(machine_code):
    unaligned = machine_code[Variant(aligned=False)]
    # The same code judged as if the launcher had promised alignment: no vector access.
    as_if_aligned = type(unaligned)(**{**vars(unaligned), "variant": Variant()})
    assert any("vector accesses" in problem for problem in problems(as_if_aligned))
    assert unaligned.sass["LDG.E.128"] == 0 and unaligned.sass["STG.E.128"] == 0
