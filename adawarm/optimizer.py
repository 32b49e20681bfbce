"""The AdaWarm optimizer class: parameter groups, state, checks; the math is in ``schedule``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import attrgetter, itemgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adawarm.functional import local_tensors, run_backend, select_backend
from adawarm.schedule import resolve_warmup_steps, step_schedule
from adawarm.tensor_lists import DTYPE, IS_CPU
from adawarm.validation import check_group

# Chosen from the quality benchmark (README, "Choosing the defaults"): a linear ramp over
# 1 / (1 - beta2) steps, no rectification.
DEFAULT_WARMUP_STEPS: int | str = "auto"
DEFAULT_RECTIFY = False

# Keys torch.optim.AdamW/RAdam keep in their param groups that mean nothing to AdaWarm (AdaWarm's
# decay is always decoupled; the others pick torch's implementations).
_FOREIGN_GROUP_KEYS = ("amsgrad", "foreach", "fused", "differentiable", "decoupled_weight_decay")
# Execution choices rather than hyper-parameters: a loaded checkpoint does not change them.
_EXECUTION_KEYS = ("backend", "capturable")
# Storage choices: a checkpoint's states are converted to this optimizer's (moments cast to its
# state dtype, rounding to nearest even; Kahan buffers kept, created or dropped).
_STORAGE_KEYS = ("state_dtype", "compensation")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CPU = torch.device("cpu")
# Whole-list accessors for the per-step passes over parameters and their states.
_GRAD = attrgetter("grad")
_DEVICE = attrgetter("device")
_IS_SPARSE = attrgetter("is_sparse")
_STEP = itemgetter("step")
_EXP_AVG = itemgetter("exp_avg")
_EXP_AVG_SQ = itemgetter("exp_avg_sq")


def state_dtype_for(param: Tensor, state_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of ``exp_avg``/``exp_avg_sq``: ``state_dtype`` when given (bf16 moments), else fp32
    for fp16/bf16/fp32 parameters and the parameter's own dtype when wider (fp64, complex)."""
    if param.dtype in (*_LOW_PRECISION, torch.float32):
        return state_dtype or torch.float32
    return param.dtype


def moment_like(param: Tensor, state_dtype: torch.dtype | None = None) -> Tensor:
    """A zero moment buffer for ``param``: its shape and strides, in the state dtype."""
    return torch.zeros_like(
        param, dtype=state_dtype_for(param, state_dtype), memory_format=torch.preserve_format
    )


def needs_compensation(param: Tensor, compensation: str | None) -> bool:
    """Whether ``param`` keeps a Kahan buffer: only fp16/bf16 parameters lose small updates."""
    return compensation == "kahan" and param.dtype in _LOW_PRECISION


class AdaWarm(Optimizer):
    r"""AdamW with variance-aware warmup: RAdam's rectification and a linear learning-rate ramp.

    .. math::
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

    With ``rectify=False, warmup_steps=0`` this is ``torch.optim.AdamW``; with ``rectify=True,
    warmup_steps=0`` it is ``torch.optim.RAdam(decoupled_weight_decay=True)``; with
    ``rectify=False, warmup_steps=W`` it is AdamW under ``LambdaLR(lambda s: min(1, (s+1)/W))``.
    The ramp multiplies the group's ``lr``, so any ``torch.optim.lr_scheduler`` composes with it.

    Args:
        params: parameters or parameter groups; every hyper-parameter below can be set per group.
        lr: learning rate (a float, or a one-element tensor).
        betas: coefficients of the running averages of the gradient and of its square.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay coefficient.
        warmup_steps: length W of the linear ramp (0: none), ``"untuned"`` for
            ``round(2 / (1 - beta2))`` steps (Ma & Yarats, 2019), or ``"auto"`` (the default)
            for ``round(1 / (1 - beta2))`` steps.
        rectify: RAdam's variance rectification of the adaptive step (Liu et al., 2019).
        maximize: maximize the objective instead of minimizing it.
        capturable: promise a step with no host synchronisation, which a CUDA graph can capture:
            the step counters and the schedule stay on the device (lr may be a tensor there).
            Needs the Triton backend; raises where it cannot serve the tensors.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` for fp32/fp16/bf16 parameters: ``None``
            (fp32) or ``torch.bfloat16`` (half the state memory; the math stays fp32). Wider
            parameters keep moments of their own dtype.
        compensation: how fp16/bf16 parameters keep updates below half an ulp. ``None``: round
            to nearest (they are lost). ``"kahan"``: a buffer of the parameter's dtype carries
            each update's rounding error into the next. ``"stochastic"`` (bf16 only): round up
            or down at random in proportion to the distance, from a counter-based stream keyed
            by ``rounding_seed``, the tensor's position and the step (reproducible, and the same
            in both backends). fp32 and wider parameters are unaffected.
        rounding_seed: the seed of stochastic rounding.
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
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        warmup_steps: int | str = DEFAULT_WARMUP_STEPS,
        rectify: bool = DEFAULT_RECTIFY,
        maximize: bool = False,
        capturable: bool = False,
        state_dtype: torch.dtype | None = None,
        compensation: str | None = None,
        rounding_seed: int = 0,
        backend: str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "rectify": rectify,
            "maximize": maximize,
            "capturable": capturable,
            "state_dtype": state_dtype,
            "compensation": compensation,
            "rounding_seed": rounding_seed,
            "backend": backend,
        }
        check_group(defaults)
        # Per parameter group, the Triton backend's cached pointer tables.
        self._table_caches: dict[int, dict] = {}
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
        self._table_caches = {}  # not pickled (torch's __getstate__ keeps the state dicts only)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

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

    def _states(
        self, params: list[Tensor], backend: str, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None]]:
        """``exp_avg``, ``exp_avg_sq``, ``step`` and Kahan buffer (or None) of each parameter,
        created on first use.

        Step counters live where the backend reads them: on the CPU for the torch backend (as in
        torch.optim.AdamW), on the parameter's device for the Triton kernel, which advances them.
        """
        on_device = backend == "triton"
        states = list(map(self.state.__getitem__, params))
        if not all(states):
            for param, state in zip(params, states, strict=True):
                if not state:
                    self._init_state(param, state, group, on_device)
        steps = list(map(_STEP, states))
        counters_in_place = (
            list(map(_DEVICE, steps)) == list(map(_DEVICE, params))
            if on_device
            else all(map(IS_CPU, steps))
        )
        if not counters_in_place:
            # Loaded from a checkpoint, or the backend changed: move the counters once.
            for param, state in zip(params, states, strict=True):
                state["step"] = state["step"].to(param.device if on_device else _CPU)
            steps = list(map(_STEP, states))
        return (
            list(map(_EXP_AVG, states)),
            list(map(_EXP_AVG_SQ, states)),
            steps,
            [state.get("compensation") for state in states],
        )

    @staticmethod
    def _init_state(
        param: Tensor, state: dict[str, Tensor], group: dict[str, Any], on_device: bool
    ) -> None:
        state_dtype = group["state_dtype"]
        device = param.device if on_device else "cpu"
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        state["exp_avg"] = moment_like(param, state_dtype)
        state["exp_avg_sq"] = moment_like(param, state_dtype)
        if needs_compensation(param, group["compensation"]):
            state["compensation"] = torch.zeros_like(param)

    # Under torch.compile the step runs eagerly (a graph break around it): its schedule is a set
    # of per-step Python floats, which dynamo would specialise on and recompile for at every step
    # of the warmup and every learning-rate change.
    @torch.compiler.disable
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> float | None:
        """Perform one optimization step.

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

        # Check everything before the first tensor changes, so bad input leaves no half-update.
        work = []
        for index, group in enumerate(self.param_groups):
            check_group(group)
            params, grads = self._collect(group)
            if group["compensation"] == "stochastic":
                _check_stochastic_dtypes(params)
            if params:
                shards = local_tensors(params)
                work.append((index, group, params, shards, grads, self._backend_for(group, shards)))

        for index, group, params, shards, grads, backend in work:
            beta1, beta2 = group["betas"]
            exp_avgs, exp_avg_sqs, steps, buffers = self._states(params, backend, group)
            run_backend(
                backend,
                shards,
                local_tensors(grads),
                local_tensors(exp_avgs),
                local_tensors(exp_avg_sqs),
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                warmup_steps=group["warmup_steps"],
                rectify=group["rectify"],
                maximize=group["maximize"],
                torch_implementation=None,
                grad_scale=grad_scale,
                found_inf=found_inf,
                table_cache=self._table_caches.setdefault(index, {}),
                compensations=local_tensors(buffers),
                rounding_seed=(
                    group["rounding_seed"] if group["compensation"] == "stochastic" else None
                ),
            )
        return loss

    @staticmethod
    def _backend_for(group: dict[str, Any], params: list[Tensor]) -> str:
        backend = select_backend(group["backend"], params)
        if group["capturable"] and backend != "triton":
            raise RuntimeError(
                f"capturable=True needs the Triton backend, but backend={group['backend']!r} "
                f"resolved to {backend!r} for these tensors (CUDA tensors of dtype float32, "
                "bfloat16 or float16 are needed)"
            )
        return backend

    def warmup_factor(self) -> list[float]:
        """The warmup multiplier ``ramp_t * r_t`` that the next :meth:`step` puts on each group's
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
            beta1, beta2 = group["betas"]
            schedule = step_schedule(
                max(steps, default=0) + 1,
                lr=1.0,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=0.0,
                warmup_steps=resolve_warmup_steps(group["warmup_steps"], beta2),
                rectify=group["rectify"],
            )
            factors.append(schedule.warmup_factor)
        return factors

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # torch.optim.RAdam reads a group without this key as coupled (L2) decay; AdaWarm's decay
        # is always decoupled, so say so for checkpoints loaded into torch's optimizers.
        for group in state["param_groups"]:
            group["decoupled_weight_decay"] = True
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of AdaWarm, or of torch.optim.AdamW / RAdam.

        Hyper-parameters the checkpoint lacks (``warmup_steps``, ``rectify`` from torch's
        optimizers) keep this optimizer's values; ``backend`` always stays this optimizer's. The
        whole state_dict is checked (groups, sizes, shapes, hyper-parameters) before anything is
        loaded.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Loaded state dict has {len(saved_groups)} parameter groups, expected "
                f"{len(self.param_groups)}"
            )
        groups = []
        moments = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Loaded parameter group {index} has {len(saved['params'])} parameters, "
                    f"expected {len(group['params'])}"
                )
            if saved.get("amsgrad", False):
                raise ValueError(
                    f"Loaded parameter group {index} uses amsgrad=True; AdaWarm has no AMSGrad"
                )
            if not saved.get("decoupled_weight_decay", True) and saved.get("weight_decay", 0):
                raise ValueError(
                    f"Loaded parameter group {index} uses coupled (L2) weight decay "
                    f"{saved['weight_decay']!r}; AdaWarm's weight decay is decoupled"
                )
            merged = {k: v for k, v in saved.items() if k not in _FOREIGN_GROUP_KEYS}
            for key, value in group.items():
                if key != "params":
                    merged.setdefault(key, value)
            for key in (*_EXECUTION_KEYS, *_STORAGE_KEYS):
                merged[key] = group[key]
            check_group(merged)
            groups.append(merged)
            for param, param_id in zip(group["params"], saved["params"], strict=True):
                saved_state = state_dict["state"].get(param_id)
                _check_saved_state(saved_state, param, param_id)
                if saved_state:
                    moments.append((param, saved_state, merged))
        super().load_state_dict({**state_dict, "param_groups": groups})
        # torch casts every floating-point state to the parameter's dtype, which would round fp32
        # moments of bf16 parameters; take them from the checkpoint in AdaWarm's state dtype.
        for param, saved_state, group in moments:
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[param][key] = moment_like(param, group["state_dtype"]).copy_(
                    saved_state[key]
                )
            # Kahan buffers follow this optimizer's option: kept when both sides have them,
            # zeros when only this one does, dropped when only the checkpoint does.
            if needs_compensation(param, group["compensation"]):
                buffer = saved_state.get("compensation")
                self.state[param]["compensation"] = (
                    torch.zeros_like(param) if buffer is None else buffer.to(param).clone()
                )
            else:
                self.state[param].pop("compensation", None)


def _check_stochastic_dtypes(params: list[Tensor]) -> None:
    for param in params:
        if param.dtype == torch.float16:
            raise ValueError(
                f"Invalid compensation for a float16 parameter of shape {tuple(param.shape)}: "
                "'stochastic' rounds to bfloat16 only; expected 'kahan' or None for float16"
            )


def _check_saved_state(saved: dict[str, Any] | None, param: Tensor, param_id: Any) -> None:
    if not saved:
        return
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in saved:
            raise ValueError(f"Loaded state of parameter {param_id} lacks {key!r}")
    for key in ("exp_avg", "exp_avg_sq"):
        shape = tuple(saved[key].shape)
        if shape != tuple(param.shape):
            raise ValueError(
                f"Loaded {key} of parameter {param_id} has shape {shape}, expected "
                f"{tuple(param.shape)} (the parameter's shape)"
            )
