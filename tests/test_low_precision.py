"""bf16 moments and Kahan-compensated bf16/fp16 parameters, against an fp32 master trajectory."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_bit_identical, assert_close

from adawarm import AdaWarm, adawarm, rounding
from adawarm.state import moment_like

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# A quadratic 0.5 |p - target|^2 whose optimum lies 0.05 away from a start near 1, where a bf16
# ulp is 2^-7 = 0.0078: Adam's normalised steps of about lr = 2e-4 are far below half an ulp.
STEPS, LR = 300, 2e-4


def quadratic_trajectory(dtype, backend, **options):
    generator = torch.Generator().manual_seed(0)
    start = 1.0 + 0.5 * torch.rand(1000, generator=generator)
    target = start + 0.05
    param = start.clone().to(dtype).to(DEVICE).requires_grad_()
    opt = AdaWarm([param], lr=LR, warmup_steps=0, weight_decay=0.0, backend=backend, **options)
    for _ in range(STEPS):
        param.grad = (param.detach().float() - target.to(DEVICE)).to(dtype)
        opt.step()
    return param.detach().float().cpu(), start


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kahan_tracks_the_fp32_master_where_plain_low_precision_stalls(backend, dtype):
    master, start = quadratic_trajectory(torch.float32, "torch")
    plain, _ = quadratic_trajectory(dtype, backend)
    kahan, _ = quadratic_trajectory(dtype, backend, compensation="kahan")
    moved = (master - start).abs().mean()
    assert moved > 0.04  # the fp32 master travels most of the 0.05 (Adam's steps of ~lr)
    ulp = torch.finfo(dtype).eps * 2  # one ulp for values in [1, 2)
    start_rounded = start.to(dtype).float()
    # Without compensation most of the travel is lost to rounding...
    assert (plain - master).abs().mean() > 0.5 * moved
    assert (plain - start_rounded).abs().mean() < 0.5 * moved
    # ...with Kahan the bf16/fp16 parameter stays within one ulp of the fp32 master.
    assert (kahan - master).abs().max() <= ulp


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_moments_stay_close_to_fp32_moments(backend):
    master, _ = quadratic_trajectory(torch.float32, "torch")
    half_state, _ = quadratic_trajectory(torch.float32, backend, state_dtype=torch.bfloat16)
    assert (half_state - master).abs().max() < 2e-3  # 4% of the 0.05 travelled


# A slowly moving gradient (0.5 |p|^2 from p = 1, lr 1e-4, 1500 steps, fp32 moves p by 0.145):
# once (1 - beta2)(g^2 - v) falls below half a bf16 ulp of v (v ~ 0.25 here, after ~290 steps),
# exp_avg_sq rounded to nearest stops growing, and the bias-corrected v_hat shrinks as 1 - beta2^t
# grows: the steps come out too large.
DRIFT_STEPS, DRIFT_LR, DRIFT_SIZE = 1500, 1e-4, 1024
# The configurations with bf16 moments: parameter dtype and compensation.
BF16_MOMENT_RUNS = [
    (torch.float32, None),
    (torch.bfloat16, "kahan"),
    (torch.bfloat16, "stochastic"),
]


def drift_means(param_dtype, compensation=None, state_dtype=None, rounding_seed=0):
    """The mean parameter every 100 steps of the slow drift, through the torch backend's
    functional step (``rounding_seed=None``: every store rounded to nearest)."""
    param = torch.ones(DRIFT_SIZE, dtype=param_dtype)
    exp_avg, exp_avg_sq = moment_like(param, state_dtype), moment_like(param, state_dtype)
    step = torch.tensor(0.0)
    buffers = [torch.zeros_like(param) if compensation == "kahan" else None]
    means = []
    for index in range(DRIFT_STEPS):
        adawarm(
            [param], [param.clone()], [exp_avg], [exp_avg_sq], [step],
            lr=DRIFT_LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
            rectify=False, backend="torch", compensations=buffers, rounding_seed=rounding_seed,
            stochastic_params=compensation == "stochastic",
        )  # fmt: skip
        if index % 100 == 99:
            means.append(param.float().mean())
    return torch.stack(means)


def test_bf16_moments_follow_fp32_on_a_slow_drift_where_rounding_to_nearest_misses():
    fp32 = drift_means(torch.float32)
    moved = 1.0 - fp32[-1]
    assert 0.14 < moved < 0.15
    for param_dtype, compensation in BF16_MOMENT_RUNS:
        unbiased = drift_means(param_dtype, compensation, torch.bfloat16)
        # The whole trajectory stays within 10% of the distance fp32 moves (it stays within 2%).
        assert (unbiased - fp32).abs().max() < 0.1 * moved, (param_dtype, compensation)
    for param_dtype, compensation in BF16_MOMENT_RUNS[:2]:
        nearest = drift_means(param_dtype, compensation, torch.bfloat16, rounding_seed=None)
        # Rounded to nearest, the moments stall and the parameters overshoot by ~30%.
        assert (nearest - fp32)[-1].abs() > 0.25 * moved, (param_dtype, compensation)


def stalled_moment_travel(backend, param_dtype, state_dtype, compensation=None, seed=0):
    """How far a parameter moves in 200 steps from a moment that must creep: at step 10000
    (bias corrections ~1) ``exp_avg_sq`` = 1 meets gradients of 2, so it grows by 0.003 a step,
    under half a bf16 ulp of 1 (0.0039): rounded to nearest it never moves. A short problem
    with the mechanism of the slow drift, for the interpreted kernel (~50 ms a step)."""
    param = torch.zeros(DRIFT_SIZE, dtype=param_dtype, device=DEVICE)
    exp_avg = torch.full_like(param, 2.0, dtype=state_dtype)
    exp_avg_sq = torch.ones_like(param, dtype=state_dtype)
    step = torch.tensor(10_000.0, device=DEVICE if backend == "triton" else "cpu")
    buffers = [torch.zeros_like(param) if compensation == "kahan" else None]
    for _ in range(200):
        adawarm(
            [param], [torch.full_like(param, 2.0)], [exp_avg], [exp_avg_sq], [step], lr=1e-3,
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, rectify=False,
            backend=backend, compensations=buffers, rounding_seed=seed,
            stochastic_params=compensation == "stochastic",
        )  # fmt: skip
    return -param.float().mean().cpu()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_creeping_bf16_moment_moves_on_average_in_both_backends(backend):
    fp32 = stalled_moment_travel("torch", torch.float32, torch.float32)
    assert 0.3 < fp32 < 0.4
    for param_dtype, compensation in BF16_MOMENT_RUNS:
        unbiased = stalled_moment_travel(backend, param_dtype, torch.bfloat16, compensation)
        assert abs(unbiased - fp32) < 0.02 * fp32, compensation  # it ends within 0.1%
    nearest = stalled_moment_travel(backend, torch.float32, torch.bfloat16, seed=None)
    assert nearest - fp32 > 0.1 * fp32  # a stalled exp_avg_sq: 12% too far


def trained(options, steps=5):
    params = [torch.randn(33, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    opt = AdaWarm(params, lr=1e-3, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
        opt.step()
    return params, opt


def test_kahan_buffers_survive_a_state_dict_round_trip_bit_for_bit():
    def run(stop_at):
        params = [torch.ones(33, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
        options = {"lr": 1e-3, "compensation": "kahan", "state_dtype": torch.bfloat16}
        opt = AdaWarm(params, **options)
        generator = torch.Generator().manual_seed(2)
        for step in range(12):
            if step == stop_at:
                saved = copy.deepcopy(opt.state_dict())
                opt = AdaWarm(params, **options)
                opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            opt.step()
        return [p.detach() for p in params] + [opt.state[p]["compensation"] for p in params]

    assert_bit_identical(run(stop_at=6), run(stop_at=-1))


def test_checkpoints_convert_between_state_dtypes_and_compensation():
    params, fp32_opt = trained({})
    saved = copy.deepcopy(fp32_opt.state_dict())
    half = AdaWarm(params, state_dtype=torch.bfloat16, compensation="kahan")
    half.load_state_dict(saved)
    for p in params:
        state, source = half.state[p], fp32_opt.state[p]
        assert state["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(state["exp_avg"], source["exp_avg"].to(torch.bfloat16))  # nearest even
        assert torch.equal(state["compensation"], torch.zeros_like(p))  # created, empty
    back = AdaWarm(params)
    back.load_state_dict(copy.deepcopy(half.state_dict()))
    for p in params:
        assert back.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(back.state[p]["exp_avg"], half.state[p]["exp_avg"].float())  # exact
        assert "compensation" not in back.state[p]  # dropped: this optimizer keeps none


def test_kahan_leaves_fp32_parameters_alone():
    param = torch.randn(5, requires_grad=True)
    opt = AdaWarm([param], compensation="kahan")
    param.grad = torch.ones(5)
    opt.step()
    assert "compensation" not in opt.state[param]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"state_dtype": torch.float16}, r"Invalid state_dtype: torch\.float16"),
        ({"compensation": "exact"}, r"Invalid compensation: 'exact'"),
    ],
)
def test_bad_low_precision_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        AdaWarm([torch.zeros(1, requires_grad=True)], **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_rounding_is_unbiased_where_plain_bf16_stalls(backend):
    master, start = quadratic_trajectory(torch.float32, "torch")
    rounded, _ = quadratic_trajectory(torch.bfloat16, backend, compensation="stochastic")
    moved = (master - start).abs().mean()
    error = rounded - master
    # Each element ends within a few ulps of the master, and on average they are unbiased:
    assert error.abs().mean() < 0.25 * moved
    assert error.mean().abs() < 0.05 * moved


def stochastic_run(backend, seed, dtype=torch.bfloat16, state_dtype=None):
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(n, generator=generator).to(dtype).to(DEVICE).requires_grad_() for n in (1500, 7)
    ]
    params.append(torch.randn(5, generator=generator).to(DEVICE).requires_grad_())  # fp32: as is
    opt = AdaWarm(
        params,
        lr=1e-3,
        compensation="stochastic",
        rounding_seed=seed,
        backend=backend,
        state_dtype=state_dtype,
    )
    for _ in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype).to(DEVICE)
        opt.step()
    moments = [opt.state[p][key].cpu() for p in params for key in ("exp_avg", "exp_avg_sq")]
    return [p.detach().cpu() for p in params], moments


def test_stochastic_rounding_draws_the_same_stream_in_both_backends():
    (kernel, kernel_moments), (torch_params, torch_moments) = (
        stochastic_run("triton", seed=3),
        stochastic_run("torch", seed=3),
    )
    # The same random bits: the stored parameters agree to the bit. The fp32 moments agree to
    # fp32 rounding (the two backends order some fp32 operations differently).
    assert_bit_identical(kernel, torch_params)
    for mine, theirs in zip(kernel_moments, torch_moments, strict=True):
        assert_close(mine, theirs, torch.float32, "moment")


def test_bf16_moments_draw_the_same_streams_in_both_backends():
    (kernel, kernel_moments), (torch_params, torch_moments) = (
        stochastic_run("triton", seed=3, state_dtype=torch.bfloat16),
        stochastic_run("torch", seed=3, state_dtype=torch.bfloat16),
    )
    kernel_bits = torch.cat([t.float().flatten() for t in kernel + kernel_moments])
    torch_bits = torch.cat([t.float().flatten() for t in torch_params + torch_moments])
    # The same random bits for every parameter and moment: a rounding can differ only where
    # the two backends' fp32 values differ in the last bit and that crosses a boundary (and
    # then steers later steps a little). Different streams would differ in most elements.
    differing = (kernel_bits != torch_bits).float().mean()
    assert differing < 1e-3
    assert_close(kernel_bits, torch_bits, torch.bfloat16, "params and moments")


def test_each_stored_tensor_draws_its_own_stream():
    bases = {rounding.stream_base(7, 3, 11, role) for role in range(3)}
    bases.add(rounding.stream_base(7, 4, 11))  # the next tensor's parameter
    assert len(bases) == 4
    bits = [rounding.random_bits(base, 4096, torch.device("cpu")) for base in bases]
    for first in range(4):
        for second in range(first):
            assert (bits[first] == bits[second]).float().mean() < 0.01


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_resuming_a_run_with_stochastic_stores_is_bit_identical(backend, param_dtype):
    def run(stop_at):
        params = [torch.ones(n, dtype=param_dtype, device=DEVICE, requires_grad=True)
                  for n in (1030, 3)]  # fmt: skip
        options = {"lr": 1e-3, "compensation": "stochastic", "state_dtype": torch.bfloat16,
                   "rounding_seed": 9, "backend": backend}  # fmt: skip
        if param_dtype == torch.float32:
            options["compensation"] = None
        opt = AdaWarm(params, **options)
        generator = torch.Generator().manual_seed(2)
        for step in range(8):
            if step == stop_at:
                saved = copy.deepcopy(opt.state_dict())
                opt = AdaWarm(params, **{**options, "rounding_seed": 0})
                opt.load_state_dict(saved)  # the seed comes back with the parameter groups
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(param_dtype).to(DEVICE)
            opt.step()
        moments = [opt.state[p][key] for p in params for key in ("exp_avg", "exp_avg_sq")]
        return [p.detach() for p in params] + moments

    assert_bit_identical(run(stop_at=5), run(stop_at=-1))


def test_random_bits_of_every_tensor_form_equal_the_python_hash():
    # One hash, three forms: Python ints (the reference and the kernel's), int64 tensors (other
    # devices) and uint32 tensors (CPU); keys cover the wrap-around of the 32-bit counter.
    base = rounding.MASK32 - 3 * rounding.GOLDEN
    keys = [(base + i * rounding.GOLDEN) & rounding.MASK32 for i in range(4099)]
    expected = [rounding.mix32(key) & 0xFFFF for key in keys]
    as_int64 = rounding.mix32(torch.tensor(keys, dtype=torch.int64)) & 0xFFFF
    as_uint32 = rounding._mix32_uint32(torch.tensor(keys, dtype=torch.int64).to(torch.uint32))
    drawn = rounding.random_bits(base, len(keys), torch.device("cpu"))
    assert as_int64.tolist() == expected
    assert (as_uint32 & 0xFFFF).tolist() == expected
    assert drawn.tolist() == expected


def test_stochastic_rounding_is_reproducible_from_its_seed():
    first, again = stochastic_run("torch", seed=5), stochastic_run("torch", seed=5)
    assert_bit_identical(first[0] + first[1], again[0] + again[1])
    assert not torch.equal(stochastic_run("torch", seed=6)[0][0], first[0][0])


def test_stochastic_rounding_of_float16_is_refused_before_any_change():
    param = torch.ones(3, dtype=torch.float16, requires_grad=True)
    param.grad = torch.ones(3, dtype=torch.float16)
    opt = AdaWarm([param], compensation="stochastic")
    with pytest.raises(ValueError, match="'stochastic' rounds to bfloat16 only"):
        opt.step()
    assert torch.equal(param.detach(), torch.ones(3, dtype=torch.float16))
    assert not opt.state[param]


def small_model_losses(dtype, **options):
    """Final training loss of a small MLP regression after 200 steps of lr 1e-4, parameters
    stored in ``dtype`` (forward and backward in fp32 on upcast copies)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model.to(dtype)
    inputs = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    targets = inputs[:, :1].sin() + 0.5 * inputs[:, 1:2]
    opt = AdaWarm(model.parameters(), lr=1e-4, warmup_steps=0, weight_decay=0.0, **options)

    def loss():
        upcast = {name: p.float() for name, p in model.named_parameters()}
        prediction = torch.func.functional_call(model, upcast, (inputs,))
        return torch.nn.functional.mse_loss(prediction, targets)

    start = loss().item()
    for _ in range(200):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    return start, loss().item()


def test_small_model_with_compensation_follows_fp32_where_plain_bf16_lags():
    start, master = small_model_losses(torch.float32)
    _, plain = small_model_losses(torch.bfloat16)
    _, kahan = small_model_losses(torch.bfloat16, compensation="kahan")
    _, stochastic = small_model_losses(torch.bfloat16, compensation="stochastic")
    progress = start - master
    assert progress > 0
    # Most of the fp32 progress is lost when bf16 rounds the small updates away...
    assert plain - master > 0.3 * progress
    # ...and kept with either compensation.
    assert abs(kahan - master) < 0.05 * progress
    assert abs(stochastic - master) < 0.1 * progress
