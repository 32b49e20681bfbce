"""The AdaWarm optimizer class: parameter groups, state, checks; the math is in ``schedule``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adawarm import checkpoint
from adawarm.functional import local_tensors, run_backend, select_execution
from adawarm.rollback import StepSnapshot, failed_step_error
from adawarm.schedule import AUTO, resolve_warmup_steps, step_schedule
from adawarm.state import new_state
from adawarm.tensor_lists import DTYPE, IS_CPU
from adawarm.validation import check_group, check_torch_only_options, group_betas

# Chosen from the quality benchmark (docs/defaults.md): a linear ramp over
# min(50, 2 / (1 - beta2)) steps, or 5 % of total_steps if given and longer
# (adawarm.schedule.resolve_warmup_steps), no rectification.
DEFAULT_WARMUP_STEPS: int | str = AUTO
DEFAULT_RECTIFY = False

_CPU = torch.device("cpu")
# Whole-list accessors for the per-step passes over parameters and their states.
_GRAD = attrgetter("grad")
_IS_SPARSE = attrgetter("is_sparse")
_STEP = itemgetter("step")
_EXP_AVG = itemgetter("exp_avg")
_EXP_AVG_SQ = itemgetter("exp_avg_sq")


@dataclass
class _GroupStep:
    """One parameter group's part of a step: checked, and then given its states."""

    index: int
    group: dict[str, Any]
    params: list[Tensor]  # those with gradients
    shards: list[Tensor]  # their local tensors (DTensor shards)
    grads: list[Tensor]
    backend: str
    implementation: str | None  # the torch backend's; None: its fastest
    betas: tuple[float, float]
    # The group's "auto" ramp steps aside for its LR scheduler's own warmup (from this step on).
    scheduler_warms_up: bool
    exp_avgs: list[Tensor] | None = None
    exp_avg_sqs: list[Tensor] | None = None
    steps: list[Tensor] | None = None
    buffers: list[Tensor | None] | None = None

    def configuration(self, lr_is_tensor: bool, scaled: bool, skippable: bool) -> tuple:
        """What decides which kernels run (and so what could fail that has not run before)."""
        group = self.group
        return (
            self.index,
            self.backend,
            self.implementation,
            frozenset(map(DTYPE, self.params)),
            frozenset(map(Tensor.get_device, self.params)),
            group["state_dtype"],
            group["compensation"],
            group["rectify"],
            group["maximize"],
            lr_is_tensor,
            scaled,
            skippable,
        )


class AdaWarm(Optimizer):
    r"""AdamW with variance-aware warmup: RAdam's rectification and a linear learning-rate ramp.

    $$
    \begin{aligned}
    &\rho_\infty = 2/(1-\beta_2) - 1 \\
    &\textbf{for}\ t = 1, 2, \ldots \\
    &\quad g_t = \pm\nabla_\theta f_t(\theta_{t-1}) \quad (- \text{ with maximize}) \\
    &\quad \gamma_t = \gamma \cdot \min(1, t / W) \quad (W = 0: \gamma_t = \gamma) \\
    &\quad \theta_t = \theta_{t-1} (1 - \gamma_t \lambda) \\
    &\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    &\quad \hat m_t = m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t) \\
    &\quad \textbf{if not}\ rectify:\ \theta_t = \theta_t - \gamma_t \hat m_t /
    (\sqrt{\hat v_t} + \epsilon) \\
    &\quad \textbf{else}: \rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
    &\qquad \textbf{if}\ \rho_t > 5:\ r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}
    {(\rho_\infty-4)(\rho_\infty-2)\rho_t}},\
    \theta_t = \theta_t - \gamma_t r_t \hat m_t /
    (\sqrt{\hat v_t} + \epsilon/\sqrt{1-\beta_2^t}) \\
    &\qquad \textbf{else}:\ \theta_t = \theta_t - \gamma_t \hat m_t
    \end{aligned}
    $$

    With ``rectify=False, warmup_steps=0`` this is ``torch.optim.AdamW``; with ``rectify=True,
    warmup_steps=0`` it is ``torch.optim.RAdam(decoupled_weight_decay=True)``; with
    ``rectify=False, warmup_steps=W`` it is AdamW under ``LambdaLR(lambda s: min(1, (s+1)/W))``.
    The ramp multiplies the group's ``lr``, so any ``torch.optim.lr_scheduler`` composes with it.

    Args:
        params: parameters or parameter groups; every hyper-parameter below can be set per group.
        lr: learning rate (a float, or a one-element tensor).
        betas: coefficients of the running averages of the gradient and of its square (floats,
            or one-element tensors, read on the host at every step).
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay coefficient.
        amsgrad: accepted as False for torch.optim.AdamW's signature; AdaWarm has no AMSGrad.
        warmup_steps: length W of the linear ramp (0: none), ``"untuned"`` for
            ``round(2 / (1 - beta2))`` steps (Ma & Yarats, 2019), or ``"auto"`` (the default)
            for ``min(50, round(2 / (1 - beta2)))`` steps, or, with ``total_steps``, 5 % of the
            run when that is longer. With ``"auto"``, a group whose LR
            scheduler warms up itself (its rate at the group's first step is below the
            ``initial_lr`` the scheduler recorded) gets no ramp: its ``warmup_steps`` becomes 0.
        total_steps: the number of steps the run will take, if known (the ``"auto"`` ramp then
            lasts 5 % of it, or longer by the rule above); None: unknown.
        rectify: RAdam's variance rectification of the adaptive step (Liu et al., 2019).
        maximize: maximize the objective instead of minimizing it.
        foreach: as in torch.optim.AdamW: True runs the torch backend's ``torch._foreach_*``
            implementation, False its single-tensor one; None lets ``fused``/``backend`` decide.
        fused: True runs the fused path: the Triton kernel for CUDA tensors, torch's fused AdamW
            kernel for CPU tensors (raising where neither serves the tensors); False anything
            else; None automatic.
        capturable: promise a step with no host synchronisation, which a CUDA graph can capture:
            the step counters and the schedule stay on the device (lr may be a tensor there).
            Needs the Triton backend; raises where it cannot serve the tensors.
        differentiable: accepted as False for torch.optim.AdamW's signature; the step records
            no autograd history.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` for fp32/fp16/bf16 parameters: ``None``
            (fp32) or ``torch.bfloat16`` (half the state memory; the math stays fp32, and the
            moments are stored by stochastic rounding from ``rounding_seed``, so that updates
            below half a bf16 ulp survive on average). Wider parameters keep moments of their
            own dtype.
        compensation: how fp16/bf16 parameters keep updates below half an ulp. ``None``: round
            to nearest (they are lost). ``"kahan"``: a buffer of the parameter's dtype carries
            each update's rounding error into the next. ``"stochastic"`` (bf16 only): round up
            or down at random in proportion to the distance, from a counter-based stream keyed
            by ``rounding_seed``, the tensor's position and the step (reproducible, and the same
            in both backends). fp32 and wider parameters are unaffected.
        rounding_seed: the seed of stochastic rounding (bf16 moments, and bf16 parameters
            with ``compensation="stochastic"``).
        backend: ``None`` (the Triton kernel for CUDA tensors it can serve, otherwise the torch
            backend), ``"torch"`` or ``"triton"``. An explicit backend that cannot serve the
            tensors raises.

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg``, ``exp_avg_sq`` (fp32 for
    fp16/bf16 parameters), the names torch.optim.AdamW and RAdam use, so state_dicts interchange.
    """

    # step() takes grad_scale/found_inf from torch.amp.GradScaler and unscales inside the update.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        warmup_steps: int | str = DEFAULT_WARMUP_STEPS,
        total_steps: int | None = None,
        rectify: bool = DEFAULT_RECTIFY,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        compensation: str | None = None,
        rounding_seed: int = 0,
        backend: str | None = None,
    ) -> None:
        check_torch_only_options(amsgrad=amsgrad, differentiable=differentiable)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "total_steps": total_steps,
            "rectify": rectify,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "state_dtype": state_dtype,
            "compensation": compensation,
            "rounding_seed": rounding_seed,
            "backend": backend,
        }
        check_group(defaults)
        # Per parameter group, the Triton backend's cached pointer tables.
        self._table_caches: dict[int, dict] = {}
        # Configurations (see _GroupStep.configuration) whose step has completed once.
        self._completed: set[tuple] = set()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch's base class adds this key of its own optimizers to the defaults; AdaWarm has no
        # such option, and copying it into the groups would put it in every later state_dict.
        self.defaults.pop("differentiable", None)
        # Neither is pickled (torch's __getstate__ keeps the defaults, state and groups only).
        self._table_caches = {}
        self._completed = set()
        params = [param for group in self.param_groups for param in group["params"]]
        for group in self.param_groups:
            for key, value in self.defaults.items():  # groups pickled by older versions
                group.setdefault(key, value)
        for index, param in enumerate(params):  # pickles of older torch versions: number steps
            saved = self.state.get(param)
            if saved and not isinstance(saved["step"], Tensor):
                saved["step"] = checkpoint.step_counter(saved["step"], index)

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have gradients and those gradients, after checking them.

        Every step runs this over every parameter, so it makes whole-list passes (~40-80 ns a
        tensor each on the CI machine, fewer bytecodes than a loop of checks) and loops only to
        name a parameter that fails.
        """
        params = group["params"]
        grads = list(map(_GRAD, params))
        if any(grad is None for grad in grads):
            pairs = [
                (param, grad) for param, grad in zip(params, grads, strict=True) if grad is not None
            ]
            params, grads = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        if any(map(_IS_SPARSE, grads)):
            param = next(p for p, g in zip(params, grads, strict=True) if g.is_sparse)
            raise RuntimeError(
                "AdaWarm does not support sparse gradients: got a sparse gradient for a "
                f"parameter of shape {tuple(param.shape)}; expected a dense gradient"
            )
        # torch checks shape and device when a gradient is assigned, and dtype unless the
        # parameter's grad_dtype says otherwise.
        if list(map(DTYPE, grads)) != list(map(DTYPE, params)):
            param, grad = next(
                (p, g) for p, g in zip(params, grads, strict=True) if g.dtype is not p.dtype
            )
            raise RuntimeError(
                f"Gradient of dtype {grad.dtype} does not match its parameter of shape "
                f"{tuple(param.shape)} and dtype {param.dtype}"
            )
        return list(params), grads

    def _check(self, index: int, group: dict[str, Any]) -> _GroupStep | None:
        """Everything about one group's step that can be checked without changing anything;
        None when no parameter of the group has a gradient."""
        check_group(group)
        params, grads = self._collect(group)
        if group["compensation"] == "stochastic":
            _check_stochastic_dtypes(params)
        if not params:
            return None
        shards = local_tensors(params)
        backend, implementation = select_execution(
            group["backend"], shards, foreach=group["foreach"], fused=group["fused"]
        )
        if group["capturable"] and backend != "triton":
            raise RuntimeError(
                f"capturable=True needs the Triton backend, but backend={group['backend']!r} "
                f"resolved to {backend!r} for these tensors (CUDA tensors of dtype float32, "
                "bfloat16 or float16 are needed)"
            )
        return _GroupStep(
            index,
            group,
            params,
            shards,
            grads,
            backend,
            implementation,
            group_betas(group),
            self._scheduler_warms_up(group, params),
        )

    def _scheduler_warms_up(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """Whether, at this group's first step, its "auto" ramp should step aside: a torch LR
        scheduler (which records ``initial_lr``) has set the rate below that initial rate, so
        it warms up itself (HF's ``get_*_schedule_with_warmup``, ``LinearLR``, ``OneCycleLR``)."""
        if group["warmup_steps"] != AUTO or "initial_lr" not in group:
            return False
        if any(self.state.get(param) for param in params):
            return False  # not the group's first step
        lr, initial = group["lr"], group["initial_lr"]
        if any(isinstance(v, Tensor) and v.is_cuda for v in (lr, initial)) and (
            torch.cuda.is_current_stream_capturing()
        ):
            return False  # the rates cannot be read during a CUDA graph capture
        return float(lr) < float(initial)

    def _attach_states(self, work: _GroupStep, created: list[Tensor]) -> None:
        """Give ``work`` the states of its parameters, creating those of first steps (recorded
        in ``created``).

        Step counters live where the backend reads them: on the CPU for the torch backend (as in
        torch.optim.AdamW), on the parameter's device for the Triton kernel, which advances them.
        """
        on_device = work.backend == "triton"
        states = list(map(self.state.__getitem__, work.params))
        if not all(states):
            for param, state in zip(work.params, states, strict=True):
                if not state:
                    state.update(
                        new_state(
                            param,
                            state_dtype=work.group["state_dtype"],
                            compensation=work.group["compensation"],
                            counter_device=param.device if on_device else _CPU,
                        )
                    )
                    created.append(param)
        steps = list(map(_STEP, states))
        counters_in_place = (
            list(map(Tensor.get_device, steps)) == list(map(Tensor.get_device, work.params))
            if on_device
            else all(map(IS_CPU, steps))
        )
        if not counters_in_place:
            # Loaded from a checkpoint, or the backend changed: move the counters once.
            for param, state in zip(work.params, states, strict=True):
                state["step"] = state["step"].to(param.device if on_device else _CPU)
            steps = list(map(_STEP, states))
        work.exp_avgs = list(map(_EXP_AVG, states))
        work.exp_avg_sqs = list(map(_EXP_AVG_SQ, states))
        work.steps = steps
        work.buffers = [state.get("compensation") for state in states]

    def _run(self, work: _GroupStep, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        group = work.group
        beta1, beta2 = work.betas
        run_backend(
            work.backend,
            work.shards,
            local_tensors(work.grads),
            local_tensors(work.exp_avgs),
            local_tensors(work.exp_avg_sqs),
            work.steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            warmup_steps=0 if work.scheduler_warms_up else group["warmup_steps"],
            total_steps=group["total_steps"],
            rectify=group["rectify"],
            maximize=group["maximize"],
            torch_implementation=work.implementation,
            grad_scale=grad_scale,
            found_inf=found_inf,
            table_cache=self._table_caches.setdefault(work.index, {}),
            compensations=local_tensors(work.buffers),
            rounding_seed=group["rounding_seed"],
            stochastic_params=group["compensation"] == "stochastic",
        )

    # Under torch.compile the step runs eagerly (a graph break around it): its schedule is a set
    # of per-step Python floats, which dynamo would specialise on and recompile for at every step
    # of the warmup and every learning-rate change. torch._disable_dynamo (what torch.optim uses)
    # imports dynamo at the first call, not at import: dynamo imports triton, which is slow and
    # not needed by a CPU step.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> float | None:
        """Perform one optimization step; all or nothing.

        Every check (hyper-parameters, gradients, backends) runs for every group before the
        first tensor changes. The first step of each configuration -- backend, implementation,
        dtypes, devices, options; that is, whenever a kernel runs that has not run before --
        keeps a copy of what it changes until it completes, and puts it back if anything fails
        (a kernel that cannot compile or launch, an interpreter error): parameters, moments,
        Kahan buffers and step counters are then as before, and states this step created are
        removed. Later steps of a configuration take no copy (it would add a read and a write
        of every parameter and moment to every step): a launch that fails before it runs still
        changes nothing, but a failure after other groups' launches leaves those stepped.

        Args:
            closure: re-evaluates the model and returns the loss.
            grad_scale: the GradScaler's scale; gradients are divided by it inside the update.
            found_inf: when non-zero, the step is skipped entirely: no parameter or state changes
                and the step counters (hence the warmup) do not advance. GradScaler sets both
                (as attributes, which are read when the arguments are not given).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        work = [
            checked
            for index, group in enumerate(self.param_groups)
            if (checked := self._check(index, group)) is not None
        ]
        configurations = {
            item.configuration(
                isinstance(item.group["lr"], Tensor), grad_scale is not None, found_inf is not None
            )
            for item in work
        }
        created: list[Tensor] = []
        snapshot = None
        try:
            for item in work:
                self._attach_states(item, created)
            if created or not configurations <= self._completed:
                snapshot = StepSnapshot(work, created)
            for item in work:
                self._run(item, grad_scale, found_inf)
        except BaseException as error:
            for param in created:
                del self.state[param]
            if snapshot is None:
                raise
            snapshot.restore()
            replacement = failed_step_error(error, (item.backend for item in work))
            if replacement is None:
                raise
            raise replacement from error
        self._completed |= configurations
        for item in work:
            if item.scheduler_warms_up:
                item.group["warmup_steps"] = 0
                warnings.warn(
                    f"AdaWarm: the LR scheduler of parameter group {item.index} warms up itself "
                    "(its rate at the first step is below its initial_lr), so this group's "
                    "warmup_steps='auto' ramp is off (warmup_steps=0); pass warmup_steps "
                    "explicitly to have both",
                    stacklevel=2,
                )
        return loss

    def warmup_factor(self) -> list[float]:
        """The warmup multiplier ``ramp_t * r_t`` that the next ``step()`` puts on each group's
        adaptive step (``r_t = 1`` without rectification, 0 on a momentum-only step).

        ``t`` is one more than the largest step count among the group's parameters. Multiply by
        the group's ``lr`` for the effective rate, e.g. to log it next to ``get_last_lr()``.
        """
        factors = []
        for group in self.param_groups:
            steps = [
                int(self.state[p]["step"].item())
                for p in group["params"]
                if "step" in self.state[p]
            ]
            beta1, beta2 = group_betas(group)
            warmup = (
                0 if self._scheduler_warms_up(group, group["params"]) else group["warmup_steps"]
            )
            schedule = step_schedule(
                max(steps, default=0) + 1,
                lr=1.0,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=0.0,
                warmup_steps=resolve_warmup_steps(warmup, beta2, group["total_steps"]),
                rectify=group["rectify"],
            )
            factors.append(schedule.warmup_factor)
        return factors

    def effective_lr(self) -> list[float]:
        """Per group, the rate the next ``step()`` applies to the adaptive step: the group's
        ``lr`` (after any LR scheduler) times ``warmup_factor()``. Log it next to, or instead
        of, a scheduler's ``get_last_lr()``, which knows nothing of AdaWarm's ramp."""
        return [
            float(group["lr"]) * factor
            for group, factor in zip(self.param_groups, self.warmup_factor(), strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return checkpoint.with_decoupled_decay_flag(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of AdaWarm, or of torch.optim.AdamW / RAdam, by the rules of
        ``adawarm.checkpoint``. The whole state_dict is checked (groups, sizes, shapes,
        hyper-parameters, step counts) before anything is loaded."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Loaded state dict has {len(saved_groups)} parameter groups, expected "
                f"{len(self.param_groups)}"
            )
        groups = []
        loaded = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            trained = any(state_dict["state"].get(param_id) for param_id in saved["params"])
            merged = checkpoint.loaded_group(group, saved, index, trained)
            groups.append(merged)
            for param, param_id in zip(group["params"], saved["params"], strict=True):
                saved_state = state_dict["state"].get(param_id)
                checkpoint.check_saved_state(saved_state, param, param_id)
                if saved_state:
                    loaded.append((param, saved_state, merged, param_id))
        super().load_state_dict({**state_dict, "param_groups": groups})
        # torch casts every floating-point state to the parameter's dtype (which would round
        # fp32 moments of bf16 parameters) and keeps steps as saved; convert from the checkpoint.
        for param, saved_state, group, param_id in loaded:
            self.state[param] = checkpoint.converted_state(param, saved_state, group, param_id)


def _check_stochastic_dtypes(params: list[Tensor]) -> None:
    for param in params:
        if param.dtype == torch.float16:
            raise ValueError(
                f"Invalid compensation for a float16 parameter of shape {tuple(param.shape)}: "
                "'stochastic' rounds to bfloat16 only; expected 'kahan' or None for float16"
            )
