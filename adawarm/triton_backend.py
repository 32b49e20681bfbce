"""The Triton backend: groups tensors, keeps their pointer tables, launches ``adawarm.kernels``.

One launch per step per group of tensors sharing (device, parameter dtype); the moments of a
group share one dtype (fp32 or bf16).
The tables of data pointers live on the device and are cached per group: they are rebuilt only
when a pointer changes (gradients set to None and reallocated, ``load_state_dict``,
``add_param_group``), so a step with warm tables does no host-to-device copy and no host sync,
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adawarm.quantization import block_count, scales_key
from adawarm.rounding import rounds_stochastically
from adawarm.schedule import MEASURED_CAP
from adawarm.tensor_lists import DTYPE, IS_CPU, IS_CUDA, select

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DTYPE_SET = frozenset(KERNEL_DTYPES)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # uint8: 8-bit codes
# The lists of a launch that hold state tensors (one dtype per launch), and its scalar lists.
STATE_LISTS = ("exp_avg", "exp_avg_sq", "z")
SCALAR_LISTS = {"step": torch.float32, "weight_sum": torch.float64, "lr_max": torch.float64}


@functools.cache
def _kernels():
    """The kernel module, imported on first use (importing triton is slow and optional)."""
    from adawarm.kernels import adawarm_step

    return adawarm_step


@functools.cache
def _measured_kernels():
    from adawarm.kernels import measured

    return measured


@functools.cache
def _common():
    from adawarm.kernels import common

    return common


@functools.cache
def _schedule_free_kernels():
    from adawarm.kernels import schedule_free_step

    return schedule_free_step


# Whether triton is installed, found without importing it (importing triton is slow and
# optional); a constant, so torch.compile traces it as one.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
NOT_INSTALLED = (
    "triton is not installed; CUDA builds of torch bring it (on Linux, `pip install triton` "
    "adds it to other builds), or pass backend='torch'"
)
INTERPRETER_TOO_LATE = (
    "TRITON_INTERPRET=1 was set after triton was imported (torch.compile and other libraries "
    "import it), so its interpreter is off; set it before anything imports triton, e.g. first "
    "thing in the script or in conftest.py"
)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreted(function: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(function, InterpretedFunction)


def interpreter_problem() -> str | None:
    """Why CPU tensors cannot run under Triton's interpreter now, or None when they can.

    Triton decides at import whether ``@triton.jit`` functions (its own and the kernel's) are
    interpreted, so the variable must be set before the first import; a kernel launched with
    half of them compiled fails midway.
    """
    if not interpreter_enabled():
        return (
            "CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 set before triton is "
            "imported"
        )
    triton = sys.modules.get("triton")
    kernels = sys.modules.get("adawarm.kernels.adawarm_step")
    if (triton is not None and not _interpreted(triton.language.cdiv)) or (
        kernels is not None and not _interpreted(kernels._adawarm_step_kernel)
    ):
        return INTERPRETER_TOO_LATE
    return None


def unservable_reason(params: Sequence[Tensor]) -> str | None:
    """Why the Triton backend cannot update these parameters, or None when it can."""
    if not TRITON_INSTALLED:
        return NOT_INSTALLED
    if torch.compiler.is_compiling():
        # Traced once; the checks become guards. Dynamo cannot call attrgetter on tensors.
        return _first_unservable(params)
    # This runs every step: whole-list passes first (~40 ns a tensor each), the loop that names
    # the offending parameter only when one of them fails.
    devices_served = all(map(IS_CUDA, params)) or (
        all(map(IS_CPU, params)) and interpreter_problem() is None
    )
    if (
        devices_served
        and set(map(DTYPE, params)) <= _KERNEL_DTYPE_SET
        and all(map(Tensor.is_contiguous, params))
    ):
        return None
    return _first_unservable(params)


def _first_unservable(params: Sequence[Tensor]) -> str | None:
    for param in params:
        if param.is_cpu:
            problem = interpreter_problem()
            if problem is not None:
                return f"a parameter is on the CPU: {problem}"
        elif not param.is_cuda:
            return f"a parameter is on {param.device}; the Triton kernels need CUDA tensors"
        if param.dtype not in KERNEL_DTYPES:
            return f"a parameter has dtype {param.dtype}; the Triton kernels take {KERNEL_DTYPES}"
        if not param.is_contiguous():
            return (
                f"a parameter of shape {tuple(param.shape)} is not contiguous; the Triton "
                "kernels walk contiguous memory"
            )
    return None


@dataclass
class PointerTables:
    """Device tables for one launch group and the host pointers they were built from."""

    signature: tuple[tuple[int, ...], ...]
    tensors: dict[str, Tensor | int]


def _launch_groups(
    params: Sequence[Tensor], states: Sequence[Tensor]
) -> list[tuple[torch.device, torch.dtype, list[int] | None]]:
    """(device, dtype, indices into ``params`` or None for all of them) of each launch: one per
    device, parameter dtype and dtype of ``states`` (8-bit states are for large tensors only).

    One pass over each attribute decides the common case, a single group, without grouping
    tensor by tensor.
    """
    dtypes = list(map(DTYPE, params))
    state_dtypes = list(map(DTYPE, states))
    device_indices = list(map(Tensor.get_device, params))  # an int: cheaper than .device
    if len(set(dtypes)) == 1 and len(set(device_indices)) == 1 and len(set(state_dtypes)) == 1:
        return [(params[0].device, dtypes[0], None)]
    groups: dict[tuple[int, torch.dtype, torch.dtype], list[int]] = defaultdict(list)
    for index, key in enumerate(zip(device_indices, dtypes, state_dtypes, strict=True)):
        groups[key].append(index)
    return [(params[indices[0]].device, key[1], indices) for key, indices in groups.items()]


def _data_pointers(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(map(Tensor.data_ptr, tensors))  # map: ~2x cheaper than a generator per tensor


def _build_tables(
    lists: dict[str, Sequence[Tensor]],
    pointers: tuple[tuple[int, ...], ...],
    device: torch.device,
    stream_ids: list[int] | None = None,
) -> dict[str, Tensor | int]:
    """Check the tensors of one launch group and put their tables on the device.

    ``stream_ids`` numbers the tensors' random streams for stochastic rounding: their positions
    in the list the backend received, as in the torch backend.
    """
    for name, tensors in lists.items():
        for tensor in tensors:
            if tensor.device != device:
                raise RuntimeError(
                    f"Tensors on two devices in one Triton launch: a {name} tensor is on "
                    f"{tensor.device}, its parameter on {device}; expected all on {device}"
                )
    states = [name for name in lists if name in STATE_LISTS]
    # One dtype a launch, but that an 8-bit exp_avg_sq goes with an fp32 z (schedule-free).
    state_dtypes = [lists[name][0].dtype for name in states]
    if len(set(state_dtypes)) > 1 and state_dtypes != [torch.float32, torch.uint8]:
        raise RuntimeError(
            f"The Triton kernel needs its state tensors ({', '.join(states)}) of one dtype, or "
            f"an 8-bit exp_avg_sq with an fp32 z, got {state_dtypes}"
        )
    for name, state_dtype in zip(states, state_dtypes, strict=True):
        for tensor in lists[name]:
            if tensor.dtype != state_dtype or state_dtype not in STATE_DTYPES:
                raise RuntimeError(
                    f"The Triton kernel needs {name} tensors of one dtype among {STATE_DTYPES}, "
                    f"got {tensor.dtype}"
                )
            if not tensor.is_contiguous():
                raise RuntimeError(
                    f"The Triton kernel needs contiguous {name} tensors, got strides "
                    f"{tensor.stride()}"
                )
    for name, state_dtype in zip(states, state_dtypes, strict=True):
        scales = lists.get(scales_key(name))
        if state_dtype != torch.uint8 or scales is None:
            continue
        for tensor, tensor_scales in zip(lists[name], scales, strict=True):
            blocks = block_count(tensor.numel())
            if (
                tensor_scales.dtype != torch.float32
                or tensor_scales.shape != (blocks,)
                or not tensor_scales.is_contiguous()
            ):
                raise RuntimeError(
                    f"The Triton kernel needs contiguous float32 {scales_key(name)} of shape "
                    f"({blocks},) for 8-bit {name} tensors, got {tensor_scales.dtype} of shape "
                    f"{tuple(tensor_scales.shape)}"
                )
    for name, dtype in SCALAR_LISTS.items():
        for scalar in lists.get(name, ()):
            if scalar.dtype != dtype or scalar.numel() != 1:
                raise RuntimeError(
                    f"The Triton kernel needs {dtype} scalar {name} tensors, got {scalar.dtype} "
                    f"of shape {tuple(scalar.shape)}"
                )
    for entry in lists.get("relative_update", ()):
        if entry.dtype != torch.float32 or entry.shape != (2,) or not entry.is_contiguous():
            raise RuntimeError(
                "The Triton kernel needs relative_update entries of two contiguous float32 "
                f"numbers, got {entry.dtype} of shape {tuple(entry.shape)}"
            )
    tables = _common().launch_tables(lists, device, pointers=pointers, stream_ids=stream_ids)
    if "relative_update" in lists:
        tables.update(_measured_kernels().measured_scratch(tables))
    return tables


def _tables(
    table_cache: dict,
    key: tuple,
    lists: dict[str, Sequence[Tensor]],
    device: torch.device,
    positions: Sequence[int],
    stochastic: bool,
) -> dict[str, Tensor | int]:
    """The launch tables of ``lists`` from ``table_cache[key]``, rebuilt when a pointer (or,
    with ``stochastic`` stores, a tensor's stream) changed."""
    pointers = tuple(_data_pointers(tensors) for tensors in lists.values())
    signature = (*pointers, tuple(positions) if stochastic else ())
    tables = table_cache.get(key)
    if tables is None or tables.signature != signature:
        stream_ids = list(positions) if stochastic else None
        tables = PointerTables(signature, _build_tables(lists, pointers, device, stream_ids))
        table_cache[key] = tables
    return tables.tensors


def _group_sums(
    params: Sequence[Tensor], relative_updates: Sequence[Tensor] | None
) -> Tensor | None:
    """The measured warmup's sums over the group's entries before the step, on the first
    parameter's device (each launch moves them to its own: one device, nearly always)."""
    if relative_updates is None:
        return None
    return torch.stack([entry.to(params[0].device) for entry in relative_updates]).sum(0)


def _sum_measurements(
    tables: dict[str, Tensor | int],
    measured_sums: Tensor | None,
    found_inf: Tensor | None,
    device: torch.device,
    factor: Tensor | None,
) -> Tensor | None:
    """After a measured launch (``measured_sums`` not None), the launch that sums each tensor's
    parts into its entry; the factor tensor of the group's first launch (``factor``, None
    before it)."""
    if measured_sums is None:
        return factor
    _measured_kernels().launch_measured_sums(
        tables, found_inf=None if found_inf is None else found_inf.to(device)
    )
    return tables["factor"] if factor is None else factor


def triton_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    table_cache: dict | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
    relative_updates: Sequence[Tensor] | None = None,
    relative_update_out: Sequence[Tensor] | None = None,
    exp_avg_scales: Sequence[Tensor | None] | None = None,
    exp_avg_sq_scales: Sequence[Tensor | None] | None = None,
) -> Tensor | None:
    """One AdaWarm step through the Triton kernel (``warmup_steps`` resolved to an int).
    8-bit (uint8) moments come with their block scales in ``exp_avg_scales`` and
    ``exp_avg_sq_scales``, as in :func:`adawarm.torch_backend.torch_step`.

    The caller has checked the tensors with :func:`unservable_reason`. ``state_steps`` are fp32
    scalars on the parameters' device, advanced by the kernel.
    ``table_cache`` (any dict kept between steps) holds the pointer tables. Stores round as in
    :func:`adawarm.torch_backend.torch_step`, from the same random streams. With
    ``relative_updates`` (the measured warmup), returns the device tensor that the first launch
    writes the factor it applied to (kept with the tables: later steps overwrite it); this
    step's sums go to ``relative_update_out`` where given, as in the torch backend.
    """
    if table_cache is None:
        table_cache = {}
    measured_sums = _group_sums(params, relative_updates)
    factor = None
    for device, dtype, indices in _launch_groups(params, exp_avgs):
        lists = {
            "param": select(params, indices),
            # The kernel indexes gradients like their (contiguous) parameters.
            "grad": list(map(Tensor.contiguous, select(grads, indices))),
            "exp_avg": select(exp_avgs, indices),
            "exp_avg_sq": select(exp_avg_sqs, indices),
            "step": select(state_steps, indices),
        }
        state_dtype = lists["exp_avg"][0].dtype
        if state_dtype == torch.uint8:
            lists["exp_avg_scales"] = select(exp_avg_scales, indices)
            lists["exp_avg_sq_scales"] = select(exp_avg_sq_scales, indices)
        buffers = None if compensations is None else select(compensations, indices)
        if buffers is not None and buffers[0] is not None:
            lists["compensation"] = buffers
        if relative_updates is not None:
            # where the sums kernel writes: the entries, or the shards' scratch
            lists["relative_update"] = select(relative_update_out or relative_updates, indices)
        stochastic_state = rounds_stochastically(state_dtype, rounding_seed)
        stochastic_param = rounds_stochastically(dtype, rounding_seed, stochastic_params)
        positions = range(len(params)) if indices is None else indices
        tables = _tables(
            table_cache,
            (device, dtype, state_dtype),
            lists,
            device,
            positions,
            stochastic_param or stochastic_state,
        )
        _kernels().launch_adawarm_step(
            tables,
            param_dtype=dtype,
            state_dtype=state_dtype,
            lr=lr.to(device) if isinstance(lr, Tensor) else lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            rectify=rectify,
            maximize=maximize,
            grad_scale=None if grad_scale is None else grad_scale.to(device),
            found_inf=None if found_inf is None else found_inf.to(device),
            rounding_seed=rounding_seed if stochastic_param or stochastic_state else None,
            stochastic_params=stochastic_param,
            stochastic_state=stochastic_state,
            group_sums=None if measured_sums is None else measured_sums.to(device),
            cap=MEASURED_CAP,
        )
        factor = _sum_measurements(tables, measured_sums, found_inf, device, factor)
    return factor


def triton_schedule_free_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    weight_sums: Sequence[Tensor],
    lr_maxes: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
    r: float,
    weight_lr_power: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    table_cache: dict | None = None,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
    relative_updates: Sequence[Tensor] | None = None,
    relative_update_out: Sequence[Tensor] | None = None,
    exp_avg_sq_scales: Sequence[Tensor | None] | None = None,
) -> Tensor | None:
    """One AdaWarmScheduleFree step through its Triton kernel, one launch per (device, dtype)
    group, as :func:`triton_step`; ``state_steps`` (fp32), ``weight_sums`` and ``lr_maxes``
    (fp64) are scalars on the parameters' device, advanced by the kernel. Stores round as in
    :func:`adawarm.schedule_free_torch.schedule_free_torch_step`; 8-bit (uint8)
    ``exp_avg_sqs`` come with their block scales in ``exp_avg_sq_scales``."""
    if table_cache is None:
        table_cache = {}
    measured_sums = _group_sums(params, relative_updates)
    factor = None
    for device, dtype, indices in _launch_groups(params, exp_avg_sqs):
        lists = {
            "param": select(params, indices),
            "z": select(zs, indices),
            "exp_avg_sq": select(exp_avg_sqs, indices),
            "grad": list(map(Tensor.contiguous, select(grads, indices))),
            "step": select(state_steps, indices),
            "weight_sum": select(weight_sums, indices),
            "lr_max": select(lr_maxes, indices),
        }
        second_state_dtype = lists["exp_avg_sq"][0].dtype
        if second_state_dtype == torch.uint8:
            lists["exp_avg_sq_scales"] = select(exp_avg_sq_scales, indices)
        buffers = None if compensations is None else select(compensations, indices)
        if buffers is not None and buffers[0] is not None:
            lists["compensation"] = buffers
        if relative_updates is not None:
            # where the sums kernel writes: the entries, or the shards' scratch
            lists["relative_update"] = select(relative_update_out or relative_updates, indices)
        state_dtype = lists["z"][0].dtype
        stochastic_state = rounds_stochastically(second_state_dtype, rounding_seed)
        stochastic_param = rounds_stochastically(dtype, rounding_seed, stochastic_params)
        positions = range(len(params)) if indices is None else indices
        stochastic = stochastic_param or stochastic_state
        key = (device, dtype, second_state_dtype)
        tables = _tables(table_cache, key, lists, device, positions, stochastic)
        _schedule_free_kernels().launch_schedule_free_step(
            tables,
            param_dtype=dtype,
            state_dtype=state_dtype,
            second_state_dtype=second_state_dtype,
            lr=lr.to(device) if isinstance(lr, Tensor) else lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            rectify=rectify,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            grad_scale=None if grad_scale is None else grad_scale.to(device),
            found_inf=None if found_inf is None else found_inf.to(device),
            rounding_seed=rounding_seed if stochastic else None,
            stochastic_params=stochastic_param,
            stochastic_state=stochastic_state,
            group_sums=None if measured_sums is None else measured_sums.to(device),
            cap=MEASURED_CAP,
        )
        factor = _sum_measurements(tables, measured_sums, found_inf, device, factor)
    return factor


def triton_switch(
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    weight: float,
    compensations: Sequence[Tensor | None] | None = None,
    rounding_seed: int | None = None,
    stochastic_params: bool = False,
) -> None:
    """``p <- p + weight (z - p)`` through the switch kernel, one launch per (device, dtype)
    group, as :func:`adawarm.schedule_free_torch.switch_torch` computes it. Its tables are
    built for each call: a switch is not in a training step's path."""
    for device, dtype, indices in _launch_groups(params, zs):
        lists = {
            "param": select(params, indices),
            "z": select(zs, indices),
            "step": [step.to(device) for step in select(state_steps, indices)],
        }
        buffers = None if compensations is None else select(compensations, indices)
        if buffers is not None and buffers[0] is not None:
            lists["compensation"] = buffers
        stochastic = rounds_stochastically(dtype, rounding_seed, stochastic_params)
        positions = range(len(params)) if indices is None else indices
        tables = _tables({}, (device, dtype), lists, device, positions, stochastic)
        _schedule_free_kernels().launch_switch(
            tables,
            param_dtype=dtype,
            state_dtype=lists["z"][0].dtype,
            weight=weight,
            rounding_seed=rounding_seed if stochastic else None,
            stochastic_params=stochastic,
        )
