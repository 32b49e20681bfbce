"""Speed of one optimizer step: AdaWarm against torch's AdamW and RAdam, and AdaWarmScheduleFree
against schedulefree's AdamWScheduleFree, in the same process.

Each case is a list of parameter shapes. A step's time is the median over ``--steps`` timed steps
after warm-up steps that take every optimizer past RAdam's rectification threshold (t = 6), so
AdaWarm runs its steady-state (rectified) path. Bandwidth comes from an explicit byte count: a step
reads param, grad and two states (exp_avg and exp_avg_sq, or the schedule-free z and exp_avg_sq)
and writes param and the states, i.e.
``3 * param_bytes + 4 * state_bytes`` per parameter (28 B for fp32; 22 B for bf16 parameters with
fp32 states; 14 B with bf16 states).

On CPU it compares the torch backend with 1 and 2 threads; on a GPU it adds the Triton kernel and
reports, per step, the kernel launches (torch profiler) and the host time (the Python call alone).

Small models -- where a step's time is mostly per-call work on the host, which a GPU user pays on
every step too -- are measured in interleaved rounds (1 thread): each round runs every optimizer
for a few steps, in a rotating order, and each optimizer is compared with the one it replaces
(AdaWarm with torch's fused AdamW, AdaWarmScheduleFree with schedulefree's foreach step) by the
median of the per-round ratios, with a 95 % interval for that median. Those with a model (the CNN
and the MLP) are also timed in a training loop: each optimizer trains its own copy of the model,
and only its ``step()`` is timed, after a forward and backward pass that leave the caches as a
training step does (colder than back-to-back steps).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.quantization import QUANTIZATION_BLOCK
from adawarm.schedule import MEASURED
from bench import RUNS
from bench.paired import median_interval

WARMUP_STEPS = 8


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32
    low_precision: bool = False  # compare the low-precision configurations (issue 6)
    small: bool = False  # a small model: interleaved rounds, 1 thread, paired ratios
    # A model with these parameter shapes and the shape of a batch of its inputs: the small
    # case is timed in a training loop too.
    model: Callable[[], torch.nn.Module] | None = None
    batch_shape: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return sum(torch.Size(shape).numel() for shape in self.shapes)


def gpt2_small_shapes(
    d: int = 768, vocab: int = 50257, context: int = 1024, layers: int = 12
) -> tuple[tuple[int, ...], ...]:
    """The parameter shapes of GPT-2 small (124M parameters, tied embeddings) at the defaults;
    the same layout at another width, vocabulary, context or depth."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,)]
    block += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return ((vocab, d), (context, d), *block * layers, (d,), (d,))


CPU_CASES = (
    Case("10M fp32 params in 4 tensors", ((2_500_000,),) * 4),
    Case("2000 tensors of 5000", ((5000,),) * 2000),
    Case("10M bf16 params in 4 tensors", ((2_500_000,),) * 4, torch.bfloat16, True),
)
# A small CNN (3 conv layers with BatchNorm, a linear head) and an MLP of 10 layers.
CNN_SHAPES = (
    *((16, 3, 3, 3), (16,), (16,)),
    *((32, 16, 3, 3), (32,), (32,)),
    *((64, 32, 3, 3), (64,), (64,)),
    *((10, 64), (10,)),
)
MLP_SHAPES = ((96, 256), (96,), *((96, 96), (96,)) * 8, (10, 96), (10,))


def cnn_model() -> torch.nn.Module:
    """The CNN of CNN_SHAPES: 3 convolutions (no bias) with BatchNorm, a linear head."""
    layers: list[torch.nn.Module] = []
    for inputs, outputs in ((3, 16), (16, 32), (32, 64)):
        layers += [
            torch.nn.Conv2d(inputs, outputs, 3, bias=False),
            torch.nn.BatchNorm2d(outputs),
            torch.nn.ReLU(),
        ]
    return torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)
    )


def mlp_model() -> torch.nn.Module:
    """The MLP of MLP_SHAPES: 10 linear layers with ReLU between them."""
    widths = [256, *[96] * 9, 10]
    layers: list[torch.nn.Module] = []
    for inputs, outputs in itertools.pairwise(widths):
        layers += [torch.nn.Linear(inputs, outputs), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


SMALL_CPU_CASES = (
    Case(
        "CNN: 11 tensors, 24k params",
        CNN_SHAPES,
        small=True,
        model=cnn_model,
        batch_shape=(32, 3, 16, 16),
    ),
    Case(
        "MLP: 20 tensors, 100k params",
        MLP_SHAPES,
        small=True,
        model=mlp_model,
        batch_shape=(32, 256),
    ),
    Case("200 tensors of 512", ((512,),) * 200, small=True),
)
SMALL_ROUNDS, SMALL_STEPS_PER_ROUND = 60, 20  # ~15 s a case
LOOP_ROUNDS, LOOP_STEPS_PER_ROUND = 40, 10  # ~20 s a case (forward and backward included)
# What each optimizer of a small case is compared with: the optimizer it replaces.
REFERENCES = {
    "torch AdamW foreach": "torch AdamW fused",
    "torch RAdam foreach": "torch AdamW fused",
    "AdaWarm torch backend": "torch AdamW fused",
    "AdaWarmScheduleFree torch backend": "schedulefree AdamWScheduleFree foreach",
}
QUICK_CPU_CASES = (Case("2M fp32 params in 4 tensors", ((500_000,),) * 4),)
GPU_CASES = (
    Case("(a) one fp32 tensor of 2^28", ((1 << 28,),)),
    Case("(b) GPT-2 124M fp32", gpt2_small_shapes()),
    Case("(c) 2000 tensors of 5000", ((5000,),) * 2000),
    Case("(d) GPT-2 124M bf16 params", gpt2_small_shapes(), torch.bfloat16),
    Case("(e) 500 tensors of 4096 (host time)", ((4096,),) * 500),
    Case("(f) GPT-2 124M bf16, low precision", gpt2_small_shapes(), torch.bfloat16, True),
)

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def adawarm_factory(
    backend: str, warmup_steps: int | str = 100, state_dtype: torch.dtype | None = None
) -> OptimizerFactory:
    """AdaWarm on ``backend``, rectified and mid-ramp (every step computes the whole schedule),
    or with ``warmup_steps="measured"`` (every step measures its relative update), its moments
    in ``state_dtype``."""
    return lambda ps: AdaWarm(
        ps, rectify=True, warmup_steps=warmup_steps, backend=backend, state_dtype=state_dtype
    )


def _training(optimizer):
    """A schedule-free optimizer in train mode, where its steps run."""
    optimizer.train()
    return optimizer


# The same weight decay on both sides (AdamW's default; schedulefree's is 0).
SCHEDULE_FREE_WEIGHT_DECAY = 0.01


def schedule_free_factory(backend: str, warmup_steps: int | str = 100) -> OptimizerFactory:
    """AdaWarmScheduleFree on ``backend``, mid-ramp, or with ``warmup_steps="measured"``."""
    return lambda ps: _training(
        AdaWarmScheduleFree(
            ps, warmup_steps=warmup_steps, weight_decay=SCHEDULE_FREE_WEIGHT_DECAY, backend=backend
        )
    )


def schedulefree_factory() -> OptimizerFactory | None:
    """schedulefree's AdamWScheduleFree with its foreach step, where the package is installed
    (it is not on the GPU image)."""
    if importlib.util.find_spec("schedulefree") is None:
        return None
    import schedulefree

    return lambda ps: _training(
        schedulefree.AdamWScheduleFree(
            ps, warmup_steps=100, weight_decay=SCHEDULE_FREE_WEIGHT_DECAY, foreach=True
        )
    )


def optimizers(device: torch.device) -> dict[str, OptimizerFactory]:
    table: dict[str, OptimizerFactory] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "torch RAdam foreach": lambda ps: torch.optim.RAdam(
            ps, foreach=True, decoupled_weight_decay=True
        ),
        "AdaWarm torch backend": adawarm_factory("torch"),
        "AdaWarm torch backend, measured warmup": adawarm_factory("torch", MEASURED),
    }
    if device.type == "cuda":
        table["AdaWarm triton"] = adawarm_factory("triton")
        table["AdaWarm triton, measured warmup"] = adawarm_factory("triton", MEASURED)
    reference = schedulefree_factory()
    if reference is not None:
        table["schedulefree AdamWScheduleFree foreach"] = reference
    table["AdaWarmScheduleFree torch backend"] = schedule_free_factory("torch")
    table["AdaWarmScheduleFree torch backend, measured warmup"] = schedule_free_factory(
        "torch", MEASURED
    )
    if device.type == "cuda":
        table["AdaWarmScheduleFree triton"] = schedule_free_factory("triton")
        table["AdaWarmScheduleFree triton, measured warmup"] = schedule_free_factory(
            "triton", MEASURED
        )
    return table


def low_precision_optimizers(device: torch.device) -> dict[str, OptimizerFactory]:
    """bf16-parameter configurations: torch's fused AdamW (bf16 moments) against AdaWarm's
    fp32 or bf16 moments, with and without compensation."""
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    variants = {
        "fp32 moments": {},
        "bf16 moments": {"state_dtype": torch.bfloat16},
        "bf16 moments + Kahan": {"state_dtype": torch.bfloat16, "compensation": "kahan"},
        "bf16 moments + SR": {"state_dtype": torch.bfloat16, "compensation": "stochastic"},
        "8-bit moments": {"state_dtype": torch.uint8},
        "8-bit moments + SR": {"state_dtype": torch.uint8, "compensation": "stochastic"},
    }
    table: dict[str, OptimizerFactory] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    }
    for backend in backends:
        for label, options in variants.items():
            table[f"AdaWarm {backend}, {label}"] = lambda ps, b=backend, o=options: AdaWarm(
                ps, rectify=True, backend=b, **o
            )
    return table


def bytes_per_param(
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    compensation_dtype: torch.dtype | None = None,
) -> float:
    """Bytes a step must move per parameter: read p, g, m, v; write p, m, v (and read and write
    a Kahan buffer when there is one; an 8-bit moment is its code and its share of its block's
    scale)."""
    param_bytes = torch.finfo(param_dtype).bits // 8
    if state_dtype == torch.uint8:  # a code, and a 4-byte scale per block
        state_bytes = 1 + 4 / QUANTIZATION_BLOCK
    else:
        state_bytes = torch.finfo(state_dtype).bits // 8
    extra = 0 if compensation_dtype is None else 2 * (torch.finfo(compensation_dtype).bits // 8)
    return 3 * param_bytes + 4 * state_bytes + extra


def state_bytes_per_param(state: dict[str, torch.Tensor], numel: int) -> int:
    """Bytes of optimizer state kept per parameter (moments and any Kahan buffer)."""
    return sum(t.element_size() for t in state.values() if t.numel() == numel and numel > 1)


class Timer:
    """Median wall time of a call: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def median_seconds(self, fn: Callable[[], object], repeats: int) -> float:
        return statistics.median(self.seconds(fn, repeats))

    def seconds(self, fn: Callable[[], object], repeats: int) -> list[float]:
        """The wall time of each of ``repeats`` calls."""
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return times


def copy_bandwidth(device: torch.device, numel: int, timer: Timer) -> float:
    """Measured GB/s of a large tensor copy, counted as read + write (8 B per fp32 element)."""
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    return 8 * numel / timer.median_seconds(lambda: target.copy_(source), 10) / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_microseconds(
    optimizer: torch.optim.Optimizer, device: torch.device, repeats: int
) -> float:
    """Median time for ``step()`` to return, the device idle at each call (on a CPU, where the
    host does the work, this is the step's time)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - begin)
    synchronize(device)
    return statistics.median(times) * 1e6


def launches_per_step(optimizer: torch.optim.Optimizer) -> int:
    """GPU kernels launched by one ``step()``, counted by the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        optimizer.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@dataclass
class Row:
    case: str
    optimizer: str
    device: str
    threads: int | None
    params: int
    bytes_per_param: float  # 8-bit moments: their blocks' scales too
    state_bytes_per_param: int
    median_ms: float
    # The middle half of the timed steps (first and third quartile); rows of runs before this
    # field existed have None.
    quartiles_ms: tuple[float, float] | None
    gb_per_s: float
    percent_of_copy: float
    launches_per_step: int | None
    host_us: float | None
    torch_version: str
    triton_version: str | None
    date: str
    # Small cases: the optimizer it is compared with, and the median of the per-round ratios of
    # its step time to that one's with a 95 % interval (median, low, high); None elsewhere.
    reference: str | None = None
    paired_ratio: tuple[float, float, float] | None = None
    # Small cases with a model: the same in a training loop (us per step; median, low, high).
    loop_us: float | None = None
    loop_ratio: tuple[float, float, float] | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def prepared(
    case: Case, factory: OptimizerFactory, device: torch.device, warmup_steps: int = WARMUP_STEPS
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``case``'s parameters with gradients, and ``factory``'s optimizer over them after
    ``warmup_steps`` steps."""
    # Drawn on the device: a CPU draws 2^28 normal numbers in seconds.
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in case.shapes:
        param = torch.randn(shape, generator=generator, device=device).to(case.dtype)
        grad = torch.randn(shape, generator=generator, device=device).to(case.dtype)
        param.requires_grad_().grad = grad
        params.append(param)
    optimizer = factory(params)
    for _ in range(warmup_steps):
        optimizer.step()
    return params, optimizer


def measure(
    case: Case,
    name: str,
    factory: OptimizerFactory,
    device: torch.device,
    timer: Timer,
    steps: int,
    copy_gbs: float,
    host_time: bool | None = None,
    warmup_steps: int = WARMUP_STEPS,
) -> Row:
    """One row: ``factory``'s optimizer on ``case``, timed after ``warmup_steps`` steps.
    Launches are counted on a GPU; the host time is measured when ``host_time`` says so (None:
    on a GPU)."""
    params, optimizer = prepared(case, factory, device, warmup_steps)
    times = timer.seconds(optimizer.step, steps)
    on_gpu = device.type == "cuda"
    return make_row(
        case,
        name,
        params,
        optimizer,
        times,
        device,
        copy_gbs,
        launches=launches_per_step(optimizer) if on_gpu else None,
        host_us=host_microseconds(optimizer, device, steps)
        if (on_gpu if host_time is None else host_time)
        else None,
    )


def make_row(
    case: Case,
    name: str,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    times: list[float],
    device: torch.device,
    copy_gbs: float,
    **extra,
) -> Row:
    """The row of ``optimizer`` on ``case`` from its step times (seconds)."""
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    seconds = statistics.median(times)
    state = optimizer.state[params[0]]
    compensation = state.get("compensation")
    per_param = bytes_per_param(  # AdamW's m and v, or schedule-free's z and v
        case.dtype,
        state["exp_avg_sq"].dtype,
        None if compensation is None else compensation.dtype,
    )
    gbs = per_param * case.numel / seconds / 1e9
    return Row(
        case=case.name,
        optimizer=name,
        device=device_name(device),
        threads=None if device.type == "cuda" else torch.get_num_threads(),
        params=case.numel,
        bytes_per_param=per_param,
        state_bytes_per_param=state_bytes_per_param(state, params[0].numel()),
        median_ms=seconds * 1e3,
        quartiles_ms=(quartiles[0] * 1e3, quartiles[2] * 1e3),
        gb_per_s=gbs,
        percent_of_copy=100 * gbs / copy_gbs,
        launches_per_step=extra.get("launches"),
        host_us=extra.get("host_us"),
        torch_version=torch.__version__,
        triton_version=triton_version(),
        date=datetime.date.today().isoformat(),
        reference=extra.get("reference"),
        paired_ratio=extra.get("paired_ratio"),
        loop_us=extra.get("loop_us"),
        loop_ratio=extra.get("loop_ratio"),
    )


def measure_interleaved(
    case: Case,
    table: dict[str, OptimizerFactory],
    device: torch.device,
    copy_gbs: float,
    rounds: int = SMALL_ROUNDS,
    steps_per_round: int = SMALL_STEPS_PER_ROUND,
    loop_rounds: int = LOOP_ROUNDS,
    loop_steps_per_round: int = LOOP_STEPS_PER_ROUND,
) -> list[Row]:
    """Rows for a small case: ``rounds`` rounds in which every optimizer takes
    ``steps_per_round`` steps (the order rotating from round to round, so that none always runs
    after the same one), each optimizer's step time the median over rounds of its round mean,
    and its ratio to the optimizer it replaces the median of the per-round ratios, with a 95 %
    interval; for a case with a model, the same of ``optimizer.step()`` in a training loop
    (``loop_rounds`` rounds of ``loop_steps_per_round`` training steps)."""
    ready = {name: prepared(case, factory, device) for name, factory in table.items()}
    per_round = _interleaved_rounds(
        {name: optimizer.step for name, (_, optimizer) in ready.items()},
        device,
        rounds,
        steps_per_round,
    )
    in_loop = {}
    if case.model is not None:
        in_loop = _interleaved_rounds(
            {name: _training_step(case, factory, device) for name, factory in table.items()},
            device,
            loop_rounds,
            loop_steps_per_round,
        )
    rows = []
    for name, (params, optimizer) in ready.items():
        reference = REFERENCES.get(name)
        if reference not in per_round:
            reference = None
        rows.append(
            make_row(
                case,
                name,
                params,
                optimizer,
                per_round[name],
                device,
                copy_gbs,
                host_us=statistics.median(per_round[name]) * 1e6,
                reference=reference,
                paired_ratio=_paired_ratio(per_round, name, reference),
                loop_us=statistics.median(in_loop[name]) * 1e6 if in_loop else None,
                loop_ratio=_paired_ratio(in_loop, name, reference) if in_loop else None,
            )
        )
    return rows


def _interleaved_rounds(
    steps: dict[str, Callable[[], float | None]],
    device: torch.device,
    rounds: int,
    per_round: int,
) -> dict[str, list[float]]:
    """Per name, the mean seconds of its step over ``per_round`` calls, in each of ``rounds``
    rounds that call every step in a rotating order. A step returns the seconds to count (a
    training step times its ``optimizer.step()`` only), or None for the whole call."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            step, total = steps[name], 0.0
            for _ in range(per_round):
                synchronize(device)
                begin = time.perf_counter()
                timed = step()
                synchronize(device)
                total += time.perf_counter() - begin if timed is None else timed
            seconds[name].append(total / per_round)
    return seconds


def _training_step(
    case: Case, factory: OptimizerFactory, device: torch.device
) -> Callable[[], float]:
    """One training step of ``case``'s model (the same initial weights and batch for every
    optimizer) that returns the seconds of its ``optimizer.step()``."""
    torch.manual_seed(0)
    model = case.model().to(device)
    assert tuple(tuple(p.shape) for p in model.parameters()) == case.shapes
    optimizer = factory(list(model.parameters()))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(case.batch_shape, generator=generator).to(device)
    with torch.no_grad():
        classes = model(inputs).shape[-1]
    targets = torch.randint(0, classes, case.batch_shape[:1], generator=generator).to(device)

    def step() -> float:
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        synchronize(device)
        begin = time.perf_counter()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - begin
        optimizer.zero_grad()
        return seconds

    for _ in range(WARMUP_STEPS):
        step()
    return step


def _paired_ratio(
    seconds: dict[str, list[float]], name: str, reference: str | None
) -> tuple[float, float, float] | None:
    """The median of the per-round ratios of ``name``'s times to ``reference``'s, with a 95 %
    interval; None without a reference."""
    if reference is None:
        return None
    ratios = [a / b for a, b in zip(seconds[name], seconds[reference], strict=True)]
    return median_interval(ratios)


def run(device, cases, threads_list, steps, progress=None) -> list[Row]:
    rows = []
    timer = Timer(device)
    for threads in threads_list:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        copy_gbs = copy_bandwidth(device, max(case.numel for case in cases), timer)
        for case in cases:
            table = low_precision_optimizers(device) if case.low_precision else optimizers(device)
            if case.small:
                if threads == 1:  # per-call work on the host: one thread is the setting
                    rows += measure_interleaved(case, table, device, copy_gbs)
                if progress is not None:
                    progress.update(len(table))
                continue
            for name, factory in table.items():
                rows.append(measure(case, name, factory, device, timer, steps, copy_gbs))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if progress is not None:
                    progress.update(1)
    return rows


def format_table(rows: list[Row]) -> str:
    fused = {(r.case, r.threads): r.median_ms for r in rows if r.optimizer == "torch AdamW fused"}
    width = max([34, *(len(r.optimizer) for r in rows)])
    lines = [
        f"{'case':36} {'optimizer':{width}} {'thr':>3} {'ms':>9} {'B/par':>5} {'state B':>7} "
        f"{'GB/s':>8} {'%copy':>6} {'vs fused':>8} {'launch':>6} {'host us':>8}"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        ratio = r.median_ms / fused.get((r.case, r.threads), float("nan"))
        threads = "-" if r.threads is None else str(r.threads)
        launches = "-" if r.launches_per_step is None else str(r.launches_per_step)
        host = "-" if r.host_us is None else f"{r.host_us:.0f}"
        lines.append(
            f"{r.case:36} {r.optimizer:{width}} {threads:>3} {r.median_ms:9.3f} "
            f"{r.bytes_per_param:5g} {r.state_bytes_per_param:7d} {r.gb_per_s:8.1f} "
            f"{r.percent_of_copy:6.1f} {ratio:7.2f}x {launches:>6} {host:>8}"
        )
    return "\n".join(lines)


def markdown_report(rows: list[Row]) -> str:
    """The rows as Markdown tables (the documentation includes them), with what they ran on:
    the large cases, then the small models' host time and paired ratios."""
    small_cases = {r.case for r in rows if r.paired_ratio is not None}
    large = [r for r in rows if r.case not in small_cases]
    small = [r for r in rows if r.case in small_cases]
    report = _large_table(large) if large else ""
    if small:
        report += ("\n" if report else "") + _small_table(small)
    return report


def _small_table(rows: list[Row]) -> str:
    first = rows[0]
    lines = [
        f"Small models, measured {first.date} on {first.device.split(',')[0]}, torch "
        f"{first.torch_version}, 1 thread: the host time of one step (on a CPU, the whole "
        "step), the median over interleaved rounds and the middle half of the rounds; each "
        "optimizer against the one it replaces, by the median of the per-round ratios of their "
        "step times with a 95 % interval. In a training loop: the same of `optimizer.step()` "
        "alone, each optimizer training its own copy of the model (a forward and backward pass "
        "before each step leave the caches colder than back-to-back steps do).",
        "",
        "| case | optimizer | us per step [middle half] | against | ratio [95 % interval] "
        "| in a training loop: us | ratio [95 % interval] |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        low, high = r.quartiles_ms or (math.nan, math.nan)
        cells = [
            r.case,
            r.optimizer,
            f"{r.median_ms * 1e3:.0f} [{low * 1e3:.0f}, {high * 1e3:.0f}]",
            r.reference or "-",
            _ratio_cell(r.paired_ratio),
            "-" if r.loop_us is None else f"{r.loop_us:.0f}",
            _ratio_cell(r.loop_ratio),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_cell(ratio: tuple[float, float, float] | None) -> str:
    if ratio is None:
        return "-"
    median, lower, upper = ratio
    return f"{median:.2f}x [{lower:.2f}, {upper:.2f}]"


def _large_table(rows: list[Row]) -> str:
    fused = {(r.case, r.threads): r.median_ms for r in rows if r.optimizer == "torch AdamW fused"}
    first = rows[0]
    device = first.device.split(",")[0]
    lines = [
        f"Measured {first.date} on {device}, torch {first.torch_version}: one optimizer step, the "
        "median and the middle half of the timed steps; GB/s from the bytes a step must move; "
        "% of copy against a measured tensor copy counted as 8 B per element (a copy also pays "
        "write-allocate traffic that the count leaves out, so an in-place step can pass 100 %).",
        "",
        "| case | optimizer | threads | ms [middle half] | B moved / param | state B / param "
        "| GB/s | % of copy | vs AdamW fused | launches | host us |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        low, high = r.quartiles_ms or (math.nan, math.nan)
        ratio = r.median_ms / fused.get((r.case, r.threads), math.nan)
        cells = [
            r.case,
            r.optimizer,
            "-" if r.threads is None else str(r.threads),
            f"{r.median_ms:.2f} [{low:.2f}, {high:.2f}]",
            f"{r.bytes_per_param:g}",
            str(r.state_bytes_per_param),
            f"{r.gb_per_s:.1f}",
            f"{r.percent_of_copy:.0f}",
            f"{ratio:.2f}x",
            "-" if r.launches_per_step is None else str(r.launches_per_step),
            "-" if r.host_us is None else f"{r.host_us:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[Row], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    markdown_path = out / f"{stem}.md"
    markdown_path.write_text(markdown_report(rows))
    return [json_path, csv_path, markdown_path, plot(rows, out / f"{stem}.png")]


def load_rows(path: Path) -> list[Row]:
    return [Row(**row) for row in json.loads(path.read_text())]


def plot(rows: list[Row], path: Path) -> Path:
    """A bar chart of step time relative to torch's fused AdamW, one group of bars per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.case, r.threads) for r in rows))
    names = list(dict.fromkeys(r.optimizer for r in rows))
    fused = {(r.case, r.threads): r.median_ms for r in rows if r.optimizer == "torch AdamW fused"}
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [
            next((r.median_ms for r in rows if (r.case, r.threads) == g and r.optimizer == name), 0)
            / fused[g]
            for g in groups
        ]
        ax.bar([i + index * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    labels = [
        case if threads is None else f"{case}\n{threads} thread(s)" for case, threads in groups
    ]
    ax.set_xticklabels(labels, fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("step time / torch AdamW fused (lower is better)")
    ax.set_title(f"Optimizer step time on {rows[0].device.split(',')[0]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU only")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--quick", action="store_true", help="one small case, 1 thread, 10 steps")
    parser.add_argument(
        "--out", type=Path, default=RUNS, help=f"folder for the results (default: {RUNS})"
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="measure nothing: write the Markdown report of a saved run (OUT/<its name>.md)",
    )
    args = parser.parse_args(argv)
    if args.report_from is not None:
        rows = load_rows(args.report_from)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / args.report_from.with_suffix(".md").name
        path.write_text(markdown_report(rows))
        print(f"wrote {path}")
        return rows
    from tqdm import tqdm

    device = torch.device(args.device)
    if device.type == "cuda":
        cases, threads = GPU_CASES, [None]
    elif args.quick:
        cases, threads = QUICK_CPU_CASES, [1]
    else:
        cases, threads = CPU_CASES + SMALL_CPU_CASES, args.threads
    steps = 10 if args.quick else args.steps
    total = len(threads) * sum(
        len(low_precision_optimizers(device) if c.low_precision else optimizers(device))
        for c in cases
    )
    with tqdm(total=total, desc="speed", unit="run") as progress:
        rows = run(device, cases, threads, steps, progress)
    print(format_table(rows))
    stem = f"speed-{device.type}" + ("-quick" if args.quick else "")
    for path in write_results(rows, args.out, stem):
        print(f"wrote {path}")
    return rows
