"""The promise matrix: every promise README.md and docs/ make (tests/promises.py, shown in
docs/promises.md), checked for both optimizers on each execution it is claimed for, and refused
with an error that changes nothing on the others. No step may warn: a warning here is an error
(a silent cast that drops data warns once per process, and is otherwise unseen)."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCES, assert_close, gradient_stream, make_params
from promises import (
    KINDS,
    PROMISES,
    assert_identical,
    assert_matches,
    assert_unchanged,
    cases,
    device_of,
    observe,
    on_device,
    optimizer_for,
    real_pairs,
    run,
    snapshot,
    used_promises,
)
from torch import Tensor

from adawarm.quantization import FIRST_MOMENT, SECOND_MOMENT, quantize
from adawarm.rounding import EXP_AVG_ROLE, EXP_AVG_SQ_ROLE, random_bits, stream_base
from adawarm.schedule import MEASURED_CAP, measured_factor, rectification

pytestmark = pytest.mark.filterwarnings("error")

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(0,), (1,), (7,), (3, 5), (1025,)]
STEPS = 8  # past t = 6, where RAdam's rectification starts at beta2 = 0.999
EVALUATE_AFTER = (2, 5)  # a schedule-free run evaluates there (eval(), then train())
SETTINGS = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "warmup_steps": 3}
REFUSED = (RuntimeError, ValueError)


def start(kind, execution, dtype=torch.float32, seed=0, shapes=SHAPES, **options):
    """Parameters of ``shapes`` on the execution's device and ``kind`` over them."""
    params = on_device(make_params(shapes, dtype, seed), device_of(execution))
    return params, optimizer_for(kind, params, execution, **{**SETTINGS, **options})


def trained(kind, execution, dtype=torch.float32, steps=STEPS, seed=0, **options):
    params, optimizer = start(kind, execution, dtype, seed, **options)
    run(
        optimizer,
        params,
        gradient_stream(SHAPES, dtype, steps, seed),
        evaluate_after=EVALUATE_AFTER,
    )
    return params, optimizer


def assert_refused(kind, execution, match, dtype=torch.float32, **options):
    """``kind`` refuses ``options`` on ``execution``, when built or at its first step, naming
    ``match``, with the parameters unchanged and no state created."""
    params = on_device(make_params(SHAPES, dtype, 0), device_of(execution))
    values = [p.detach().clone() for p in params]
    try:
        optimizer = optimizer_for(kind, params, execution, **{**SETTINGS, **options})
    except REFUSED as error:
        assert re.search(match, str(error)), str(error)
        return
    for param in params:
        param.grad = torch.ones_like(param)
    with pytest.raises(REFUSED, match=match):
        optimizer.step()
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values, strict=True))
    assert not any(optimizer.state.values())


# -- the table ---------------------------------------------------------------------------------


def documented_promises() -> dict[str, dict[str, tuple[str, ...]]]:
    """docs/promises.md's table: per promise, per optimizer, the executions it names."""
    text = (ROOT / "docs" / "promises.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    kinds = header[1:3]
    table = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if set(cells[0]) <= {"-", " "}:
            continue
        table[cells[0]] = {
            kind: tuple(name.strip() for name in cell.split(",")) if cell != "-" else ()
            for kind, cell in zip(kinds, cells[1:3], strict=True)
        }
    return table


def test_the_documented_table_is_the_tested_one():
    assert documented_promises() == PROMISES


def test_every_promise_has_its_test_over_both_optimizers():
    assert used_promises() == set(PROMISES)
    for promise, per_kind in PROMISES.items():
        assert set(per_kind) == {kind.name for kind in KINDS}, promise
        assert all(per_kind.values()), f"{promise}: claimed for one optimizer only"


# -- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("fp32, bf16 and fp16 parameters"))
def test_each_step_is_the_exact_update_rounded_to_the_parameters_dtype(
    kind, execution, holds, dtype
):
    # Every step against the same step in fp64 from where this run stands (so that rounding
    # does not accumulate into the comparison): computed in fp32, stored in the dtype.
    params, optimizer = start(kind, execution, dtype)
    for step, grads in enumerate(gradient_stream(SHAPES, dtype, STEPS, 1)):
        exact_params = on_device([p.double() for p in params], torch.device("cpu"))
        exact = optimizer_for(kind, exact_params, "reference", **SETTINGS)
        if step:
            exact.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        run(optimizer, params, [grads])
        run(exact, exact_params, [[g.double() for g in grads]])
        assert_matches(
            observe(optimizer, params, evaluated=False),
            observe(exact, exact_params, evaluated=False),
            dtype,
        )


# Parameter dtype and the storage options of docs/low-precision.md.
STORAGES = {
    "fp32, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32, Kahan": (torch.float32, {"compensation": "kahan"}),  # no buffer: nothing to keep
    "bf16, Kahan": (torch.bfloat16, {"compensation": "kahan"}),
    "fp16, Kahan": (torch.float16, {"compensation": "kahan"}),
    "bf16, stochastic": (torch.bfloat16, {"compensation": "stochastic"}),
    "bf16, all stochastic": (
        torch.bfloat16,
        {"compensation": "stochastic", "state_dtype": torch.bfloat16},
    ),
}


def compensated(seen: dict[str, Tensor]) -> dict[str, Tensor]:
    """An observation with each Kahan-compensated parameter as the value it stands for,
    ``param + compensation`` (in fp64)."""
    seen = dict(seen)
    for name in [k for k in seen if k.startswith("compensation ")]:
        index = name.split()[1]
        seen[f"param {index}"] = seen[f"param {index}"].double() + seen.pop(name).double()
    return seen


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("bf16 state, Kahan and stochastic rounding")
)
def test_each_step_stored_in_low_precision_is_the_exact_update_within_an_ulp(
    kind, execution, holds, storage
):
    # As above, from the value each parameter stands for (with its Kahan buffer); bf16 state
    # and stochastically rounded parameters land within an ulp of the exact value.
    dtype, options = STORAGES[storage]
    params, optimizer = start(kind, execution, dtype, **options)
    for step, grads in enumerate(gradient_stream(SHAPES, dtype, STEPS, 1)):
        now = compensated(observe(optimizer, params, evaluated=False))
        exact_params = on_device(
            [now[f"param {i}"].double() for i in range(len(params))], torch.device("cpu")
        )
        exact = optimizer_for(kind, exact_params, "reference", **SETTINGS)
        if step:
            exact.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        run(optimizer, params, [grads])
        run(exact, exact_params, [[g.double() for g in grads]])
        buffers = [optimizer.state[p].get("compensation") is not None for p in params]
        assert all(buffers) == (options.get("compensation") == "kahan" and dtype != torch.float32)
        assert_matches(
            compensated(observe(optimizer, params, evaluated=False)),
            observe(exact, exact_params, evaluated=False),
            torch.bfloat16,
        )


# The 8-bit states, their codes and the random streams they are stored from.
EIGHT_BIT_STATES = {
    "exp_avg": (FIRST_MOMENT, EXP_AVG_ROLE),
    "exp_avg_sq": (SECOND_MOMENT, EXP_AVG_SQ_ROLE),
}


@pytest.mark.parametrize("min_8bit_size", [0, 16])
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("8-bit state"))
def test_each_step_of_8_bit_states_is_the_fp32_step_from_their_values_coded_stochastically(
    kind, execution, holds, min_8bit_size
):
    """Past the rectification threshold: each step of 8-bit states (all tensors, or those of
    at least 16 elements) is the step of fp32 states loaded from them (the checkpoint
    conversion decodes them), its new states coded by ``quantize`` from the stream of each
    tensor's position, step and state."""
    options = {"state_dtype": torch.uint8, "min_8bit_size": min_8bit_size, "rectify": True}
    params, optimizer = start(kind, execution, **options)
    for step, grads in enumerate(gradient_stream(SHAPES, torch.float32, STEPS, 1), start=1):
        twins = on_device(params, device_of(execution))
        twin = optimizer_for(kind, twins, execution, **SETTINGS, rectify=True)
        if step > 1:
            twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        run(optimizer, params, [grads])
        run(twin, twins, [grads])
        seen = observe(optimizer, params, evaluated=False)
        expected = observe(twin, twins, evaluated=False)
        for index, param in enumerate(params):
            for key, (code, role) in EIGHT_BIT_STATES.items():
                name = f"{key} {index}"
                if name not in expected or seen[name].dtype != torch.uint8:
                    continue
                assert param.numel() >= min_8bit_size, name
                bits = random_bits(stream_base(0, index, step, role), param.numel(), "cpu")
                codes, scales = quantize(expected.pop(name), code, bits)
                assert_close(seen.pop(f"{key}_scales {index}"), scales, torch.float32, name)
                # the same codes, but where the two computations differ by an ulp next to a
                # rounding threshold
                differ = seen.pop(name).int() - codes.int()
                assert differ.abs().le(1).all() and differ.count_nonzero() <= 1, name
        assert_matches(seen, expected, torch.float32)


# A quadratic 0.5 |p - target|^2 whose optimum lies 0.05 away from a start in [1, 1.5), where
# a bf16 ulp is 2^-7 = 0.0078: Adam's normalised steps of about lr = 4e-4 are below half an ulp
# of bf16 (and of fp16: 2^-11 = 4.9e-4), so rounding to nearest loses them all.
CREEP_STEPS, CREEP_LR = 100, 4e-4


def creep(kind, execution, dtype, **options) -> tuple[dict[str, Tensor], Tensor]:
    """The points a run of the quadratic ends at (``y``/``param`` and, schedule-free, ``x``),
    in fp32, and where it started."""
    generator = torch.Generator().manual_seed(0)
    start = 1.0 + 0.5 * torch.rand(1000, generator=generator)
    target = start + 0.05
    device = device_of(execution)
    param = start.to(dtype).to(device, copy=True).requires_grad_()
    settings = {**SETTINGS, "lr": CREEP_LR, "warmup_steps": 0, "weight_decay": 0.0}
    optimizer = optimizer_for(kind, [param], execution, **settings, **options)
    for _ in range(CREEP_STEPS):
        param.grad = (param.detach().float() - target.to(device)).to(dtype)
        optimizer.step()
    seen = observe(optimizer, [param])
    return {k: v.float() for k, v in seen.items() if k in ("param 0", "x 0")}, start


@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("bf16 state, Kahan and stochastic rounding")
)
def test_updates_below_half_an_ulp_survive_where_rounding_to_nearest_loses_them(
    kind, execution, holds
):
    master, start = creep(kind, "reference", torch.float32)
    travel = (master["param 0"] - start).abs().mean()
    assert travel > 0.015  # the fp32 run travels a good part of the 0.05
    for dtype in (torch.bfloat16, torch.float16):
        ulp = torch.finfo(dtype).eps  # of values in [1, 2)
        plain, _ = creep(kind, execution, dtype)
        kahan, _ = creep(kind, execution, dtype, compensation="kahan")
        for point in master:
            # Rounded to nearest, most of the travel is lost...
            assert (plain[point] - master[point]).abs().mean() > 0.5 * travel, (dtype, point)
            # ...with Kahan every element stays within an ulp of the fp32 run.
            assert (kahan[point] - master[point]).abs().max() <= ulp, (dtype, point)
    # Rounded stochastically, bf16 parameters -- and the bf16 state, which for
    # AdaWarmScheduleFree holds the iterate z -- end within a few ulps and unbiased.
    ulp = torch.finfo(torch.bfloat16).eps
    for dtype, options in [
        (torch.bfloat16, {"compensation": "stochastic"}),
        (torch.float32, {"state_dtype": torch.bfloat16}),
    ]:
        rounded, _ = creep(kind, execution, dtype, **options)
        for point in master:
            error = rounded[point] - master[point]
            assert error.abs().mean() < 1.5 * ulp, (options, point)
            assert error.mean().abs() < 0.05 * travel, (options, point)


@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("bf16 state, Kahan and stochastic rounding")
)
def test_a_bf16_second_moment_creeping_by_less_than_half_an_ulp_moves_on_average(
    kind, execution, holds
):
    # exp_avg_sq = 1 meets gradients of 2 at step 10000 (bias correction ~1): it should grow by
    # (1 - beta2)(4 - 1) = 0.003, under half a bf16 ulp of 1 (0.0039). Rounded to nearest it
    # stays at 1; stored stochastically it is 1.003 on average.
    device = device_of(execution)
    param = torch.zeros(4096, device=device, requires_grad=True)
    options = {"state_dtype": torch.bfloat16, "betas": (0.9, 0.999), "warmup_steps": 0}
    optimizer = optimizer_for(kind, [param], execution, **{**SETTINGS, **options})
    param.grad = torch.zeros_like(param)
    optimizer.step()
    state = optimizer.state[param]
    state["exp_avg_sq"].fill_(1.0)
    state["step"].fill_(10_000.0)
    param.grad = torch.full_like(param, 2.0)
    optimizer.step()
    assert state["exp_avg_sq"].dtype == torch.bfloat16
    assert abs(state["exp_avg_sq"].float().mean().item() - 1.003) < 3e-4


@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("bf16 state, Kahan and stochastic rounding")
)
def test_stochastic_rounding_of_fp16_parameters_is_refused(kind, execution, holds):
    assert_refused(
        kind,
        execution,
        "'stochastic' rounds to bfloat16 only",
        dtype=torch.float16,
        compensation="stochastic",
    )


def takes_the_upstream_update(kind, execution, dtype=torch.float32, **options):
    """Train ``kind`` and the optimizer it replaces alike (``STEPS`` on odd sizes, evaluating
    along the way); assert that they agree, and return this run's observation."""
    params, optimizer = trained(kind, execution, dtype, **options)
    theirs = on_device(make_params(SHAPES, dtype, 0), torch.device("cpu"))
    upstream = kind.upstream(theirs, **{**SETTINGS, **options})
    grads = gradient_stream(SHAPES, dtype, STEPS, 0)
    run(upstream, theirs, grads, evaluate_after=EVALUATE_AFTER)
    ours = observe(optimizer, params)
    assert_matches(ours, observe(upstream, theirs), dtype, every=False)
    return ours


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("fp64 parameters"))
def test_fp64_parameters_take_the_update_of_the_optimizer_it_replaces(kind, execution, holds):
    if not holds:
        assert_refused(kind, execution, "float64", dtype=torch.float64)
        return
    takes_the_upstream_update(kind, execution, torch.float64)


def complex_params(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=generator).requires_grad_() for s in SHAPES]


def complex_grads(dtype, steps, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    return [
        [torch.randn(s, dtype=dtype, generator=generator) for s in SHAPES] for _ in range(steps)
    ]


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("complex parameters"))
def test_a_complex_parameter_is_a_pair_of_independent_reals(
    kind, execution, holds, dtype, maximize
):
    # torch.optim's rule: the step on a complex tensor is the step on torch.view_as_real of the
    # parameter, its gradient and its state -- through eval()/train() and a checkpoint too.
    if not holds:
        assert_refused(kind, execution, str(dtype), dtype=dtype)
        return
    grads = complex_grads(dtype, STEPS, 2)
    options = {**SETTINGS, "maximize": maximize}

    def resumed_run(params, grads):
        optimizer = optimizer_for(kind, params, execution, **options)
        run(optimizer, params, grads[:4], evaluate_after=(1,))
        saved = copy.deepcopy(optimizer.state_dict())
        resumed = [p.detach().clone().requires_grad_() for p in params]
        optimizer = optimizer_for(kind, resumed, execution, **options)
        optimizer.load_state_dict(saved)
        run(optimizer, resumed, grads[4:], evaluate_after=(1,))
        return observe(optimizer, resumed)

    ours = resumed_run(complex_params(dtype, 2), grads)
    pairs = [
        torch.view_as_real(p.detach()).clone().requires_grad_() for p in complex_params(dtype, 2)
    ]
    expected = resumed_run(pairs, [[torch.view_as_real(g) for g in step] for step in grads])
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    assert_matches(real_pairs(ours), expected, real)
    assert any(v.is_complex() and v.imag.abs().sum() > 0 for v in ours.values())


# -- the update --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("the update of the optimizer it replaces")
)
def test_it_takes_the_update_of_the_optimizer_it_replaces(kind, execution, holds):
    # AdaWarm: torch.optim.AdamW under the linear warmup; AdaWarmScheduleFree: schedulefree's
    # AdamWScheduleFree with the same warmup (the kinds' upstream), on odd sizes, fp32.
    takes_the_upstream_update(kind, execution, weight_decay=0.0)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("weight decay"))
def test_weight_decay_is_the_replaced_optimizers(kind, execution, holds):
    # AdamW's decoupled decay; schedulefree's decay at y. Without it the runs differ.
    ours = takes_the_upstream_update(kind, execution, weight_decay=0.3)
    undecayed = observe(*reversed(trained(kind, execution, weight_decay=0.0)))
    assert not torch.allclose(ours["param 4"], undecayed["param 4"])


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("maximize"))
def test_maximize_steps_up_the_gradient(kind, execution, holds):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 3)
    up, optimizer = start(kind, execution, maximize=True)
    run(optimizer, up, grads, evaluate_after=EVALUATE_AFTER)
    down, negated = start(kind, execution)
    run(negated, down, [[-g for g in step] for step in grads], evaluate_after=EVALUATE_AFTER)
    # torch's rule: the moments are those of the negated gradient too
    assert_matches(observe(optimizer, up), observe(negated, down), torch.float32)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("tensor lr and betas"))
def test_tensor_lr_and_betas_are_read_at_every_step(kind, execution, holds):
    # A schedule may change them in place; the float run gets the same values (torch keeps
    # tensor hyper-parameters in fp32) in its parameter group, at the same step.
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 4)
    lr, betas = torch.tensor(0.02), (torch.tensor(0.9), torch.tensor(0.99))
    tensors, optimizer = start(kind, execution, lr=lr, betas=betas)

    def change_in_place(index):
        if index == 4:
            lr.mul_(0.5)
            betas[0].fill_(0.8)

    run(optimizer, tensors, grads, before_step=change_in_place)
    floats, expected = start(kind, execution)

    def change_the_group(index):
        group = expected.param_groups[0]
        group["lr"] = float(torch.tensor(0.02) * (0.5 if index >= 4 else 1.0))
        group["betas"] = (float(torch.tensor(0.8 if index >= 4 else 0.9)), float(betas[1]))

    run(expected, floats, grads, before_step=change_the_group)
    assert_matches(observe(optimizer, tensors), observe(expected, floats), torch.float32)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": torch.tensor([0.1, 0.2])}, r"Invalid lr: .*Tensor lr must be 1-element"),
        ({"lr": torch.tensor(1)}, r"Invalid lr: a tensor of shape \(\) and dtype torch.int64"),
        (
            {"betas": (torch.tensor([0.9, 0.8]), 0.999)},
            r"Invalid beta1: .*Tensor betas\[0\] must be 1-element",
        ),
        (
            {"betas": (0.9, torch.tensor([0.9, 0.8]))},
            r"Invalid beta2: .*Tensor betas\[1\] must be 1-element",
        ),
    ],
    ids=["lr", "integer lr", "beta1", "beta2"],
)
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("tensor lr and betas"))
def test_a_tensor_hyper_parameter_of_more_than_one_element_is_refused_in_torchs_words(
    kind, execution, holds, options, message
):
    assert_refused(kind, execution, message, **options)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("per-group hyper-parameters"))
def test_each_group_steps_with_its_own_hyper_parameters(kind, execution, holds):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 5)
    second = {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.0, "warmup_steps": 0}
    params, optimizer = start(kind, execution)
    optimizer.param_groups[0]["params"] = params[:3]
    optimizer.add_param_group({"params": params[3:], **second})
    if kind.schedule_free:
        optimizer.train()  # a group added later starts in eval mode
    run(optimizer, params, grads, evaluate_after=EVALUATE_AFTER)
    ours = observe(optimizer, params)
    expected = {}
    for group, options in ((slice(0, 3), {}), (slice(3, None), second)):
        alone = on_device(make_params(SHAPES, torch.float32, 0)[group], device_of(execution))
        single = optimizer_for(kind, alone, execution, **{**SETTINGS, **options})
        run(single, alone, [step[group] for step in grads], evaluate_after=EVALUATE_AFTER)
        offset = group.start
        for name, value in observe(single, alone).items():
            key, index = name.rsplit(" ", 1)
            expected[f"{key} {int(index) + offset}"] = value
    assert_matches(ours, expected, torch.float32)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("closures"))
def test_a_closure_is_evaluated_with_gradients_and_its_loss_returned(kind, execution, holds):
    targets = [torch.full(s, 0.5, device=device_of(execution)) for s in SHAPES]

    def loss_of(params):
        return sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))

    params, optimizer = start(kind, execution)
    plain_params, plain = start(kind, execution)
    for _ in range(STEPS):

        def closure():
            optimizer.zero_grad()
            loss = loss_of(params)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        plain.zero_grad()
        with torch.enable_grad():
            expected_loss = loss_of(plain_params)
            expected_loss.backward()
        plain.step()
        assert torch.equal(loss.detach(), expected_loss.detach())
    assert_matches(observe(optimizer, params), observe(plain, plain_params), torch.float32)


# -- the warmup and LR schedulers --------------------------------------------------------------

SCHEDULE_STEPS, DEFAULT_RAMP = 12, 50  # "auto" at beta2 0.99 without total_steps: 50 steps
SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=SCHEDULE_STEPS),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.02, total_steps=SCHEDULE_STEPS
    ),
    "linear-then-cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=SCHEDULE_STEPS - 4),
        ],
        milestones=[4],
    ),
    # transformers' get_linear_schedule_with_warmup(opt, 4, SCHEDULE_STEPS), written out
    "hugging-face-linear": lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / 4 if s < 4 else max(0.0, (SCHEDULE_STEPS - s) / (SCHEDULE_STEPS - 4))
    ),
}


def scheduled_run(kind, execution, name, *, by_hand=0, **options):
    """``SCHEDULE_STEPS`` under scheduler ``name``: the observation at the end and the rate
    ``effective_lr()`` reported before each step. ``by_hand=W`` composes a ramp over ``W`` steps
    by hand instead (warmup_steps=0, the group's rate set to the scheduler's times the ramp)."""
    params, optimizer = start(kind, execution, **options)
    scheduler = SCHEDULERS[name](optimizer)
    group, rates = optimizer.param_groups[0], []
    for step, grads in enumerate(gradient_stream(SHAPES, torch.float32, SCHEDULE_STEPS, 13), 1):
        scheduled = group["lr"]
        if by_hand:
            group["lr"] = scheduled * min(1.0, step / by_hand)
        rates.append(optimizer.effective_lr()[0])
        run(optimizer, params, [grads])
        group["lr"] = scheduled  # chainable schedulers read it back
        scheduler.step()
    return observe(optimizer, params), rates, optimizer


def scheduled_rates(name) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=SETTINGS["lr"])
    scheduler, rates = SCHEDULERS[name](optimizer), []
    for _ in range(SCHEDULE_STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("name", "warmup_steps"),
    [("cosine", "auto"), ("one-cycle", 6), ("linear-then-cosine", 6)],
)
@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("LR schedulers compose with the ramp")
)
def test_the_rate_applied_is_the_schedulers_times_the_ramp(
    kind, execution, holds, name, warmup_steps
):
    # An explicit ramp is kept under a scheduler that warms up itself (one-cycle, linear).
    ours, rates, optimizer = scheduled_run(kind, execution, name, warmup_steps=warmup_steps)
    length = DEFAULT_RAMP if warmup_steps == "auto" else warmup_steps
    by_hand, _, _ = scheduled_run(kind, execution, name, by_hand=length, warmup_steps=0)
    assert_matches(ours, by_hand, torch.float32)
    assert optimizer.param_groups[0]["warmup_steps"] == warmup_steps
    ramped = [r * min(1.0, t / length) for t, r in enumerate(scheduled_rates(name), 1)]
    assert rates == pytest.approx(ramped, rel=1e-6)


@pytest.mark.parametrize("name", ["one-cycle", "hugging-face-linear"])
@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("LR schedulers compose with the ramp")
)
def test_the_default_ramp_steps_aside_for_a_scheduler_that_warms_up(kind, execution, holds, name):
    with pytest.warns(UserWarning, match="group 0 warms up itself"):
        ours, rates, optimizer = scheduled_run(kind, execution, name, warmup_steps="auto")
    alone, _, _ = scheduled_run(kind, execution, name, warmup_steps=0)
    assert_matches(ours, alone, torch.float32)
    assert optimizer.param_groups[0]["warmup_steps"] == 0
    # the rate reported for logging is the scheduler's: nothing else scales the step
    assert rates == pytest.approx(scheduled_rates(name), rel=1e-6)


@pytest.mark.parametrize("name", ["cosine", "linear-then-cosine"])
@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("LR schedulers compose with the ramp")
)
def test_resuming_optimizer_and_scheduler_continues_bit_for_bit(kind, execution, holds, name):
    grads = gradient_stream(SHAPES, torch.float32, SCHEDULE_STEPS, 14)

    def trained_until(stop_at):
        params, optimizer = start(kind, execution, warmup_steps=6)
        scheduler = SCHEDULERS[name](optimizer)
        for index, step_grads in enumerate(grads):
            if index == stop_at:
                saved = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))
                optimizer = optimizer_for(kind, params, execution, **SETTINGS)
                scheduler = SCHEDULERS[name](optimizer)
                optimizer.load_state_dict(saved[0])
                scheduler.load_state_dict(saved[1])
                if kind.schedule_free:
                    optimizer.train()
            run(optimizer, params, [step_grads])
            scheduler.step()
        return observe(optimizer, params)

    assert_identical(trained_until(5), trained_until(-1))


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("the warmup's length"))
def test_total_steps_sets_each_groups_default_ramp_and_late_groups_ramp_from_their_first_step(
    kind, execution, holds
):
    device = device_of(execution)
    params = on_device(make_params([(3,), (4,), (5,)], torch.float32, 15), device)
    groups = [{"params": params[:1]}, {"params": params[1:2], "total_steps": 4000}]
    optimizer = optimizer_for(kind, groups, execution, **{**SETTINGS, "warmup_steps": "auto"})
    lr = SETTINGS["lr"]
    # 50 steps without total_steps (beta2 0.99); 5 % of a 4000-step run, 200, with it
    assert optimizer.effective_lr() == pytest.approx([lr / DEFAULT_RAMP, lr / 200])
    run(optimizer, params[:2], gradient_stream([(3,), (4,)], torch.float32, 6, 15))
    assert optimizer.effective_lr() == pytest.approx([7 * lr / DEFAULT_RAMP, 7 * lr / 200])
    optimizer.add_param_group({"params": params[2:]})
    if kind.schedule_free:
        optimizer.train()
    assert optimizer.effective_lr()[2] == pytest.approx(lr / DEFAULT_RAMP)
    run(optimizer, params, gradient_stream([(3,), (4,), (5,)], torch.float32, 1, 16))
    assert [float(optimizer.state[p]["step"]) for p in params] == [7.0, 7.0, 1.0]


# -- the measured warmup ----------------------------------------------------------------------

# A rate the measured warmup holds back for some steps and then releases, changed by a
# scheduler between steps (the factor reads the rate it is applied to).
MEASURED_RATES = (0.05, 0.05, 0.04, 0.05, 0.03, 0.05, 0.02, 0.05, 0.05)


def measured_by_hand(kind, params, grads, rectify):
    """The plain optimizer (no ramp) at each step's rate times the factor of the relative
    updates measured here -- on the parameters (AdaWarm) or on ``z``, of whose move the
    parameters take ``1 - beta1`` (AdaWarmScheduleFree): the first from Adam's first step
    (every element moves by the rate), then each from the last step's move divided by the rate
    that step applied to it (none measured at rate 0: a silent rectified step)."""
    options = {**SETTINGS, "warmup_steps": 0, "rectify": rectify}
    optimizer = optimizer_for(kind, params, "reference", **options)
    beta1, beta2 = options["betas"]
    share = 1.0 - beta1 if kind.schedule_free else 1.0

    def measured() -> list[Tensor]:
        states = [optimizer.state.get(p, {}) for p in params]
        return [state.get("z", p).detach().clone() for state, p in zip(states, params, strict=True)]

    update_sq = float(sum(p.numel() for p in params))
    param_sq = sum(float(t.double().square().sum()) for t in measured())
    factors = []
    for step, (rate, step_grads) in enumerate(zip(MEASURED_RATES, grads, strict=True), 1):
        factors.append(measured_factor(rate * share, update_sq, param_sq))
        applied = rate * factors[-1]
        optimizer.param_groups[0]["lr"] = applied
        before = measured()
        run(optimizer, params, [step_grads])
        moving = applied
        if kind.schedule_free and rectify:  # z moves at the rectified rate
            moving *= rectification(step, beta2)
        if moving > 0.0:
            moves = [(a - b).double() / moving for a, b in zip(measured(), before, strict=True)]
            update_sq = sum(float(m.square().sum()) for m in moves)
            param_sq = sum(float(b.double().square().sum()) for b in before)
    return optimizer, (update_sq, param_sq), factors


@pytest.mark.parametrize("rectify", [False, True], ids=["no rectification", "rectify"])
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("the measured warmup"))
def test_the_measured_warmup_is_the_plain_step_at_the_rate_it_measures(
    kind, execution, holds, rectify
):
    device = device_of(execution)
    grads = gradient_stream(SHAPES, torch.float32, len(MEASURED_RATES), 21)
    params = on_device(make_params(SHAPES, torch.float32, 21), device)
    options = {**SETTINGS, "warmup_steps": "measured", "rectify": rectify}
    optimizer = optimizer_for(kind, params, execution, **options)
    assert optimizer.measured_factors() == [None]
    announced, applied = [], []  # warmup_factor() before each step; the factor it applied

    def set_rate(index):
        optimizer.param_groups[0]["lr"] = MEASURED_RATES[index]
        announced.append(optimizer.warmup_factor()[0])
        if index:
            applied.append(float(optimizer.measured_factors()[0]))

    run(optimizer, params, grads, before_step=set_rate)
    (factor,) = optimizer.measured_factors()
    assert factor.dtype == torch.float32 and factor.device.type == device.type
    applied.append(float(factor))
    reference_params = make_params(SHAPES, torch.float32, 21)
    plain, sums, factors = measured_by_hand(kind, reference_params, grads, rectify)
    seen = observe(optimizer, params, evaluated=False)
    entries = {name: seen.pop(name) for name in list(seen) if name.startswith("relative_update")}
    assert_matches(seen, observe(plain, reference_params, evaluated=False), torch.float32)
    # a move is a difference of parameters: their relative error over the relative update
    rtol = TOLERANCES[torch.float32][0] / MEASURED_CAP
    measured = torch.stack(list(entries.values())).sum(0).double()
    torch.testing.assert_close(measured, torch.tensor(sums, dtype=torch.float64), rtol=rtol, atol=0)
    assert applied == pytest.approx(factors, rel=rtol)
    steps = range(1, len(MEASURED_RATES) + 1)
    rectified = [rectification(t, SETTINGS["betas"][1]) if rectify else 1.0 for t in steps]
    expected = [factor * r for factor, r in zip(factors, rectified, strict=True)]
    assert announced == pytest.approx(expected, rel=rtol)
    assert len(entries) == len(params) and factors[0] < 1.0  # the first step was held back


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("the measured warmup"))
def test_the_measured_warmup_resumes_bit_for_bit(kind, execution, holds):
    device = device_of(execution)
    grads = gradient_stream(SHAPES, torch.float32, len(MEASURED_RATES), 22)
    options = {**SETTINGS, "warmup_steps": "measured"}
    straight, resumed = (on_device(make_params(SHAPES, torch.float32, 22), device) for _ in "ab")
    uninterrupted = optimizer_for(kind, straight, execution, **options)
    run(uninterrupted, straight, grads)
    first = optimizer_for(kind, resumed, execution, **options)
    run(first, resumed, grads[:4])
    second = optimizer_for(kind, resumed, execution, **options)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run(second, resumed, grads[4:])
    assert_identical(
        observe(second, resumed, evaluated=False),
        observe(uninterrupted, straight, evaluated=False),
    )


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("the measured warmup"))
def test_the_measured_warmup_measures_nothing_of_a_skipped_step_or_at_rate_0(
    kind, execution, holds
):
    device = device_of(execution)
    grads = gradient_stream(SHAPES, torch.float32, 3, 23)
    params = on_device(make_params(SHAPES, torch.float32, 23), device)
    optimizer = optimizer_for(kind, params, execution, **{**SETTINGS, "warmup_steps": "measured"})
    run(optimizer, params, grads[:2])
    before = {k: v for k, v in observe(optimizer, params).items() if "relative_update" in k}
    optimizer.step(found_inf=torch.tensor(1.0, device=device))  # GradScaler skips it
    optimizer.param_groups[0]["lr"] = 0.0
    run(optimizer, params, grads[2:])
    after = observe(optimizer, params)
    assert len(before) == len(params)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


# -- execution choices -------------------------------------------------------------------------

# The options that choose each execution (each replacing all of EXECUTIONS' options).
SELECTIONS = {
    "reference": [{"foreach": False}, {"foreach": False, "fused": False}],
    "foreach": [{"foreach": True}, {"fused": False}],
    "fused": [{"fused": True}],
    "Triton": [{"backend": "triton"}, {"backend": "triton", "fused": True}],
}
# What no option chooses on CPU tensors: torch's fused AdamW kernel, or foreach ops where no
# fused kernel computes the update.
AUTOMATIC_ON_CPU = {"AdaWarm": "fused", "AdaWarmScheduleFree": "foreach"}


def selected(selection: dict) -> dict:
    return {"backend": None, "foreach": None, "fused": None, **selection}


def replace_launch(monkeypatch, kind, execution, replacement) -> None:
    """Patch where ``execution`` launches its update with ``replacement(original)``."""
    owner, name = kind.launch_points[execution]
    if isinstance(owner, dict):
        monkeypatch.setitem(owner, name, replacement(owner[name]))
    else:
        monkeypatch.setattr(owner, name, replacement(getattr(owner, name)))


def count_launches(monkeypatch, kind, execution) -> list[int]:
    """A list that grows by one at each launch of ``execution``."""
    calls: list[int] = []

    def counting(original):
        def launch(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        return launch

    replace_launch(monkeypatch, kind, execution, counting)
    return calls


@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("foreach and fused choose the implementation")
)
def test_foreach_and_fused_choose_the_implementation(monkeypatch, kind, execution, holds):
    selections = list(SELECTIONS[execution])
    if AUTOMATIC_ON_CPU[kind.name] == execution:
        selections.append({})
    for selection in selections:
        launches = count_launches(monkeypatch, kind, execution)
        params, optimizer = start(kind, execution, **selected(selection))
        run(optimizer, params, gradient_stream(SHAPES, torch.float32, 2, 0))
        assert launches, f"{selection} did not run {execution}"
        monkeypatch.undo()


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_a_fused_request_that_no_kernel_serves_is_refused(kind):
    param = torch.zeros(3, device="meta", requires_grad=True)
    param.grad = torch.zeros(3, device="meta")
    optimizer = optimizer_for(kind, [param], "reference", **selected({"fused": True}))
    with pytest.raises(RuntimeError, match=r"fused=True: no fused kernel serves tensors on meta"):
        optimizer.step()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"foreach": True, "fused": True}, ValueError, r"foreach=True with fused=True"),
        ({"foreach": 1}, TypeError, r"Invalid foreach: 1, expected None, True or False"),
        ({"fused": "yes"}, TypeError, r"Invalid fused: 'yes'"),
        ({"foreach": True, "backend": "triton"}, ValueError, r"foreach=True with backend='triton'"),
        ({"fused": False, "capturable": True}, ValueError, r"capturable=True with fused=False"),
    ],
)
@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_contradicting_choices_are_refused(kind, options, error, message):
    with pytest.raises(error, match=message):
        kind.make(make_params([(3,)], torch.float32, 0), **options)


# -- mixed precision and CUDA graphs -----------------------------------------------------------


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("GradScaler"))
def test_grad_scale_unscales_inside_the_step(kind, execution, holds):
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 6)
    scale = torch.tensor(1024.0, device=device_of(execution))
    no_inf = torch.zeros((), device=device_of(execution))
    params, optimizer = start(kind, execution)
    scaled, with_scale = start(kind, execution)
    for step in grads:
        run(optimizer, params, [step])
        for param, grad in zip(scaled, step, strict=True):
            param.grad = grad.to(param.device) * scale
        with_scale.step(grad_scale=scale, found_inf=no_inf)
    assert_matches(observe(with_scale, scaled), observe(optimizer, params), torch.float32)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("GradScaler"))
def test_a_step_with_found_inf_changes_nothing_and_does_not_advance_the_warmup(
    kind, execution, holds
):
    params, optimizer = trained(kind, execution, steps=2)
    before = snapshot(optimizer, params)
    factor = optimizer.warmup_factor()
    for param in params:
        param.grad = torch.full_like(param, float("inf"))
    found_inf = torch.ones((), device=device_of(execution))
    optimizer.step(grad_scale=torch.tensor(2.0, device=found_inf.device), found_inf=found_inf)
    assert_unchanged(optimizer, params, before)
    assert optimizer.warmup_factor() == factor


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("GradScaler"))
def test_a_grad_scaler_loop_skips_its_inf_steps(kind, execution, holds):
    device = device_of(execution)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).to(device)
    optimizer = optimizer_for(kind, model.parameters(), execution, **SETTINGS)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    skipped = (2, 5)
    for step in range(STEPS):
        loss = model(torch.randn(4, 6, device=device)).square().mean()
        if step in skipped:
            loss = loss * float("inf")
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    for param in model.parameters():
        assert float(optimizer.state[param]["step"]) == STEPS - len(skipped)
        assert torch.isfinite(param).all()


@pytest.mark.parametrize("warmup", [3, "measured"])
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("capturable"))
def test_a_capturable_step_is_the_plain_one(kind, execution, holds, warmup):
    # Under a CUDA graph (tests/test_gpu.py, tests/test_kernel_smoke.py) the rate is a tensor on
    # the device and nothing is read on the host; here, the same step outside one.
    if not holds:
        assert_refused(kind, execution, "capturable=True", capturable=True)
        return
    device = device_of(execution)
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 7)
    params, optimizer = start(
        kind,
        execution,
        capturable=True,
        lr=torch.tensor(0.02, device=device),
        warmup_steps=warmup,
    )
    run(optimizer, params, grads, evaluate_after=EVALUATE_AFTER)
    plain_params, plain = start(kind, execution, lr=float(torch.tensor(0.02)), warmup_steps=warmup)
    run(plain, plain_params, grads, evaluate_after=EVALUATE_AFTER)
    assert_matches(observe(optimizer, params), observe(plain, plain_params), torch.float32)


# -- checkpoints -------------------------------------------------------------------------------


# Parameter dtype, storage options and the step the run stops at: mid-warmup (SETTINGS' ramp
# is 3 steps) and past it.
ROUND_TRIPS = {
    "fp32, mid-warmup": (torch.float32, {}, 2),
    "bf16 Kahan": (torch.bfloat16, {"compensation": "kahan"}, 5),
    "bf16 all stochastic": (*STORAGES["bf16, all stochastic"], 4),
}


@pytest.mark.parametrize("storage", ROUND_TRIPS)
@pytest.mark.parametrize(("kind", "execution", "holds"), cases("state_dict round trip"))
def test_a_checkpoint_resumes_bit_for_bit(kind, execution, holds, storage):
    # Random streams included; a deep copy and a pickle of the optimizer (with their own copies
    # of the parameters) step on like it too.
    dtype, options, stop_at = ROUND_TRIPS[storage]
    grads = gradient_stream(SHAPES, dtype, STEPS, 8)
    params, optimizer = start(kind, execution, dtype, rounding_seed=9, **options)
    run(optimizer, params, grads[:stop_at], evaluate_after=(1,))
    model = [p.detach().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    run(optimizer, params, grads[stop_at:], evaluate_after=(1,))
    expected = observe(optimizer, params)

    resumed, fresh = start(kind, execution, dtype, **options)  # the seed comes with the groups
    with torch.no_grad():
        for param, value in zip(resumed, model, strict=True):
            param.copy_(value)
    fresh.load_state_dict(saved)
    copies.append(fresh)
    for other in copies:
        assert str(other.state_dict()["param_groups"]) == str(saved["param_groups"])
        assert other.state_dict()["state"].keys() == saved["state"].keys()
        other_params = other.param_groups[0]["params"]
        run(other, other_params, grads[stop_at:], evaluate_after=(1,))
        assert_identical(observe(other, other_params), expected)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("state_dict round trip"))
def test_a_checkpoint_converts_between_state_dtypes_and_compensation(kind, execution, holds):
    # docs/low-precision.md's rule: states cast to the loader's state dtype (to nearest even;
    # bf16 -> fp32 is exact), Kahan buffers created empty where only the loader keeps them and
    # dropped where it keeps none.
    params, fp32_state = trained(kind, execution, torch.bfloat16, steps=3)
    tensors = [
        key for key in kind.state_keys if key != "step" and fp32_state.state[params[4]][key].dim()
    ]
    half = optimizer_for(
        kind, params, execution, **SETTINGS, state_dtype=torch.bfloat16, compensation="kahan"
    )
    half.load_state_dict(copy.deepcopy(fp32_state.state_dict()))
    back = optimizer_for(kind, params, execution, **SETTINGS)
    back.load_state_dict(copy.deepcopy(half.state_dict()))
    for param in params:
        source, state, restored = fp32_state.state[param], half.state[param], back.state[param]
        for key in tensors:
            assert state[key].dtype == torch.bfloat16
            assert torch.equal(state[key], source[key].to(torch.bfloat16)), key
            assert restored[key].dtype == torch.float32
            assert torch.equal(restored[key], state[key].float()), key
        assert torch.equal(state["compensation"], torch.zeros_like(param))
        assert "compensation" not in restored


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("state_dict round trip"))
def test_a_checkpoint_that_does_not_fit_is_refused_and_nothing_loads(kind, execution, holds):
    _, optimizer = trained(kind, execution, steps=2)
    saved = optimizer.state_dict()
    other_shapes = [*SHAPES[:-2], (5, 3), (1025,)]
    params, other = start(kind, execution, shapes=other_shapes)
    run(other, params, gradient_stream(other_shapes, torch.float32, 2, 0))
    before = snapshot(other, params)
    with pytest.raises(ValueError, match=r"of parameter 3 has shape \(3, 5\), expected \(5, 3\)"):
        other.load_state_dict(saved)
    assert_unchanged(other, params, before)
    # other group counts and sizes, and hyper-parameters out of their domain, neither
    groups = copy.deepcopy(saved)
    groups["param_groups"].append({**groups["param_groups"][0], "params": []})
    with pytest.raises(ValueError, match="has 2 parameter groups, expected 1"):
        other.load_state_dict(groups)
    fewer = copy.deepcopy(saved)
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match=f"has {len(SHAPES) - 1} parameters, expected"):
        other.load_state_dict(fewer)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["betas"] = (0.9, 2.0)
    with pytest.raises(ValueError, match=r"Invalid beta2: 2\.0"):
        other.load_state_dict(bad)
    assert_unchanged(other, params, before)


@pytest.mark.parametrize(
    ("kind", "execution", "holds"), cases("checkpoints of the optimizer it replaces")
)
def test_a_checkpoint_of_the_optimizer_it_replaces_continues_identically(kind, execution, holds):
    # AdamW's state_dict counts as warmed up; schedulefree's is saved in eval mode, as its README
    # asks, and carries its mode and warmup.
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 9)
    theirs = on_device(make_params(SHAPES, torch.float32, 0), torch.device("cpu"))
    upstream = kind.upstream(theirs, **SETTINGS)
    run(upstream, theirs, grads[:4])
    if kind.schedule_free:
        upstream.eval()
    model = [p.detach().clone() for p in theirs]
    saved = copy.deepcopy(upstream.state_dict())
    if kind.schedule_free:
        upstream.train()
    run(upstream, theirs, grads[4:])

    params = on_device(model, device_of(execution))
    optimizer = optimizer_for(kind, params, execution, **SETTINGS)
    optimizer.load_state_dict(saved)
    if kind.schedule_free:
        assert optimizer.param_groups[0]["train_mode"] is False  # the mode came with it
        optimizer.train()
    run(optimizer, params, grads[4:])
    assert_matches(
        observe(optimizer, params), observe(upstream, theirs), torch.float32, every=False
    )


# -- safety ------------------------------------------------------------------------------------


class InjectedFailure(Exception):
    pass


def fail_launch(monkeypatch, kind, execution, number: int, *, run_first: bool) -> None:
    """Make launch ``number`` (from 1) of ``execution`` raise; with ``run_first`` it runs
    before it raises, changing tensors, like a kernel error midway through a step."""
    calls: list[int] = []

    def failing(original):
        def launch(*args, **kwargs):
            calls.append(1)
            if len(calls) != number:
                return original(*args, **kwargs)
            if run_first:
                original(*args, **kwargs)
            raise InjectedFailure("injected launch failure")

        return launch

    replace_launch(monkeypatch, kind, execution, failing)


def two_groups(kind, execution):
    params, optimizer = start(kind, execution)
    optimizer.param_groups[0]["params"] = params[:3]
    optimizer.add_param_group({"params": params[3:], "lr": 0.05, "weight_decay": 0.0})
    if kind.schedule_free:
        optimizer.train()
    return params, optimizer


def set_grads(params, grads) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.to(param.device, copy=True)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("all-or-nothing steps"))
def test_a_first_step_that_fails_midway_puts_everything_back(monkeypatch, kind, execution, holds):
    grads = gradient_stream(SHAPES, torch.float32, 3, 10)
    params, optimizer = two_groups(kind, execution)
    set_grads(params, grads[0])
    before = snapshot(optimizer, params)
    fail_launch(monkeypatch, kind, execution, 2, run_first=True)  # the second group's
    with pytest.raises(RuntimeError, match="as they were before the step") as raised:
        optimizer.step()
    assert isinstance(raised.value.__cause__, InjectedFailure)
    # and it names the way out
    way_out = "pass backend='torch'" if execution == "Triton" else "PyTorch backend raised it"
    assert way_out in str(raised.value)
    assert_unchanged(optimizer, params, before)
    assert not any(optimizer.state.values()), "the states this step created are removed"
    monkeypatch.undo()
    run(optimizer, params, grads)
    expected_params, expected = two_groups(kind, execution)
    run(expected, expected_params, grads)
    assert_identical(observe(optimizer, params), observe(expected, expected_params))


def past_the_threshold(kind, execution):
    """Two groups after 7 steps, gradients set for the 8th: the parameters, the optimizer, and
    a snapshot of both."""
    grads = gradient_stream(SHAPES, torch.float32, STEPS, 10)
    params, optimizer = two_groups(kind, execution)
    run(optimizer, params, grads[:7])
    set_grads(params, grads[7])
    return params, optimizer, snapshot(optimizer, params)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("all-or-nothing steps"))
def test_a_failing_step_of_a_new_configuration_is_put_back(monkeypatch, kind, execution, holds):
    # Past the rectification threshold, the first step with a GradScaler's scale (a kernel
    # variant not run yet, no state to create) fails midway: it is put back too.
    params, optimizer, before = past_the_threshold(kind, execution)
    fail_launch(monkeypatch, kind, execution, 2, run_first=True)
    with pytest.raises(RuntimeError, match="as they were before the step"):
        optimizer.step(grad_scale=torch.ones((), device=device_of(execution)))
    assert_unchanged(optimizer, params, before)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("all-or-nothing steps"))
def test_a_later_step_that_cannot_launch_changes_nothing(monkeypatch, kind, execution, holds):
    # A configuration that has run keeps no copy (docs/adamw.md): a launch that fails before it
    # runs must still leave everything as it was, step counters included.
    params, optimizer, before = past_the_threshold(kind, execution)
    fail_launch(monkeypatch, kind, execution, 1, run_first=False)
    with pytest.raises(InjectedFailure):
        optimizer.step()
    assert_unchanged(optimizer, params, before)


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("all-or-nothing steps"))
def test_refused_inputs_between_steps_change_nothing(kind, execution, holds):
    params, optimizer = two_groups(kind, execution)
    run(optimizer, params, gradient_stream(SHAPES, torch.float32, 2, 11))
    before = snapshot(optimizer, params)
    optimizer.param_groups[1]["lr"] = -5.0
    with pytest.raises(ValueError, match=r"Invalid lr: -5\.0"):
        optimizer.step()
    optimizer.param_groups[1]["lr"] = 0.05
    assert_unchanged(optimizer, params, before)
    # values changed in place, which a step must see although the group's entries are the same
    # objects as at its last step: betas in a list, a tensor rate
    optimizer.param_groups[0]["betas"] = [0.9, 0.99]
    run(optimizer, params, gradient_stream(SHAPES, torch.float32, 1, 12))
    before = snapshot(optimizer, params)
    optimizer.param_groups[0]["betas"][1] = 1.5
    with pytest.raises(ValueError, match=r"Invalid beta2: 1\.5"):
        optimizer.step()
    optimizer.param_groups[0]["betas"] = (0.9, 0.99)
    rate = torch.tensor(0.02)
    optimizer.param_groups[1]["lr"] = rate
    run(optimizer, params, gradient_stream(SHAPES, torch.float32, 1, 13))
    before = snapshot(optimizer, params)
    rate.fill_(-1.0)
    with pytest.raises(ValueError, match=r"Invalid lr: -1\.0"):
        optimizer.step()
    rate.fill_(0.02)
    assert_unchanged(optimizer, params, before)
    params[3].grad = torch.ones(3, 5).to_sparse().to(params[3].device)
    with pytest.raises(RuntimeError, match=r"sparse gradient .* shape \(3, 5\)"):
        optimizer.step()
    assert_unchanged(optimizer, params, before)
    # a gradient of another dtype: torch refuses it when assigned unless the parameter's
    # grad_dtype (torch >= 2.9) allows it; then the step refuses it
    wrong = torch.ones(3, 5, dtype=torch.float64, device=params[3].device)
    if not hasattr(torch.Tensor, "grad_dtype"):
        with pytest.raises(RuntimeError, match="dtype"):
            params[3].grad = wrong
        return
    params[3].grad_dtype = None
    params[3].grad = wrong
    with pytest.raises(RuntimeError, match=r"dtype torch.float64 does not match"):
        optimizer.step()
    assert_unchanged(optimizer, params, before)


BAD_HYPER_PARAMETERS = [
    ({"lr": -1e-3}, ValueError, r"Invalid lr: -0.001"),
    ({"lr": float("nan")}, ValueError, r"Invalid lr: nan"),
    ({"lr": "fast"}, TypeError, r"Invalid lr: 'fast'"),
    ({"eps": -1e-8}, ValueError, r"Invalid epsilon value: -1e-08"),
    ({"betas": (1.0, 0.999)}, ValueError, r"Invalid beta1: 1.0, expected 0 <= beta1 < 1"),
    ({"betas": (0.9, 1.5)}, ValueError, r"Invalid beta2: 1.5, expected 0 <= beta2 < 1"),
    ({"betas": (0.9, torch.tensor(1.5))}, ValueError, r"Invalid beta2: tensor\(1.5000\)"),
    ({"betas": (0.9,)}, ValueError, r"Invalid betas: \(0.9,\), expected a pair"),
    ({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0.1"),
    ({"warmup_steps": -1}, ValueError, r"Invalid warmup_steps: -1"),
    ({"warmup_steps": 2.5}, TypeError, r"Invalid warmup_steps: 2.5"),
    ({"warmup_steps": "tuned"}, ValueError, r"Invalid warmup_steps: 'tuned'"),
    ({"total_steps": 0}, ValueError, r"Invalid total_steps: 0, expected None or an int >= 1"),
    ({"rectify": "yes"}, TypeError, r"Invalid rectify: 'yes'"),
    ({"betas": (0.9, 0.5), "rectify": True}, ValueError, r"Invalid beta2 for rectify=True: 0.5"),
    ({"maximize": 1}, TypeError, r"Invalid maximize: 1, expected True or False"),
    ({"backend": "cuda"}, ValueError, r"Invalid backend: 'cuda'"),
    ({"state_dtype": torch.float16}, ValueError, r"Invalid state_dtype: torch.float16"),
    ({"compensation": "exact"}, ValueError, r"Invalid compensation: 'exact'"),
    ({"rounding_seed": -1}, ValueError, r"Invalid rounding_seed: -1"),
]
# What only one optimizer has: AdamW's options without an algorithm here, the average's powers.
OWN_BAD_HYPER_PARAMETERS = {
    "AdaWarm": [
        ({"amsgrad": True}, ValueError, r"Invalid amsgrad: True; AdaWarm has no AMSGrad"),
        ({"differentiable": True}, ValueError, r"Invalid differentiable: True"),
    ],
    "AdaWarmScheduleFree": [
        ({"betas": (0.0, 0.999)}, ValueError, r"Invalid beta1: 0.0, expected 0 < beta1 < 1"),
        ({"r": -1.0}, ValueError, r"Invalid r: -1.0"),
        ({"weight_lr_power": float("nan")}, ValueError, r"Invalid weight_lr_power: nan"),
    ],
}


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("bad hyper-parameters are refused"))
def test_bad_hyper_parameters_are_refused_naming_the_value(kind, execution, holds):
    # beta2 = 0.5 is fine without rectification (rho_inf <= 5 only matters with it)
    optimizer_for(kind, make_params([(3,)], torch.float32, 0), execution, betas=(0.9, 0.5))
    for options, error, message in BAD_HYPER_PARAMETERS + OWN_BAD_HYPER_PARAMETERS[kind.name]:
        params = on_device(make_params(SHAPES, torch.float32, 0), device_of(execution))
        with pytest.raises(error, match=message):
            optimizer_for(kind, params, execution, **{**SETTINGS, **options})
        optimizer = optimizer_for(kind, params[:2], execution, **SETTINGS)
        with pytest.raises(error, match=message):  # nor can a group be added with it
            optimizer.add_param_group({"params": params[2:], **options})
        assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize(("kind", "execution", "holds"), cases("gradients are read, never written"))
def test_a_step_reads_the_gradients_and_never_writes_them(kind, execution, holds):
    # maximize negates and grad_scale divides: neither may happen in the gradients themselves.
    device = device_of(execution)
    params, optimizer = start(kind, execution, maximize=True)
    grads = gradient_stream(SHAPES, torch.float32, 4, 12)
    for step, scale in enumerate([None, torch.tensor(4.0, device=device)] * 2):
        for param, grad in zip(params, grads[step], strict=True):
            param.grad = grad.to(device, copy=True)
        optimizer.step(grad_scale=scale)
        for index, (param, grad) in enumerate(zip(params, grads[step], strict=True)):
            assert torch.equal(param.grad.cpu(), grad), f"the gradient of parameter {index} changed"
