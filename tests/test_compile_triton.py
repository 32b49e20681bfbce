"""The Triton step under torch.compile: one custom op in the graph, the same update as eager.

On CPU the op runs the kernel through Triton's interpreter, so CI checks the whole compiled path
(dynamo, functionalization of the declared mutations, inductor's call of the op) except CUDA
itself; test_gpu.py repeats the check on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_identical, count_calls

from adawarm import adawarm, triton_backend
from adawarm.quantization import MIN_8BIT_SIZE, scales_key
from adawarm.state import first_relative_update, moment_entries

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = (0, 1, 1023, 1025)
STEPS = 8  # past RAdam's rectification threshold (step 6)


# The variants of the functional state: a ramp, the measured warmup, and 8-bit moments.
KINDS = ("ramp", "measured", "8-bit")


def functional_state(seed: int, kind: str = "ramp") -> dict[str, list]:
    """fp32 tensors of odd sizes and one bf16 tensor with a Kahan buffer, and their states
    (``"measured"``: with the measured warmup's entries; ``"8-bit"``: and a tensor of 4097
    elements with 8-bit moments, a launch of its own)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=generator).to(DEVICE) for n in SIZES]
    params.append(torch.randn(5, generator=generator).to(DEVICE, torch.bfloat16))
    eight_bit = kind == "8-bit"
    if eight_bit:
        params.append(torch.randn(MIN_8BIT_SIZE + 1, generator=generator).to(DEVICE))
    moments = [
        {
            **moment_entries(p, "exp_avg", torch.uint8, MIN_8BIT_SIZE),
            **moment_entries(p, "exp_avg_sq", torch.uint8, MIN_8BIT_SIZE),
        }
        for p in params
    ]
    state = {
        "params": params,
        "exp_avgs": [entries["exp_avg"] for entries in moments],
        "exp_avg_sqs": [entries["exp_avg_sq"] for entries in moments],
        "state_steps": [torch.zeros((), device=DEVICE) for _ in params],
        "compensations": [None] * len(params),
    }
    state["compensations"][len(SIZES)] = torch.zeros_like(params[len(SIZES)])
    if eight_bit:
        for key in ("exp_avg", "exp_avg_sq"):
            state[scales_key(key)] = [entries.get(scales_key(key)) for entries in moments]
    if kind == "measured":
        state["relative_updates"] = [first_relative_update(p, DEVICE) for p in params]
    return state


def gradients(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator).to(p) for p in params]


def functional_step(state: dict[str, list], grads: list[torch.Tensor], lr: torch.Tensor) -> None:
    adawarm(
        state["params"],
        grads,
        state["exp_avgs"],
        state["exp_avg_sqs"],
        state["state_steps"],
        lr=lr,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.1,
        warmup_steps="measured" if "relative_updates" in state else "auto",
        rectify=True,
        backend="triton",
        compensations=state["compensations"],
        relative_updates=state.get("relative_updates"),
        exp_avg_scales=state.get("exp_avg_scales"),
        exp_avg_sq_scales=state.get("exp_avg_sq_scales"),
    )


def every_tensor(state: dict[str, list]) -> list[torch.Tensor]:
    return [t for tensors in state.values() for t in tensors if t is not None]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_functional_step_is_one_op_and_updates_like_eager(compiler, kind):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    compiled_step = torch.compile(functional_step, backend=counter, fullgraph=True)
    eager, compiled = functional_state(3, kind), functional_state(3, kind)
    for step in range(STEPS):
        lr = torch.tensor(1e-2 / (step + 1), device=DEVICE)  # a new rate every step
        functional_step(eager, gradients(step, eager["params"]), lr)
        compiled_step(compiled, gradients(step, compiled["params"]), lr)
    assert counter.frame_count == 1, "a tensor learning rate that changes must not recompile"
    (graph,) = counter.graphs
    operators = [
        str(node.target)
        for node in graph.graph.nodes
        if isinstance(node.target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload))
    ]
    assert operators == ["adawarm.triton_step_"], operators
    # The same kernel runs in both, so parameters and every state entry agree bit for bit.
    assert_bit_identical(every_tensor(compiled), every_tensor(eager))
    assert all(float(step) == STEPS for step in compiled["state_steps"])


@pytest.mark.parametrize("kind", KINDS)
def test_custom_op_declares_exactly_what_it_mutates(kind):
    args = op_arguments(functional_state(4, kind))
    # Checks the schema against the op's real mutations, its fake kernel, and AOT dispatch.
    results = torch.library.opcheck(torch.ops.adawarm.triton_step_.default, args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("requested", [None, "triton"])
def test_backend_choice_traces_without_a_graph_break(requested):
    # backend=None is the default: on CUDA it must resolve to the op inside a compiled graph.
    from adawarm.functional import select_backend

    params = functional_state(seed=5)["params"]
    choose = torch.compile(lambda ps: select_backend(requested, ps), fullgraph=True)
    assert choose(params) == select_backend(requested, params)


def present(tensors: list) -> tuple[list, list[int]]:
    """The tensors of a list with None entries, and their positions: how the op takes them."""
    positions = [i for i, tensor in enumerate(tensors) if tensor is not None]
    return [tensors[i] for i in positions], positions


def op_arguments(state: dict[str, list]) -> tuple:
    params = state["params"]
    first_scales, scales_positions = present(state.get("exp_avg_scales", []))
    second_scales, _ = present(state.get("exp_avg_sq_scales", []))
    return (
        params,
        gradients(0, params),
        state["exp_avgs"],
        state["exp_avg_sqs"],
        state["state_steps"],
        *present(state["compensations"]),
        first_scales,
        second_scales,
        scales_positions,
        1e-2,
        None,
        0.9,
        0.99,
        1e-8,
        0.1,
        3,
        True,
        False,
        state.get("relative_updates", []),
        None,
        None,
        None,
    )


def test_the_op_keeps_pointer_tables_per_parameter_set(monkeypatch):
    builds = count_calls(monkeypatch, triton_backend, "_build_tables")
    first, second = functional_state(seed=6), functional_state(seed=7)
    first_args, second_args = op_arguments(first), op_arguments(second)  # gradients kept
    for args in (first_args, second_args, first_args, second_args):
        torch.ops.adawarm.triton_step_(*args)
    # Two launch groups (fp32, bf16) per parameter set, built once each and then reused: the
    # second set does not evict the first.
    assert len(builds) == 4
    assert all(float(step) == 2 for step in first["state_steps"] + second["state_steps"])
    torch.ops.adawarm.triton_step_(*op_arguments(first))  # new gradients: new pointers
    assert len(builds) == 6
