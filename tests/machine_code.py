"""Compile the fused kernels ahead of time for NVIDIA GPUs, without one, and read what they became.

Triton's wheels ship ptxas and cuobjdump, so ``triton.compile`` builds real sm_90 / sm_80 machine
code on a CPU-only machine. A variant is one kernel (AdaWarm's step, AdaWarmScheduleFree's step,
or its train/eval switch) with one set of its constexprs, as its launcher would launch it; its
report says how wide every global access is (PTX), how many registers and how much local (spill)
and shared memory a thread uses, and how many fp64 instructions the SASS holds.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import torch

from adawarm.kernels import adawarm_step, common, schedule_free_step
from adawarm.quantization import QUANTIZATION_BLOCK

BLOCK = common.BLOCK_SIZE
# Integer arguments the launcher passes (hyper-parameters as fp64 bit patterns, and counts).
_INT64_ARGS = (
    "lr_bits",
    "beta1_bits",
    "beta2_bits",
    "eps_bits",
    "weight_decay_bits",
    "r_bits",
    "weight_lr_power_bits",
    "weight_bits",
    "cap_bits",
)
# The kernels, by the name a variant gives.
KERNELS = {
    "adamw": adawarm_step._adawarm_step_kernel,
    "schedule-free": schedule_free_step._schedule_free_step_kernel,
    "switch": schedule_free_step._switch_kernel,
}
_INT32_ARGS = ("warmup_steps", "rounding_seed")
_INT32_TABLES = ("block_tensors", "done_counters", "stream_ids")


@dataclass(frozen=True)
class Variant:
    param_dtype: torch.dtype = torch.float32
    state_dtype: torch.dtype = torch.float32
    kahan: bool = False
    stochastic: bool = False  # bf16 parameters stored by stochastic rounding
    # bf16 moments are stored by stochastic rounding, unless rounding_seed=None asks for nearest
    nearest_state: bool = False
    rectify: bool = True
    aligned: bool = True
    flags: bool = False  # maximize, tensor lr, GradScaler's scale and found_inf, all on
    measured: bool = False  # the measured warmup: its factor, and each block's sums
    arch: int = 90
    kernel: str = "adamw"  # a key of KERNELS

    def __str__(self) -> str:
        mode = "kahan" if self.kahan else "stochastic" if self.stochastic else "plain"
        parts = [
            *([] if self.kernel == "adamw" else [self.kernel]),
            f"sm_{self.arch}",
            f"{str(self.param_dtype)[6:]} params",
            f"{str(self.state_dtype)[6:]} moments" + (" to nearest" if self.nearest_state else ""),
            mode,
            "rectify" if self.rectify else "no rectify",
            "aligned" if self.aligned else "unaligned",
        ]
        extras = (["all flags"] if self.flags else []) + (["measured"] if self.measured else [])
        return ", ".join(parts + extras)

    @property
    def stochastic_state(self) -> bool:
        return self.state_dtype in (torch.bfloat16, torch.uint8) and not self.nearest_state

    @property
    def eight_bit(self) -> bool:
        return self.state_dtype == torch.uint8

    @property
    def first_state_dtype(self) -> torch.dtype:
        """The first state's dtype: the schedule-free step's ``z`` stays fp32 beside an 8-bit
        ``exp_avg_sq``."""
        return torch.float32 if self.eight_bit and self.kernel != "adamw" else self.state_dtype

    def constexprs(self) -> dict:
        param_align, state_align = common.vector_alignments(
            self.param_dtype, self.first_state_dtype
        )
        if self.kernel == "switch":
            return {
                "PARAM_DTYPE": common.TRITON_DTYPES[self.param_dtype],
                "STATE_DTYPE": common.TRITON_DTYPES[self.state_dtype],
                "KAHAN": self.kahan,
                "STOCHASTIC_PARAM": self.stochastic,
                "ALIGNED": self.aligned,
                "PARAM_ALIGN": param_align,
                "STATE_ALIGN": state_align,
                "BLOCK": BLOCK,
            }
        constexprs = {
            "PARAM_DTYPE": common.TRITON_DTYPES[self.param_dtype],
            "STATE_DTYPE": common.TRITON_DTYPES[self.first_state_dtype],
            "KAHAN": self.kahan,
            "STOCHASTIC_PARAM": self.stochastic,
            "STOCHASTIC_STATE": self.stochastic_state,
            "RECTIFY": self.rectify,
            "MAXIMIZE": self.flags,
            "LR_FROM_TENSOR": self.flags,
            "HAS_GRAD_SCALE": self.flags,
            "HAS_FOUND_INF": self.flags,
            "ALIGNED": self.aligned,
            "PARAM_ALIGN": param_align,
            "STATE_ALIGN": state_align,
            "BLOCK": BLOCK,
        }
        constexprs["MEASURED"] = self.measured  # both steps (the switch returned above)
        if self.kernel == "schedule-free":
            constexprs["SECOND_STATE_DTYPE"] = common.TRITON_DTYPES[self.state_dtype]
        return constexprs

    def expected_vector_accesses(self) -> Counter:
        """The vector accesses of the full-block path, as PTX names them: per streamed array,
        ``elements per thread / elements per access`` accesses of 16 (``v4.b32``) or 8
        (``v2.b32``) bytes."""
        first_state = self.first_state_dtype
        param_align, state_align = common.vector_alignments(self.param_dtype, first_state)
        elements = BLOCK // (common.default_num_warps(self.aligned) * 32)
        per_access = common.VECTOR_BYTES // max(
            torch.empty((), dtype=d).element_size() for d in (self.param_dtype, first_state)
        )
        if self.kernel == "switch":
            loads, stores = [param_align, state_align], [param_align]  # p, z; p
        elif self.eight_bit and self.kernel == "schedule-free":
            # p, g, z (fp32); p, z: the codes take 4 bytes an access, which PTX names no vector
            loads, stores = [param_align, param_align, state_align], [param_align, state_align]
        elif self.eight_bit and state_align < 8:  # codes 4 bytes an access: no vector in PTX
            loads, stores = [param_align, param_align], [param_align]
        else:  # the steps: param, grad and the two states; param and the two states
            loads = [param_align, param_align, state_align, state_align]
            stores = [param_align, state_align, state_align]
        if self.kahan:
            loads.append(param_align)
            stores.append(param_align)
        expected = Counter()
        for kind, widths in (("ld", loads), ("st", stores)):
            for width in widths:
                expected[f"{kind}.global.v{width // 4}.b32"] += elements // per_access
        return expected


@dataclass
class MachineCode:
    variant: Variant
    ptx_accesses: Counter
    sass: Counter
    registers: int
    stack_bytes: int  # the call frame: registers saved across a subroutine call
    local_bytes: int
    shared_bytes: int
    layout_conversions: int
    fp64_instructions: int
    notes: list[str] = field(default_factory=list)


def _signature(variant: Variant) -> tuple[dict, dict]:
    function = KERNELS[variant.kernel]
    constexprs = variant.constexprs()
    signature = {}
    for name in function.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INT64_ARGS:
            signature[name] = "i64"
        elif name in _INT32_ARGS:
            signature[name] = "i32"
        elif name in _INT32_TABLES:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):  # lr, GradScaler's scale and found_inf
            signature[name] = "*fp32"
        else:  # the int64 tables of pointers, element counts and block starts
            signature[name] = "*i64"
    return signature, constexprs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_variant(variant: Variant) -> MachineCode:
    """Compile ``variant`` for its GPU architecture and read its PTX, SASS and resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = _signature(variant)
    # Table tensors are fresh torch allocations: the JIT marks such pointers 16-byte aligned.
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, kind in enumerate(signature.values())
        if kind.startswith("*")
    }
    source = ASTSource(
        fn=KERNELS[variant.kernel], signature=signature, constexprs=constexprs, attrs=attrs
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", variant.arch, 32),
        options={
            "num_warps": common.default_num_warps(variant.aligned),
            "enable_fp_fusion": common.ENABLE_FP_FUSION,
        },
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    resources = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", usage)
    opcodes = Counter(
        re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, re.M)
    )
    ttgir = compiled.asm["ttgir"]
    return MachineCode(
        variant=variant,
        ptx_accesses=Counter(re.findall(r"\b((?:ld|st)\.global[.\w]*)", compiled.asm["ptx"])),
        sass=opcodes,
        registers=int(resources.group(1)),
        stack_bytes=int(resources.group(2)),
        shared_bytes=int(resources.group(3)),
        local_bytes=int(resources.group(4)),
        layout_conversions=tile_conversions(ttgir),
        fp64_instructions=sum(n for op, n in opcodes.items() if re.match(r"D[A-Z]", op)),
    )


def tile_conversions(ttgir: str) -> int:
    """Layout conversions (and shared-memory allocations) of tensors of more than
    ``BLOCK // QUANTIZATION_BLOCK`` elements: a block's tiles, which would go through shared
    memory. The 8-bit states' per-row scales (4 a block) are converted to the layout of their
    store, and their maxima reduced across warps: small, and inherent to block-wise scales."""
    count = 0
    for line in re.findall(r".*(?:convert_layout|local_alloc).*", ttgir):
        shape = re.search(r"tensor<((?:\d+x)*)", line)
        elements = 1
        for size in shape.group(1).rstrip("x").split("x") if shape and shape.group(1) else []:
            elements *= int(size)
        if elements > BLOCK // QUANTIZATION_BLOCK:
            count += 1
    return count


# fp64 instructions a program may hold: the schedule of its tensor's step, in scalar registers,
# is ~125 on sm_90 for AdaWarm's step (powers by repeated squaring, RAdam's rho_t) and 218 for
# the schedule-free step (its averaging weight adds two fp64 exp2/log2 pairs); the switch has
# none. A per-element fp64 op would add at least one instruction per element a thread handles (8
# here) for each op.
MAX_FP64_INSTRUCTIONS = {"adamw": 160, "schedule-free": 260, "switch": 0}
MAX_REGISTERS = 128  # 16 warps per SM at 128; the representative variants use 40-70
# 8-bit variants: the registers a thread saves to its call frame around subroutine calls (the
# schedule's fp64 division, fp32 square roots), once a program (not per element). 153 of the 576
# 8-bit variants save 8-32 bytes with triton 3.9, 103 save 8-40 with 3.6; none spills to local
# memory. The others save nothing.
MAX_EIGHT_BIT_STACK_BYTES = 40


def problems(code: MachineCode) -> list[str]:
    """What ``code`` lacks of a memory-bound step at the roofline; empty when nothing."""
    found = []
    variant = code.variant
    if variant.aligned:
        vectors = Counter(
            {k: v for k, v in code.ptx_accesses.items() if re.search(r"\.v[24]\.", k)}
        )
        expected = variant.expected_vector_accesses()
        if vectors != expected:
            found.append(f"vector accesses {dict(vectors)}, expected {dict(expected)}")
        sass_128 = code.sass["LDG.E.128"], code.sass["STG.E.128"]
        ptx_128 = expected["ld.global.v4.b32"], expected["st.global.v4.b32"]
        if sass_128 != ptx_128:
            found.append(f"SASS 128-bit loads/stores {sass_128}, expected {ptx_128}")
    saves = sum(n for op, n in code.sass.items() if op.startswith(("LDL", "STL")))
    if code.local_bytes:
        found.append(f"spills: {code.local_bytes} bytes of local memory")
    elif saves and not (variant.eight_bit and code.stack_bytes <= MAX_EIGHT_BIT_STACK_BYTES):
        found.append(
            f"stack traffic: {saves} loads and stores, {code.stack_bytes} bytes of call frame"
        )
    if code.registers > MAX_REGISTERS:
        found.append(f"{code.registers} registers, expected <= {MAX_REGISTERS}")
    if code.layout_conversions:
        found.append(f"{code.layout_conversions} layout conversions through shared memory")
    limit = MAX_FP64_INSTRUCTIONS[variant.kernel]
    if code.fp64_instructions > limit:
        found.append(f"{code.fp64_instructions} fp64 instructions, expected <= {limit} a program")
    return found
