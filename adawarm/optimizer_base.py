"""What AdaWarm and AdaWarmScheduleFree share: per-group checks, states, and the all-or-nothing
step. Each optimizer says which state entries a step changes, how a parameter's state starts,
and which backend call runs a group's step."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adawarm.checkpoint import portable_state
from adawarm.functional import checked_execution, has_dtensors, local_tensors
from adawarm.quantization import scales_key
from adawarm.rollback import StepSnapshot, failed_step_error
from adawarm.schedule import AUTO, MEASURED, measured_factor, resolve_warmup_steps, step_schedule
from adawarm.shards import measured_sums_of_shards, not_measured_like, sum_over_shards
from adawarm.state import first_relative_update
from adawarm.tensor_lists import DTYPE, PackedTensors, empty_packed, pack
from adawarm.validation import group_betas

_CPU = torch.device("cpu")
# The largest group (in elements) whose states the torch backend packs: what a small model's
# step saves is per-tensor work, and a packed step copies the gradients into a scratch of
# this size once per step (a pass over them that a large model would notice).
PACKED_STATE_LIMIT = 1 << 20
# Whole-list accessors for the per-step passes over parameters and their states.
_GRAD = attrgetter("grad")
_IS_SPARSE = attrgetter("is_sparse")
_IS_NONE = partial(is_, None)
_STEP = itemgetter("step")


@dataclass(slots=True)
class GroupStep:
    """One parameter group's part of a step: checked, and then given its states."""

    index: int
    group: dict[str, Any]
    params: list[Tensor]  # those with gradients
    shards: list[Tensor]  # their local tensors (DTensor shards)
    sharded: bool  # whether any parameter is a DTensor (then its states are too)
    grads: list[Tensor]
    backend: str
    implementation: str | None  # the torch backend's; None: its fastest
    betas: tuple[float, float]
    # The group's "auto" ramp steps aside for its LR scheduler's own warmup (from this step on).
    scheduler_warms_up: bool
    # Per state entry the step changes, one tensor per parameter (None where it has none).
    states: dict[str, list[Tensor | None]] = field(default_factory=dict)
    # Where the torch backend packs the group's states, a scratch of their shapes for the
    # gradients (see WarmupOptimizer._packed_states).
    gradient_scratch: PackedTensors | None = None
    # Where a measured step over sharded parameters writes its shards' sums (adawarm.shards).
    relative_update_out: list[Tensor] | None = None

    def local(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """The local shards of these per-parameter tensors (they are themselves when no
        parameter is a DTensor: then no gradient or state is one either)."""
        return local_tensors(tensors) if self.sharded else tensors

    def scales(self, *keys: str) -> dict[str, list[Tensor | None]]:
        """The block scales of the states ``keys`` (None where a state is not 8-bit), as the
        backends take them."""
        return {scales_key(key): self.local(self.states[scales_key(key)]) for key in keys}

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


class WarmupOptimizer(Optimizer):
    """The step machinery of AdaWarm's optimizers.

    A subclass names the state entries a step changes (``STATE_KEYS``; ``COUNTER_KEYS`` among
    them are scalars that live where the backend reads them: on the CPU for the torch backend,
    on the parameter's device for the Triton kernel), and defines ``_check_group`` (the
    hyper-parameters of one group), ``_new_state`` and ``_run`` (one group's step).
    """

    STATE_KEYS: tuple[str, ...]
    COUNTER_KEYS: tuple[str, ...] = ("step",)
    OPTIONAL_STATE_KEYS: tuple[str, ...] = ("compensation", "relative_update")
    # State entries that the torch backend keeps end to end in one tensor per small group, for
    # a step that updates them with one op each (see _packed_states).
    PACKED_STATE_KEYS: tuple[str, ...] = ()
    # The algorithm's warmup length for a group's ``warmup_steps``, beta2 and ``total_steps``.
    _resolve_warmup_steps = staticmethod(resolve_warmup_steps)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        # Per parameter group, the Triton backend's cached pointer tables.
        self._table_caches: dict[int, dict] = {}
        # Configurations (see GroupStep.configuration) whose step has completed once.
        self._completed: set[tuple] = set()
        # Per group index: the group, its hyper-parameters as last checked, and its betas.
        self._checked: dict[int, tuple[dict, list, tuple[float, float]]] = {}
        # Per group index: its packed state entries as the torch backend last stepped them, and
        # the gradients' scratch that goes with them (see _packed_states).
        self._packs: dict[int, tuple[dict[str, list[Tensor]], PackedTensors | None]] = {}
        # Per group index: the measured warmup's factor its last step applied (a tensor).
        self._measured_factors: dict[int, Tensor] = {}
        super().__init__(params, defaults)

    # -- what a subclass defines --------------------------------------------------------------

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _new_state(self, param: Tensor, group: dict[str, Any], counter_device) -> dict:
        raise NotImplementedError

    def _run(
        self, work: GroupStep, grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> Tensor | None:
        """Run one group's step; return the measured warmup's factor it applied (a tensor), or
        None."""
        raise NotImplementedError

    def _table_cache(self, work: GroupStep) -> dict | None:
        """The Triton backend's cached pointer tables of ``work``'s group (None for the torch
        backend, which keeps none)."""
        if work.backend != "triton":
            return None
        return self._table_caches.setdefault(work.index, {})

    def _before_step(self) -> None:
        """Checks of the optimizer as a whole, before anything else of a step."""

    # -- shared ---------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch's base class adds this key of its own optimizers to the defaults; these
        # optimizers have no such option, and copying it into the groups would put it in every
        # later state_dict.
        self.defaults.pop("differentiable", None)
        # Neither is pickled (torch's __getstate__ keeps the defaults, state and groups only).
        self._table_caches = {}
        self._completed = set()
        self._checked = {}
        self._packs = {}
        self._measured_factors = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():  # groups pickled by older versions
                group.setdefault(key, value)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, but that the 8-bit moments of DTensor parameters are held
        as their values (``adawarm.checkpoint.portable_state``), which distributed
        checkpoints can reshard."""
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: portable_state(state) for index, state in state_dict["state"].items()
        }
        return state_dict

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have gradients and those gradients, after checking them.

        Every step runs this over every parameter, so it makes whole-list passes (~40-80 ns a
        tensor each on the CI machine, fewer bytecodes than a loop of checks) and loops only to
        name a parameter that fails.
        """
        name = type(self).__name__
        params = group["params"]
        grads = list(map(_GRAD, params))
        if any(map(_IS_NONE, grads)):
            pairs = [
                (param, grad) for param, grad in zip(params, grads, strict=True) if grad is not None
            ]
            params, grads = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        if any(map(_IS_SPARSE, grads)):
            param = next(p for p, g in zip(params, grads, strict=True) if g.is_sparse)
            raise RuntimeError(
                f"{name} does not support sparse gradients: got a sparse gradient for a "
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

    def _checked_betas(self, index: int, group: dict[str, Any]) -> tuple[float, float]:
        """Check the group's hyper-parameters, and return its betas as floats.

        Checking takes ~7 us a group, and a group's values rarely change between steps: a
        group whose values are equal to those it was checked with at its last step is not
        checked again -- unless a value could have changed in place since (a tensor, or a
        container other than a tuple of numbers), as a scheduler's tensor rate does.
        """
        cached = self._checked.get(index)
        if cached is not None and cached[0] is group and len(group) == len(cached[1]):
            # the same objects (~0.5 us), or else equal values (an LR scheduler sets new floats)
            if all(map(is_, cached[1], group.values())):
                return cached[2]
            values = list(group.values())
            if all(map(_same_value, cached[1], values)):
                self._checked[index] = (group, values, cached[2])
                return cached[2]
        self._check_group(group)
        betas = group_betas(group)
        values = list(group.values())
        if all(_immutable(value) for key, value in group.items() if key != "params"):
            self._checked[index] = (group, values, betas)
        else:
            self._checked.pop(index, None)
        return betas

    def _check(self, index: int, group: dict[str, Any]) -> GroupStep | None:
        """Everything about one group's step that can be checked without changing anything;
        None when no parameter of the group has a gradient."""
        betas = self._checked_betas(index, group)
        params, grads = self._collect(group)
        if group["compensation"] == "stochastic":
            _check_stochastic_dtypes(params)
        if not params:
            return None
        sharded = has_dtensors(params)
        shards = local_tensors(params) if sharded else params
        backend, implementation = checked_execution(
            group["backend"], shards, foreach=group["foreach"], fused=group["fused"]
        )
        if group["capturable"] and backend != "triton":
            raise RuntimeError(
                f"capturable=True needs the Triton backend, but backend={group['backend']!r} "
                f"resolved to {backend!r} for these tensors (CUDA tensors of dtype float32, "
                "bfloat16 or float16 are needed)"
            )
        return GroupStep(
            index,
            group,
            params,
            shards,
            sharded,
            grads,
            backend,
            implementation,
            betas,
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

    def _attach_states(self, work: GroupStep, created: list[Tensor]) -> None:
        """Give ``work`` the states of its parameters, creating those of first steps (recorded
        in ``created``).

        Counters live where the backend reads them: on the CPU for the torch backend (as the
        step of torch.optim.AdamW), on the parameter's device for the Triton kernel, which
        advances them.
        """
        on_device = work.backend == "triton"
        states = list(map(self.state.__getitem__, work.params))
        if not all(states):
            for param, state in zip(work.params, states, strict=True):
                if not state:
                    device = param.device if on_device else _CPU
                    state.update(self._new_state(param, work.group, device))
                    created.append(param)
        if on_device:
            steps = list(map(_STEP, states))
            if list(map(Tensor.get_device, steps)) != list(map(Tensor.get_device, work.params)):
                # Loaded from a checkpoint, or the backend changed: move the counters once.
                for param, state in zip(work.params, states, strict=True):
                    for key in self.COUNTER_KEYS:
                        state[key] = state[key].to(param.device)
        work.states = {key: list(map(itemgetter(key), states)) for key in self.STATE_KEYS}
        if not on_device:
            work.states.update(self._packed_states(work, states, work.states))
        for key in self.OPTIONAL_STATE_KEYS:
            work.states[key] = list(map(dict.get, states, repeat(key)))
        if work.group["warmup_steps"] == MEASURED:
            self._attach_relative_updates(work, states)

    def _attach_relative_updates(self, work: GroupStep, states: list[dict]) -> None:
        """Put the measured warmup's entries where the backend reads them (the CPU for the
        torch backend, the parameter's device for the kernel), made for a parameter whose state
        has none: its first step, or a checkpoint or group from before ``"measured"``. Over
        sharded parameters an entry holds the whole tensor's sums (``adawarm.shards``), and
        the step writes its shards' to a scratch."""
        entries = work.states["relative_update"]
        made = []
        pairs = zip(work.params, states, entries, strict=True)
        for index, (param, state, entry) in enumerate(pairs):
            device = param.device if work.backend == "triton" else _CPU
            if entry is None:
                entry = first_relative_update(work.shards[index], device)
                made.append(index)
            elif entry.device != device:
                entry = entry.to(device)
            else:
                continue
            state["relative_update"] = entries[index] = entry
        if work.sharded:
            if made:
                params = [work.params[index] for index in made]
                summed = sum_over_shards(torch.stack([entries[i] for i in made]), params)
                for row, index in enumerate(made):
                    entries[index].copy_(summed[row])
            work.relative_update_out = not_measured_like(entries)

    def _packed_states(
        self, work: GroupStep, states: list[dict], current: dict[str, list[Tensor]]
    ) -> dict[str, list[Tensor]]:
        """The torch backend's counters, and ``PACKED_STATE_KEYS`` where a group is small
        (:meth:`_packs_states`), of a group's stepping parameters: per key, a
        :class:`PackedTensors` (counters on the CPU), which the backend reads and updates in one
        op where it can. The packs of an earlier step serve while the states hold their views;
        otherwise (a first step, other parameters stepping, a loaded checkpoint, entries
        replaced or moved) the entries' values go into new packs whose views replace them in
        the states."""
        cached = self._packs.get(work.index)
        if cached is not None and all(map(_holds, cached[0].values(), map(current.get, cached[0]))):
            work.gradient_scratch = cached[1]
            return cached[0]
        packs: dict[str, list[Tensor]] = {}
        packing_states = self._packs_states(work, current)
        for key in (*self.COUNTER_KEYS, *self.PACKED_STATE_KEYS):
            counter = key in self.COUNTER_KEYS
            tensors = [tensor.to(_CPU) for tensor in current[key]] if counter else current[key]
            packed = pack(tensors) if counter or packing_states else None
            if packed is not None:  # else kept as they are (counters of different dtypes)
                tensors = packed
            for state, tensor in zip(states, tensors, strict=True):
                state[key] = tensor
            packs[key] = tensors
        scratch = None
        if packing_states and all(
            isinstance(packs[key], PackedTensors) for key in self.PACKED_STATE_KEYS
        ):
            scratch = empty_packed(packs[self.PACKED_STATE_KEYS[0]])
        self._packs[work.index] = (packs, scratch)
        work.gradient_scratch = scratch
        return packs

    def _packs_states(self, work: GroupStep, current: dict[str, list[Tensor]]) -> bool:
        """Whether the torch backend keeps a group's ``PACKED_STATE_KEYS`` packed: a group of at
        most ``PACKED_STATE_LIMIT`` elements, run by foreach ops, of fp32 or fp64 parameters
        with contiguous states of their dtype (the views are contiguous; states that follow a
        channels-last parameter keep their layout), none a DTensor."""
        params = work.params
        dtype = params[0].dtype
        return (
            bool(self.PACKED_STATE_KEYS)
            and work.implementation in (None, "foreach")
            and not work.sharded
            and dtype in (torch.float32, torch.float64)
            and sum(map(Tensor.numel, params)) <= PACKED_STATE_LIMIT
            and all(param.dtype is dtype for param in params)
            and all(
                state.dtype is dtype and state.is_contiguous()
                for key in self.PACKED_STATE_KEYS
                for state in current[key]
            )
        )

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
        (a kernel that cannot compile or launch, an interpreter error): parameters and every
        state entry are then as before, and states this step created are removed. Later steps
        of a configuration take no copy (it would add a read and a write of every parameter and
        state to every step): a launch that fails before it runs still changes nothing, but a
        failure after other groups' launches leaves those stepped.

        Args:
            closure: re-evaluates the model and returns the loss.
            grad_scale: the GradScaler's scale; gradients are divided by it inside the update.
            found_inf: when non-zero, the step is skipped entirely: no parameter or state changes
                and the step counters (hence the warmup) do not advance. GradScaler sets both
                (as attributes, which are read when the arguments are not given).
        """
        if torch.compiler.is_compiling():
            return _eagerly(self._step, closure, grad_scale, found_inf)
        # torch.set_grad_enabled called as a function: one frame, where the no_grad decorator
        # takes ~6 (a cold step pays for each; see _eagerly)
        enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return self._step(closure, grad_scale, found_inf)
        finally:
            torch.set_grad_enabled(enabled)

    def _step(
        self,
        closure: Callable[[], float] | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> float | None:
        self._before_step()
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
            completed = configurations <= self._completed
            if created or not completed:
                snapshot = StepSnapshot(work, created)
            factors = []
            for item in work:
                factors.append((item.index, self._run(item, grad_scale, found_inf)))
                if item.relative_update_out is not None:  # sharded: add the shards' sums up
                    measured_sums_of_shards(
                        item.states["relative_update"], item.relative_update_out, item.params
                    )
        except BaseException as error:
            for param in created:
                del self.state[param]
            if snapshot is None:
                raise
            snapshot.restore()
            replacement = failed_step_error(
                error, (item.backend for item in work), type(self).__name__
            )
            if replacement is None:
                raise
            raise replacement from error
        if not completed:
            self._completed |= configurations
        self._measured_factors.update(
            (index, factor) for index, factor in factors if factor is not None
        )
        for item in work:
            if item.scheduler_warms_up:
                item.group["warmup_steps"] = 0
                warnings.warn(
                    f"{type(self).__name__}: the LR scheduler of parameter group {item.index} "
                    "warms up itself (its rate at the first step is below its initial_lr), so "
                    "this group's warmup_steps='auto' ramp is off (warmup_steps=0); pass "
                    "warmup_steps explicitly to have both",
                    stacklevel=2,
                )
        return loss

    def warmup_factor(self) -> list[float]:
        """The warmup multiplier ``ramp_t * r_t`` that the next ``step()`` puts on each group's
        adaptive step (``r_t = 1`` without rectification, 0 on a step without an adaptive one);
        with ``warmup_steps="measured"``, the measured factor at the group's ``lr`` in place of
        ``ramp_t`` (reading it waits for the device).

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
                warmup_steps=self._resolve_warmup_steps(warmup, beta2, group["total_steps"]),
                rectify=group["rectify"],
            )
            factor = schedule.warmup_factor
            if group["warmup_steps"] == MEASURED:
                factor *= self._measured_factor(group)
            factors.append(factor)
        return factors

    def _measured_factor(self, group: dict[str, Any]) -> float:
        """The measured warmup's factor on the group's next step, from its parameters'
        ``relative_update`` entries (those that have none yet: as before their first step --
        from this rank's shard of a sharded parameter, which only the step adds up over the
        ranks, so that reading this never waits for other ranks)."""
        entries = []
        for param in group["params"]:
            entry = self.state.get(param, {}).get("relative_update")
            if entry is None:
                entry = first_relative_update(local_tensors([param])[0], _CPU)
            entries.append(entry.cpu())
        sums = torch.stack(entries).sum(0).tolist()
        return measured_factor(float(group["lr"]) * self._measured_share(group), *sums)

    @staticmethod
    def _measured_share(group: dict[str, Any]) -> float:
        """The share of the measured tensors' move that the parameters take, per unit of rate
        (``adawarm.schedule.measured_factor``)."""
        return 1.0

    def measured_factors(self) -> list[Tensor | None]:
        """Per group, the factor that ``warmup_steps="measured"`` put on the rate at the group's
        last step that ran (a 0-dim float32 tensor; None for a group that does not measure, or
        before its first step). The Triton kernel writes it on the parameters' device during the
        step, so logging it costs no host sync until its value is read (the torch backend's is
        on the CPU). Later steps may overwrite the tensor in place: copy it to keep a value."""
        return [self._measured_factors.get(index) for index in range(len(self.param_groups))]

    def effective_lr(self) -> list[float]:
        """Per group, the rate the next ``step()`` applies to the adaptive step: the group's
        ``lr`` (after any LR scheduler) times ``warmup_factor()``. Log it next to, or instead
        of, a scheduler's ``get_last_lr()``, which knows nothing of the warmup."""
        return [
            float(group["lr"]) * factor
            for group, factor in zip(self.param_groups, self.warmup_factor(), strict=True)
        ]


# Under torch.compile the step runs eagerly (a graph break around it): its schedule is a set of
# per-step Python floats, which dynamo would specialise on and recompile for at every step of the
# warmup and every learning-rate change. Only a step that dynamo traces calls this: a
# dynamo-disabled call passes through ~6 Python frames of torch's, which a step after a forward
# and backward pass (cold caches) pays for, where torch.compiler.is_compiling() is one call.
# torch._disable_dynamo (what torch.optim uses) imports dynamo at the first call, not at import:
# dynamo imports triton, which is slow and not needed by a CPU step.
@torch._disable_dynamo
def _eagerly(function: Callable[..., Any], *args: Any) -> Any:
    with torch.no_grad():
        return function(*args)


# The types of a hyper-parameter that cannot change in place.
_IMMUTABLE = (int, float, bool, str, type(None), torch.dtype)


def _same_value(checked: Any, value: Any) -> bool:
    """Whether a group entry holds what it held when the group was checked: the same object
    (the parameter list, whose values are not checked), or an equal immutable value."""
    return checked is value or (
        _immutable(value) and type(checked) is type(value) and checked == value
    )


def _immutable(value: Any) -> bool:
    return type(value) in _IMMUTABLE or (
        type(value) is tuple and all(type(item) in _IMMUTABLE for item in value)
    )


def _holds(packed: list[Tensor], tensors: list[Tensor] | None) -> bool:
    """Whether ``tensors`` are those of ``packed`` (its views, if it is a PackedTensors)."""
    return tensors is not None and len(packed) == len(tensors) and all(map(is_, packed, tensors))


def _check_stochastic_dtypes(params: list[Tensor]) -> None:
    for param in params:
        if param.dtype == torch.float16:
            raise ValueError(
                f"Invalid compensation for a float16 parameter of shape {tuple(param.shape)}: "
                "'stochastic' rounds to bfloat16 only; expected 'kahan' or None for float16"
            )
