"""AdaWarmScheduleFree: schedule-free AdamW with AdaWarm's warmup, its train/eval switches and
checkpoints; the math is in ``adawarm.schedule``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adawarm import schedule_free_checkpoint
from adawarm.functional import local_tensors, select_execution
from adawarm.optimizer_base import GroupStep, WarmupOptimizer
from adawarm.quantization import MIN_8BIT_SIZE
from adawarm.schedule import AUTO, MEASURED, resolve_schedule_free_warmup_steps
from adawarm.schedule_free_functional import run_schedule_free, switch
from adawarm.state import iterate_like, moment_entries, needs_compensation
from adawarm.validation import check_schedule_free_group, group_betas

# Chosen on the quality grid (docs/defaults.md): "auto" is a ramp over 5 % of the run when its
# length is known (adawarm.schedule.resolve_schedule_free_warmup_steps), no rectification.
DEFAULT_WARMUP_STEPS: int | str = AUTO
DEFAULT_RECTIFY = False
# AdaWarm's and torch.optim.AdamW's, so that swapping the class name keeps the decay; the grid's
# runs used it (docs/defaults.md, "AdaWarmScheduleFree's weight decay"). schedulefree's is 0.
DEFAULT_WEIGHT_DECAY = 1e-2


class AdaWarmScheduleFree(WarmupOptimizer):
    r"""Schedule-free AdamW (Defazio et al., 2024) with AdaWarm's variance-aware warmup.

    The parameters hold ``y``, the point gradients are taken at, in train mode, and ``x``, the
    average of the ``z`` iterates, in eval mode: call ``optimizer.train()`` before training steps
    and ``optimizer.eval()`` before evaluating or saving a model for inference. With
    ``t = 1, 2, ...``:

    $$
    \begin{aligned}
    &\gamma_t = \gamma \cdot \mathrm{ramp}_t \cdot r_t, \quad
    \gamma^{\max}_t = \max(\gamma^{\max}_{t-1}, \gamma_t), \quad
    c_t = t^{\,r} (\gamma^{\max}_t)^{p}, \quad
    \tau_t = c_t \Big/ \textstyle\sum_{i \le t} c_i \\
    &v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = g_t / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon) + \lambda y_{t-1} \\
    &y_t = (1-\tau_t)\, y_{t-1} + \tau_t z_{t-1} + \gamma_t (\beta_1 (1-\tau_t) - 1)\, u_t, \quad
    z_t = z_{t-1} - \gamma_t u_t \\
    &x_t = y_t + (1 - 1/\beta_1)(z_t - y_t) \quad \text{(eval mode)}
    \end{aligned}
    $$

    ``ramp_t * r_t`` is AdaWarm's warmup factor (``adawarm.schedule``): ``r_t = 1`` without
    rectification, and with it 0 while RAdam would take no adaptive step (``rho_t <= 5``), where
    the step is silent. With ``warmup_steps=W, rectify=False`` this is schedulefree's
    ``AdamWScheduleFree(warmup_steps=W)``.

    Args:
        params: parameters or parameter groups; every hyper-parameter below can be set per group.
        lr: learning rate (a float, or a one-element tensor).
        betas: ``beta1`` interpolates between the average and ``z`` (0 < beta1 < 1), ``beta2``
            is the second moment's decay.
        eps: added to the denominator for numerical stability.
        weight_decay: weight decay, applied at ``y`` as in schedulefree; 0.01 by default, as in
            [`AdaWarm`][adawarm.AdaWarm] and ``torch.optim.AdamW`` (schedulefree's default is
            0: pass ``weight_decay=0.0`` for it).
        warmup_steps: the ramp's length, ``"untuned"`` (``2 / (1 - beta2)`` steps), or
            ``"auto"`` (the default): 5 % of ``total_steps`` (schedulefree's recommended
            warmup), or without it [`AdaWarm`][adawarm.AdaWarm]'s ``min(50, 2 / (1 - beta2))``
            steps; or ``"measured"``: no ramp, the rate times a factor that caps the relative
            move of the parameters (``1 - beta1`` of ``z``'s) at 0.005 of their norm, measured
            inside each step ([Warmup](warmup.md#measured-warmup)); the averaging weights
            take the rate applied.
        total_steps: the run's length, if known (the ``"auto"`` ramp then lasts 5 % of it).
        rectify: RAdam's variance rectification of the rate.
        r: the averaging weight's power of ``t`` (schedulefree's ``r``).
        weight_lr_power: the averaging weight's power of the largest scheduled rate so far
            (schedulefree's ``weight_lr_power``), which down-weights the warmup's iterates.
        maximize: maximize the objective instead of minimizing it.
        foreach: True runs the torch backend's ``torch._foreach_*`` implementation, False its
            single-tensor one; None lets ``fused``/``backend`` decide.
        capturable: a step with no host synchronisation, which a CUDA graph can capture (needs
            the Triton backend; ``lr`` may be a tensor on the device).
        fused: True runs the Triton kernel (CUDA tensors only: no fused PyTorch kernel computes
            this update); False anything else; None automatic.
        state_dtype: dtype of ``z``/``exp_avg_sq`` for fp32/fp16/bf16 parameters: ``None`` (fp32)
            or ``torch.bfloat16`` (stored by stochastic rounding from ``rounding_seed``), or
            ``torch.uint8``: an 8-bit ``exp_avg_sq`` for tensors of at least ``min_8bit_size``
            elements, as [`AdaWarm`][adawarm.AdaWarm]'s (``z``, the iterate, stays fp32).
        min_8bit_size: with ``state_dtype=torch.uint8``, tensors of fewer elements keep an fp32
            ``exp_avg_sq``.
        compensation: ``None``, ``"kahan"`` (fp16/bf16 parameters) or ``"stochastic"`` (bf16
            parameters), as in [`AdaWarm`][adawarm.AdaWarm].
        rounding_seed: the seed of stochastic rounding.
        backend: ``None`` (the Triton kernel for CUDA tensors it can serve, else the torch
            backend), ``"torch"`` or ``"triton"``.

    State per parameter: ``step`` (float32 scalar), ``z``, ``exp_avg_sq`` (fp32 for fp16/bf16
    parameters unless ``state_dtype`` says otherwise; an 8-bit ``exp_avg_sq`` adds
    ``exp_avg_sq_scales``), and the average's ``weight_sum`` and ``lr_max`` (float64 scalars);
    with ``warmup_steps="measured"``, ``relative_update`` (two numbers); the group's
    ``train_mode`` says which point the parameters hold.
    """

    # step() takes grad_scale/found_inf from torch.amp.GradScaler and unscales inside the update.
    _step_supports_amp_scaling = True
    STATE_KEYS = ("step", "z", "exp_avg_sq", "weight_sum", "lr_max")
    COUNTER_KEYS = ("step", "weight_sum", "lr_max")
    PACKED_STATE_KEYS = ("z", "exp_avg_sq")
    OPTIONAL_STATE_KEYS = (*WarmupOptimizer.OPTIONAL_STATE_KEYS, "exp_avg_sq_scales")
    _resolve_warmup_steps = staticmethod(resolve_schedule_free_warmup_steps)
    _check_group = staticmethod(check_schedule_free_group)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.0025,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        *,
        warmup_steps: int | str = DEFAULT_WARMUP_STEPS,
        total_steps: int | None = None,
        rectify: bool = DEFAULT_RECTIFY,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        min_8bit_size: int = MIN_8BIT_SIZE,
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
            "total_steps": total_steps,
            "rectify": rectify,
            "r": r,
            "weight_lr_power": weight_lr_power,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "state_dtype": state_dtype,
            "min_8bit_size": min_8bit_size,
            "compensation": compensation,
            "rounding_seed": rounding_seed,
            "backend": backend,
            # Which point the parameters hold: y (train) or x (eval). A new optimizer starts in
            # eval mode, as schedulefree's: before the first step x = y = z anyway.
            "train_mode": False,
        }
        super().__init__(params, defaults)

    def _new_state(self, param: Tensor, group: dict[str, Any], counter_device) -> dict:
        state = {
            "step": torch.zeros((), dtype=torch.float32, device=counter_device),
            "z": iterate_like(param, group["state_dtype"]).copy_(param.detach()),
            **moment_entries(param, "exp_avg_sq", group["state_dtype"], group["min_8bit_size"]),
            "weight_sum": torch.zeros((), dtype=torch.float64, device=counter_device),
            "lr_max": torch.zeros((), dtype=torch.float64, device=counter_device),
        }
        if needs_compensation(param, group["compensation"]):
            state["compensation"] = torch.zeros_like(param)
        return state

    def _before_step(self) -> None:
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"AdaWarmScheduleFree.step() in eval mode (parameter group {index}): the "
                    "parameters hold the averaged point x, not the point y that gradients are "
                    "taken at; call optimizer.train() before training steps (and "
                    "optimizer.eval() before evaluating). Nothing was changed."
                )

    def _check(self, index: int, group: dict[str, Any]) -> GroupStep | None:
        work = super()._check(index, group)
        if work is not None and work.implementation == "fused":
            raise RuntimeError(
                "fused=True for tensors that are not on a CUDA device: no fused PyTorch kernel "
                "computes the schedule-free update (the Triton kernel takes CUDA tensors); pass "
                "fused=None or foreach=True"
            )
        return work

    def _run(
        self, work: GroupStep, grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> Tensor | None:
        group, states = work.group, work.states
        beta1, beta2 = work.betas
        return run_schedule_free(
            work.backend,
            work.shards,
            work.local(work.grads),
            *(work.local(states[key]) for key in ("z", "exp_avg_sq")),
            *(states[key] for key in ("step", "weight_sum", "lr_max")),
            **work.scales("exp_avg_sq"),
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            warmup_steps=self._resolve_warmup_steps(
                0 if work.scheduler_warms_up else group["warmup_steps"],
                beta2,
                group["total_steps"],
            ),
            rectify=group["rectify"],
            r=group["r"],
            weight_lr_power=group["weight_lr_power"],
            maximize=group["maximize"],
            torch_implementation=work.implementation,
            grad_scale=grad_scale,
            found_inf=found_inf,
            table_cache=self._table_cache(work),
            gradient_scratch=work.gradient_scratch,
            compensations=work.local(states["compensation"]),
            rounding_seed=group["rounding_seed"],
            stochastic_params=group["compensation"] == "stochastic",
            relative_updates=(
                states["relative_update"] if group["warmup_steps"] == MEASURED else None
            ),
            relative_update_out=work.relative_update_out,
        )

    @staticmethod
    def _measured_share(group: dict[str, Any]) -> float:
        """The parameters ``y`` take ``1 - beta1`` of ``z``'s move, which the measured warmup
        measures."""
        return 1.0 - group_betas(group)[0]

    @torch.no_grad()
    def train(self) -> None:
        """Put the parameters at ``y``, the point gradients are taken at: call before training
        steps. One pass over the parameters that have a state; nothing if already in train
        mode."""
        self._switch(to_train=True)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the parameters at ``x``, the averaged point: call before evaluating, and before
        saving a model for inference. One pass; nothing if already in eval mode."""
        self._switch(to_train=False)

    def _switch(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            check_schedule_free_group(group)
            beta1 = group_betas(group)[0]
            params = [p for p in group["params"] if self.state.get(p)]
            states = [self.state[p] for p in params]
            shards = local_tensors(params)
            backend = "torch"
            if shards:  # the backend the group's steps run on
                backend, _ = select_execution(
                    group["backend"], shards, foreach=group["foreach"], fused=group["fused"]
                )
            switch(
                backend,
                shards,
                local_tensors([state["z"] for state in states]),
                [state["step"] for state in states],
                weight=(1.0 - beta1) if to_train else (1.0 - 1.0 / beta1),
                compensations=local_tensors([state.get("compensation") for state in states]),
                rounding_seed=group["rounding_seed"],
                stochastic_params=group["compensation"] == "stochastic",
                foreach=group["foreach"] is not False,
            )
            group["train_mode"] = to_train

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of AdaWarmScheduleFree or of schedulefree's ``AdamWScheduleFree``
        / ``RAdamScheduleFree`` (saved in either mode: the mode is part of it), by the rules of
        ``adawarm.schedule_free_checkpoint``. Everything is checked before anything loads."""
        groups, loaded = schedule_free_checkpoint.prepare(self, state_dict)
        super().load_state_dict({**state_dict, "param_groups": groups})
        for param, state in loaded:
            self.state[param] = state
