"""The AdaWarm optimizer class: parameter groups, state, checks; the math is in ``schedule``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adawarm import checkpoint
from adawarm.functional import run_backend
from adawarm.optimizer_base import GroupStep, WarmupOptimizer
from adawarm.quantization import MIN_8BIT_SIZE
from adawarm.schedule import AUTO, MEASURED
from adawarm.state import new_state
from adawarm.validation import check_group, check_torch_only_options

# Chosen from the quality benchmark (docs/defaults.md): a linear ramp over
# min(50, 2 / (1 - beta2)) steps, or 5 % of total_steps if given and longer
# (adawarm.schedule.resolve_warmup_steps), no rectification.
DEFAULT_WARMUP_STEPS: int | str = AUTO
DEFAULT_RECTIFY = False


class AdaWarm(WarmupOptimizer):
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
            ``"measured"``: no ramp; the rate times ``min(1, 0.005 / rho)``, ``rho`` the
            relative update ``||delta p|| / ||p||`` of the group that the last step measured
            (scaled to this step's rate; the first step's from Adam's first update), computed
            inside the step ([Warmup](warmup.md#measured-warmup)).
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
            (fp32), ``torch.bfloat16`` (half the state memory; the math stays fp32, and the
            moments are stored by stochastic rounding from ``rounding_seed``, so that updates
            below half a bf16 ulp survive on average) or ``torch.uint8``: 8-bit moments, a byte
            per element and a float32 scale per block of 256 (about a quarter of fp32's
            memory), stored by stochastic rounding too, for tensors of at least
            ``min_8bit_size`` elements ([Low precision](low-precision.md#8-bit-moments)).
            Wider parameters keep moments of their own dtype.
        min_8bit_size: with ``state_dtype=torch.uint8``, tensors of fewer elements keep fp32
            moments (bitsandbytes' convention: biases and norms save little and are the
            noisiest).
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
    fp16/bf16 parameters), the names torch.optim.AdamW and RAdam use, so state_dicts interchange;
    8-bit moments add ``exp_avg_scales`` and ``exp_avg_sq_scales`` (``adawarm.state``);
    with ``warmup_steps="measured"``, ``relative_update`` (two numbers: the last step's squared
    move at rate 1 and the squared parameter before it).
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
        min_8bit_size: int = MIN_8BIT_SIZE,
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
            "min_8bit_size": min_8bit_size,
            "compensation": compensation,
            "rounding_seed": rounding_seed,
            "backend": backend,
        }
        super().__init__(params, defaults)

    STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
    OPTIONAL_STATE_KEYS = (
        *WarmupOptimizer.OPTIONAL_STATE_KEYS,
        "exp_avg_scales",
        "exp_avg_sq_scales",
    )
    _check_group = staticmethod(check_group)

    def _new_state(self, param: Tensor, group: dict[str, Any], counter_device) -> dict:
        return new_state(
            param,
            state_dtype=group["state_dtype"],
            min_8bit_size=group["min_8bit_size"],
            compensation=group["compensation"],
            counter_device=counter_device,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in enumerate(params):  # pickles of older torch versions: number steps
            saved = self.state.get(param)
            if saved and not isinstance(saved["step"], Tensor):
                saved["step"] = checkpoint.step_counter(saved["step"], index)

    def _run(
        self, work: GroupStep, grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> Tensor | None:
        group, states = work.group, work.states
        beta1, beta2 = work.betas
        return run_backend(
            work.backend,
            work.shards,
            work.local(work.grads),
            work.local(states["exp_avg"]),
            work.local(states["exp_avg_sq"]),
            states["step"],
            **work.scales("exp_avg", "exp_avg_sq"),
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
            table_cache=self._table_cache(work),
            compensations=work.local(states["compensation"]),
            rounding_seed=group["rounding_seed"],
            stochastic_params=group["compensation"] == "stochastic",
            relative_updates=(
                states["relative_update"] if group["warmup_steps"] == MEASURED else None
            ),
            relative_update_out=work.relative_update_out,
        )

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
