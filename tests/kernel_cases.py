"""Trajectories through the Triton kernel and the torch backend, shared by CPU and GPU tests."""

from __future__ import annotations

import copy

import torch
from helpers import CODE_FLIPS, TOLERANCES, assert_close, gradient_stream, make_params
from hypothesis import strategies as st

from adawarm import AdaWarm, AdaWarmScheduleFree, adawarm
from adawarm.kernels.common import BLOCK_SIZE
from adawarm.quantization import EIGHT_BIT, scales_key
from adawarm.schedule import MEASURED, MEASURED_CAP
from adawarm.state import first_relative_update, moment_like, needs_compensation

GRAD_SCALE = 1024.0  # a power of two: scaling and unscaling are exact
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

small_sizes = st.sampled_from([0, 1, 2, 7, 33])
block_edge_sizes = st.sampled_from([BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1])
# 1-40 tensors, at most two at the block edges: the interpreter pays ~10 ms per program.
shape_lists = st.tuples(
    st.lists(small_sizes, min_size=1, max_size=38), st.lists(block_edge_sizes, max_size=2)
).map(lambda parts: [(size,) for size in parts[0] + parts[1]])
kernel_options = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.8, 0.9999)),
        "eps": st.floats(1e-10, 1e-3),
        "weight_decay": st.floats(0.0, 0.5),
        "warmup_steps": st.sampled_from([0, 1, 5, "untuned", "auto", "measured"]),
        "rectify": st.booleans(),
        "maximize": st.booleans(),
        "state_dtype": st.sampled_from([None, torch.bfloat16]),
        "compensation": st.sampled_from([None, "kahan", "stochastic"]),
        "rounding_seed": st.integers(0, 2**31 - 1),
    }
)
kernel_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def scaled_steps(
    optimizer, rebuild, params, shapes, dtype, steps, inf_steps, reload_at, device, after=None
):
    """Step ``optimizer`` ``steps`` times on gradients scaled by GRAD_SCALE and return the
    optimizer at the end: steps in ``inf_steps`` carry an inf gradient and ``found_inf``; after
    step ``reload_at`` the optimizer is replaced by ``rebuild(params)`` loaded from its
    state_dict; ``after(index, optimizer)`` runs after each step."""
    scale = torch.tensor(GRAD_SCALE, device=device)
    for index, grads in enumerate(gradient_stream(shapes, dtype, steps, 41)):
        skipped = index in inf_steps
        for param, grad in zip(params, grads, strict=True):
            param.grad = (grad.to(device) * GRAD_SCALE).contiguous()
            if skipped and param.numel():
                param.grad.view(-1)[0] = float("inf")
        optimizer.step(grad_scale=scale, found_inf=torch.tensor(float(skipped), device=device))
        if index == reload_at:
            saved = copy.deepcopy(optimizer.state_dict())
            optimizer = rebuild(params)
            optimizer.load_state_dict(saved)
        if after is not None:
            after(index, optimizer)
    return optimizer


def optimizer_trajectory(backend, shapes, dtype, options, steps, inf_steps, reload_at, device):
    """Params and state after ``steps`` scaled steps of AdaWarm (see :func:`scaled_steps`)."""
    params = [p.detach().to(device).requires_grad_() for p in make_params(shapes, dtype, 41)]
    build = lambda ps: AdaWarm(ps, backend=backend, **options)  # noqa: E731
    optimizer = scaled_steps(
        build(params), build, params, shapes, dtype, steps, inf_steps, reload_at, device
    )
    return params, [optimizer.state[p] for p in params]


def reference_trajectory(shapes, dtype, options, steps, inf_steps):
    """The same trajectory through the torch backend's single-tensor reference."""
    params = [p.detach() for p in make_params(shapes, dtype, 41)]
    state_dtype = options.get("state_dtype")
    states = [
        {
            "step": torch.tensor(0.0),
            "exp_avg": moment_like(p, state_dtype),
            "exp_avg_sq": moment_like(p, state_dtype),
        }
        for p in params
    ]
    for p, state in zip(params, states, strict=True):
        if needs_compensation(p, options.get("compensation")):
            state["compensation"] = torch.zeros_like(p)
        if options["warmup_steps"] == MEASURED:
            state["relative_update"] = first_relative_update(p, "cpu")
    beta1, beta2 = options["betas"]
    for index, grads in enumerate(gradient_stream(shapes, dtype, steps, 41)):
        if index in inf_steps:
            continue
        adawarm(
            params,
            [grad.contiguous() for grad in grads],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            lr=options["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=options["eps"],
            weight_decay=options["weight_decay"],
            warmup_steps=options["warmup_steps"],
            rectify=options["rectify"],
            maximize=options["maximize"],
            backend="torch",
            foreach=False,
            compensations=[s.get("compensation") for s in states],
            rounding_seed=options.get("rounding_seed", 0),
            stochastic_params=options.get("compensation") == "stochastic",
            relative_updates=(
                [s["relative_update"] for s in states]
                if options["warmup_steps"] == MEASURED
                else None
            ),
        )
    return params, states


def assert_same_params_and_state(actual, expected, dtype):
    """Params and all state agree. Moments stored in bf16 are compared at bf16 tolerance, and so
    are the parameters they drive: a one-ulp rounding flip of a moment moves a step by ~0.4%."""
    for index, (param, state, ref_param, ref_state) in enumerate(
        zip(actual[0], actual[1], expected[0], expected[1], strict=True)
    ):
        assert set(state) == set(ref_state), f"state keys of tensor {index}"
        moment_dtypes = {state[key].dtype for key in ("exp_avg", "exp_avg_sq")}
        assert moment_dtypes == {ref_state[key].dtype for key in ("exp_avg", "exp_avg_sq")}
        # a level of an 8-bit code is coarser than a bf16 ulp: bf16 tolerances for them too
        low = {torch.bfloat16, EIGHT_BIT}
        loosest = torch.bfloat16 if low & {dtype, *moment_dtypes} else dtype
        assert_close(param.detach().cpu(), ref_param.detach().cpu(), loosest, f"param {index}")
        assert float(state["step"]) == float(ref_state["step"]), f"step of tensor {index}"
        assert state["step"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dtype == EIGHT_BIT:
                assert_same_codes(state, ref_state, key, f"{key} {index}")
            else:
                assert_close(state[key].cpu(), ref_state[key].cpu(), loosest, f"{key} {index}")
        if "relative_update" in state:
            # A move is a difference of parameters: their relative error over the relative
            # update (at most the cap).
            rtol, atol = TOLERANCES[loosest]
            torch.testing.assert_close(
                state["relative_update"].cpu(),
                ref_state["relative_update"].cpu(),
                rtol=rtol / MEASURED_CAP,
                atol=atol,
                msg=lambda m, index=index: f"relative_update {index}: {m}",
            )
        if "compensation" in state:
            # The buffer holds rounding residues; compare what it stands for, param + buffer.
            total = param.detach().float() + state["compensation"].float()
            ref_total = ref_param.detach().float() + ref_state["compensation"].float()
            assert_close(total.cpu(), ref_total.cpu(), loosest, f"compensated param {index}")


def assert_same_codes(state, ref_state, key, what):
    """An 8-bit moment: its blocks' scales agree at fp32 tolerance, and its codes are the same
    but for at most ``CODE_FLIPS`` of them, one level apart."""
    scales = scales_key(key)
    assert_close(state[scales].cpu(), ref_state[scales].cpu(), torch.float32, f"{what} scales")
    codes, ref_codes = state[key].cpu().int(), ref_state[key].cpu().int()
    levels = (codes - ref_codes).abs()
    if levels.numel():
        assert levels.max().item() <= 1, f"{what}: codes {levels.max().item()} levels apart"
    flips = levels.count_nonzero().item()
    assert flips <= CODE_FLIPS * codes.numel(), f"{what}: {flips} of {codes.numel()} codes differ"


def schedule_free_trajectory(
    execution, shapes, dtype, options, steps, inf_steps, reload_at, evaluate_at, device=DEVICE
):
    """Params and states after ``steps`` scaled steps in train mode; steps in ``inf_steps`` carry
    an inf gradient and ``found_inf``; after step ``reload_at`` the optimizer is rebuilt from its
    state_dict, after ``evaluate_at`` it switches to eval and back."""
    params = [p.detach().to(device).requires_grad_() for p in make_params(shapes, dtype, 41)]
    build = lambda ps: AdaWarmScheduleFree(ps, **execution, **options)  # noqa: E731
    optimizer = build(params)
    optimizer.train()

    def evaluate(index, optimizer):
        if index == evaluate_at:
            optimizer.eval()
            optimizer.train()

    optimizer = scaled_steps(
        optimizer, build, params, shapes, dtype, steps, inf_steps, reload_at, device, evaluate
    )
    return params, [as_moments(optimizer.state[p]) for p in params]


def as_moments(state):
    """A schedule-free state under the names the shared comparison reads (z in the first
    state's place), with its scalars."""
    renamed = {("exp_avg" if key == "z" else key): value for key, value in state.items()}
    for key in ("weight_sum", "lr_max"):
        renamed.pop(key, None)
    return renamed
