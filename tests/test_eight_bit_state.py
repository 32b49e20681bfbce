"""8-bit states (``state_dtype=torch.uint8``) of both optimizers on the torch backend: their
layout, drift, checkpoints and their conversions, bad options, skipped and failed steps, bytes
held (each step against fp32 states decoded from them is in the promise matrix,
tests/test_promises.py; FSDP2 and distributed checkpoints in tests/test_distributed.py)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from adawarm import AdaWarm, AdaWarmScheduleFree, torch_backend
from adawarm.functional import adawarm
from adawarm.quantization import (
    EIGHT_BIT,
    FIRST_MOMENT,
    MIN_8BIT_SIZE,
    SECOND_MOMENT,
    block_count,
    dequantize,
    quantize,
    scales_key,
)
from adawarm.state import moment_entries

# Below the size threshold, at it, and above it with a last block of 1 and of 67 elements.
SHAPES = ((7,), (4095,), (4096,), (4097,), (65, 67), (1025, 5))
# Per optimizer: its class, and its states that may be 8-bit with their codes.
KINDS = {
    "AdaWarm": (AdaWarm, {"exp_avg": FIRST_MOMENT, "exp_avg_sq": SECOND_MOMENT}),
    "AdaWarmScheduleFree": (AdaWarmScheduleFree, {"exp_avg_sq": SECOND_MOMENT}),
}


def make_params(shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def make_optimizer(name, params, **options):
    optimizer = KINDS[name][0](params, backend="torch", **options)
    if name == "AdaWarmScheduleFree":
        optimizer.train()
    return optimizer


def set_gradients(params, step, seed=1):
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)


def state_copy(optimizer, params):
    return [
        {key: value.clone() for key, value in optimizer.state[param].items()} for param in params
    ]


def test_large_tensors_get_codes_and_block_scales_and_small_ones_fp32():
    shapes = (*SHAPES, (0,))
    params = [*make_params(shapes), torch.zeros(5000, dtype=torch.float64, requires_grad=True)]
    optimizer = make_optimizer("AdaWarm", params, state_dtype=EIGHT_BIT)
    set_gradients(params, 0)
    optimizer.step()
    for param in params:
        state = optimizer.state[param]
        eight_bit = param.dtype == torch.float32 and param.numel() >= MIN_8BIT_SIZE
        for key in ("exp_avg", "exp_avg_sq"):
            if not eight_bit:
                assert state[key].dtype == param.dtype and scales_key(key) not in state
                continue
            assert state[key].dtype == torch.uint8 and state[key].shape == param.shape
            scales = state[scales_key(key)]
            assert scales.dtype == torch.float32 and scales.shape == (block_count(param.numel()),)
    # min_8bit_size=0: every fp32 tensor, empty ones too
    for param in make_params(((0,), (1,), (257,))):
        entries = moment_entries(param, "exp_avg", EIGHT_BIT, 0)
        assert entries["exp_avg"].dtype == torch.uint8
        assert entries["exp_avg_scales"].shape == (block_count(param.numel()),)
    schedule_free = make_optimizer("AdaWarmScheduleFree", params[:3], state_dtype=EIGHT_BIT)
    set_gradients(params[:3], 0)
    schedule_free.step()
    state = schedule_free.state[params[2]]
    assert state["z"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.uint8


def creeping_run(state_dtype, rounding_seed=0, steps=800):
    """Moments of a 4096-element tensor under gradients that creep, through the functional
    step (``rounding_seed=None``: every store to the nearest code): the first element of each
    block stays at 1 (its largest, so the block's scale stays put), the others grow from
    0.02-0.5 by half over the run, far more slowly per step than the gap between their codes.
    lr=0 keeps the parameter, so runs of every state dtype see the same gradients."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(MIN_8BIT_SIZE, generator=generator) * 0.48 + 0.02
    base[::256] = 1.0
    param = torch.zeros(MIN_8BIT_SIZE)
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        moments.update(moment_entries(param, key, state_dtype, MIN_8BIT_SIZE))
    eight_bit = state_dtype == EIGHT_BIT
    scales = {key: [moments[key]] for key in moments if key.endswith("_scales")}
    step = torch.tensor(0.0)
    for index in range(steps):
        growth = torch.full_like(base, 1.0 + 0.5 * index / steps)
        growth[::256] = 1.0
        adawarm(
            [param], [base * growth], [moments["exp_avg"]], [moments["exp_avg_sq"]], [step],
            lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
            rectify=False, backend="torch", rounding_seed=rounding_seed, **scales,
        )  # fmt: skip
    if not eight_bit:
        return moments["exp_avg"], moments["exp_avg_sq"]
    return (
        dequantize(moments["exp_avg"], moments["exp_avg_scales"], FIRST_MOMENT),
        dequantize(moments["exp_avg_sq"], moments["exp_avg_sq_scales"], SECOND_MOMENT),
    )


def test_8_bit_moments_follow_fp32_moments_that_creep_where_rounding_to_nearest_stalls():
    fp32 = creeping_run(None)
    stochastic = creeping_run(EIGHT_BIT)
    nearest = creeping_run(EIGHT_BIT, rounding_seed=None)
    creepers = torch.ones(MIN_8BIT_SIZE, dtype=torch.bool)
    creepers[::256] = False
    for name, exact, unbiased, stalled, root in zip(
        ("exp_avg", "exp_avg_sq"), fp32, stochastic, nearest, (False, True), strict=True
    ):
        if root:  # the second moment is coded as its square root
            exact, unbiased, stalled = exact.sqrt(), unbiased.sqrt(), stalled.sqrt()
        relative = (unbiased / exact - 1.0)[creepers]
        # stochastic stores: no bias on average (within 0.05 % here), each a code or two off
        # (1.5 % and 2.9 % on average)
        assert relative.mean().abs() < 0.005, name
        assert relative.abs().mean() < 0.05, name
        # rounded to the nearest code, the creeping moments stay behind (17 % and 22.5 %)
        assert (stalled / exact - 1.0)[creepers].mean() < -0.1, name


def trained(name, params, steps=6, state_dtype=EIGHT_BIT):
    optimizer = make_optimizer(name, params, state_dtype=state_dtype)
    for step in range(1, steps + 1):
        set_gradients(params, step)
        optimizer.step()
    return optimizer


def assert_same_states(actual, expected):
    assert len(actual) == len(expected)
    for index, (mine, theirs) in enumerate(zip(actual, expected, strict=True)):
        assert mine.keys() == theirs.keys(), index
        for key, value in theirs.items():
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), (index, key)


@pytest.mark.parametrize("name", KINDS)
def test_a_state_dict_round_trips_bit_for_bit_and_training_goes_on_identically(name):
    params = make_params(SHAPES)
    optimizer = trained(name, params)
    copies = [param.detach().clone().requires_grad_() for param in params]
    loaded = make_optimizer(name, copies, state_dtype=EIGHT_BIT)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert_same_states(state_copy(loaded, copies), state_copy(optimizer, params))
    set_gradients(params, 7)
    set_gradients(copies, 7)
    optimizer.step()
    loaded.step()
    for param, twin in zip(params, copies, strict=True):
        assert torch.equal(param, twin)
    assert_same_states(state_copy(loaded, copies), state_copy(optimizer, params))


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("full_dtype", [None, torch.bfloat16])
def test_checkpoints_convert_between_8_bit_and_full_precision_moments(name, full_dtype):
    """8-bit moments load into fp32/bf16 ones as the values they code; fp32/bf16 moments into
    8-bit ones as the nearest codes (small tensors keep full precision either way)."""
    codes = KINDS[name][1]
    params = make_params(SHAPES)
    eight_bit = trained(name, params)
    full = make_optimizer(name, params, state_dtype=full_dtype)
    full.load_state_dict(copy.deepcopy(eight_bit.state_dict()))
    for param in params:
        coded, decoded = eight_bit.state[param], full.state[param]
        for key, code in codes.items():
            if coded[key].dtype == EIGHT_BIT:
                expected = dequantize(coded[key], coded[scales_key(key)], code)
            else:
                expected = coded[key]
            assert torch.equal(decoded[key], expected.to(full_dtype or torch.float32)), key
            assert scales_key(key) not in decoded
    full_params = make_params(SHAPES, seed=3)
    full = trained(name, full_params, state_dtype=full_dtype)
    eight_bit = make_optimizer(name, full_params, state_dtype=EIGHT_BIT)
    eight_bit.load_state_dict(copy.deepcopy(full.state_dict()))
    for param in full_params:
        values, loaded = full.state[param], eight_bit.state[param]
        for key, code in codes.items():
            if param.numel() < MIN_8BIT_SIZE:
                assert torch.equal(loaded[key], values[key].float()), key
                continue
            expected_codes, expected_scales = quantize(values[key].float(), code)
            assert torch.equal(loaded[key], expected_codes), key
            assert torch.equal(loaded[scales_key(key)], expected_scales), key


@pytest.mark.parametrize("name", KINDS)
def test_a_checkpoint_whose_8_bit_moment_lacks_its_scales_is_refused_before_loading(name):
    params = make_params(SHAPES)
    saved = copy.deepcopy(trained(name, params).state_dict())
    key = "exp_avg_sq_scales"
    target = make_optimizer(name, make_params(SHAPES), state_dtype=EIGHT_BIT)
    for broken, named in ((None, "None"), (torch.zeros(3), r"torch.float32 of shape \(3,\)")):
        state_dict = copy.deepcopy(saved)
        if broken is None:
            del state_dict["state"][2][key]
        else:
            state_dict["state"][2][key] = broken
        with pytest.raises(ValueError, match=rf"exp_avg_sq of parameter 2 is 8-bit, .* {named}"):
            target.load_state_dict(state_dict)
        assert not target.state


@pytest.mark.parametrize("name", KINDS)
def test_a_step_that_gradscaler_skips_changes_no_code_scale_or_counter(name):
    params = make_params(SHAPES)
    optimizer = trained(name, params, steps=2)
    before = state_copy(optimizer, params)
    values = [param.detach().clone() for param in params]
    set_gradients(params, 3)
    optimizer.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert_same_states(state_copy(optimizer, params), before)
    assert all(map(torch.equal, params, values))


@pytest.mark.parametrize("name", KINDS)
def test_a_step_that_fails_storing_8_bit_moments_leaves_codes_scales_and_counters(name):
    params = make_params(SHAPES)
    optimizer = trained(name, params, steps=2)
    before = state_copy(optimizer, params)
    values = [param.detach().clone() for param in params]

    def fail_midway(codes, scales, *args, **kwargs):
        codes[0].fill_(3)  # one tensor's codes and scales overwritten, then a failure
        scales[0].fill_(5.0)
        raise RuntimeError("store failed")

    set_gradients(params, 3)
    failing = mock.patch.object(torch_backend, "store_quantized", fail_midway)
    # a configuration not stepped before (skippable: found_inf given), so the step keeps copies
    # to put back
    with failing, pytest.raises(RuntimeError, match="store failed"):
        optimizer.step(found_inf=torch.tensor(0.0))
    assert_same_states(state_copy(optimizer, params), before)
    assert all(map(torch.equal, params, values))


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"state_dtype": torch.int8}, r"Invalid state_dtype: torch.int8, expected None, .*uint8"),
        ({"min_8bit_size": -1}, r"Invalid min_8bit_size: -1, expected an int >= 0"),
        ({"min_8bit_size": True}, r"Invalid min_8bit_size: True, expected an int >= 0"),
        ({"min_8bit_size": 2.5}, r"Invalid min_8bit_size: 2.5, expected an int >= 0"),
    ],
)
def test_bad_8_bit_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        KINDS[name][0](make_params(SHAPES[:1]), **options)


@pytest.mark.parametrize(
    ("name", "dtype", "options", "per_parameter"),
    [
        # 1-byte codes of both moments and a 4-byte scale per 256 of each: 2.03 bytes of state
        ("AdaWarm", torch.float32, {}, 4 + 2 * (1 + 4 / 256)),
        ("AdaWarm", torch.bfloat16, {"compensation": "stochastic"}, 2 + 2 * (1 + 4 / 256)),
        # z stays fp32
        ("AdaWarmScheduleFree", torch.bfloat16, {}, 2 + 4 + 1 + 4 / 256),
    ],
)
def test_bytes_held_per_parameter(name, dtype, options, per_parameter):
    """docs/low-precision.md's memory figures: the bytes of a 2^20-element parameter and its
    state tensors (counters and averages are a few bytes a tensor, left out)."""
    param = torch.zeros(1 << 20, dtype=dtype, requires_grad=True)
    optimizer = make_optimizer(name, [param], state_dtype=EIGHT_BIT, **options)
    param.grad = torch.ones_like(param)
    optimizer.step()
    held = [param, *(t for t in optimizer.state[param].values() if t.dim() > 0)]
    total = sum(tensor.numel() * tensor.element_size() for tensor in held)
    assert total / param.numel() == per_parameter
