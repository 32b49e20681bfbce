"""The AdaWarm schedule: every per-step scalar of the update, defined once.

Every backend (the PyTorch implementations and the Triton kernel) takes its scalars from
:func:`step_schedule`, so the math lives here and nowhere else. All scalars are Python floats
(IEEE fp64), as in ``torch.optim.AdamW``/``RAdam``: RAdam's ``rho_t`` loses too much precision by
cancellation in fp32 (``rho_6`` = 6.0005 instead of 5.9942 for beta2 = 0.999).

With ``t = 1, 2, ...`` the step of a parameter, ``W`` the warmup length, ``lr`` the group's rate::

    ramp_t  = min(1, t / W)                       (W = 0: 1)
    lr_t    = lr * ramp_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t   = rho_inf - 2 t beta2^t / (1 - beta2^t)
    r_t     = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))

    p <- p (1 - lr_t wd)                                           (decoupled decay, every step)
    m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
    rectify=False:            p <- p - lr_t       m_hat / (sqrt(v_hat) + eps)           (AdamW)
    rectify=True, rho_t > 5:  p <- p - lr_t r_t   m_hat / (sqrt(v_hat) + eps / sqrt(1 - beta2^t))
    rectify=True, rho_t <= 5: p <- p - lr_t       m_hat                         (momentum step)

with ``m_hat = m / (1 - beta1^t)`` and ``v_hat = v / (1 - beta2^t)``. The rectified line is exactly
``torch.optim.RAdam``'s update (which adds eps to the raw ``sqrt(v)``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

UNTUNED = "untuned"
# AdaWarm's default ramp; see reliable_warmup_steps.
AUTO = "auto"
# A factor measured from the steps instead of a ramp; see measured_factor.
MEASURED = "measured"
WARMUP_NAMES = (AUTO, UNTUNED, MEASURED)
# The measured warmup's cap on a step's relative update ||delta p|| / ||p|| over a group.
# Chosen on the quality grid (docs/defaults.md, "Measured warmup: rules tried"; python -m bench
# adaptive): 0.003 held back 300-step runs that need no warmup (0.04-0.13 nats behind the best
# fixed ramp at lr 0.01-0.03), 0.01 let post-LN runs at lr 0.1 end 0.3-0.4 nats higher than
# 0.005, which still trained them (2.43-2.51 nats after 300 steps; the "auto" ramp 3.06-3.23).
MEASURED_CAP = 0.005
# torch.optim.RAdam takes the adaptive step only while the variance estimate is tractable.
RECTIFICATION_THRESHOLD = 5.0
# The default ramp lasts this many steps, or 2 / (1 - beta2) where that is shorter (see
# reliable_warmup_steps), or, when the run's length is known (total_steps), this fraction of it
# if that is longer. Both chosen from the quality benchmark (docs/defaults.md): over its 300-
# and 3000-step cells, 50 steps were the shortest ramp that kept short runs within ~0.03 nats of
# the best AdamW, and the 3000-step runs needed ~5 % of the run (150 steps) to stay there; 20 %
# cost short runs up to 0.03 nats more.
RELIABLE_SAMPLES = 50
RUN_FRACTION = 0.05
# AdaWarmScheduleFree's default ramp lasts this fraction of the run when its length is known,
# with no floor: schedulefree's recommended warmup. Chosen on the quality grid (docs/defaults.md):
# it passed 28 of the grid's 34 checks against schedulefree, 1 % and 2 % of the run 26 each,
# AdaWarm's rule (at least 50 steps) 23 -- its floor cost 300-step runs up to 0.02 nats at lr
# 0.003, though they collapsed less at lr 0.1.
SCHEDULE_FREE_RUN_FRACTION = 0.05


def untuned_warmup_steps(beta2: float) -> int:
    """Ma & Yarats' untuned linear warmup length, ``round(2 / (1 - beta2))`` (2000 for 0.999)."""
    return round(2.0 / (1.0 - beta2))


def reliable_warmup_steps(beta2: float) -> int:
    """The default ramp length (``"auto"``): ``min(50, round(2 / (1 - beta2)))`` steps -- 50 for
    beta2 >= 0.96 (0.98, 0.99, 0.999 ...), Ma & Yarats' ``2 / (1 - beta2)`` below (40 for 0.95).

    While ``t << 1 / (1 - beta2)``, ``v_hat`` is close to a plain average of the ``t`` squared
    gradients seen, and for Gaussian gradients the relative standard deviation of its square
    root, the adaptive step's denominator, is about ``sqrt(1 / (2 t))``: 10 % after 50 steps,
    whatever beta2 is. An average that forgets faster never holds 50 samples (at most
    ``(1 + beta2) / (1 - beta2)``); its estimate has settled after ``2 / (1 - beta2)`` steps.
    """
    return min(RELIABLE_SAMPLES, untuned_warmup_steps(beta2))


def resolve_warmup_steps(
    warmup_steps: int | str, beta2: float, total_steps: int | None = None
) -> int:
    """The warmup length: an int as given, ``"untuned"`` as :func:`untuned_warmup_steps`,
    ``"auto"`` as :func:`reliable_warmup_steps`, or, when ``total_steps`` (the run's length) is
    known, ``RUN_FRACTION`` of it if that is longer; ``"measured"`` has no ramp (0): its
    factor (:func:`measured_factor`) multiplies the rate instead."""
    if warmup_steps == MEASURED:
        return 0
    if warmup_steps == UNTUNED:
        return untuned_warmup_steps(beta2)
    if warmup_steps == AUTO:
        reliable = reliable_warmup_steps(beta2)
        if total_steps is None:
            return reliable
        return max(reliable, round(RUN_FRACTION * total_steps))
    return int(warmup_steps)


def resolve_schedule_free_warmup_steps(
    warmup_steps: int | str, beta2: float, total_steps: int | None = None
) -> int:
    """AdaWarmScheduleFree's warmup length: as :func:`resolve_warmup_steps`, except that
    ``"auto"`` with the run's length known is ``SCHEDULE_FREE_RUN_FRACTION`` of it."""
    if warmup_steps == AUTO and total_steps is not None:
        return round(SCHEDULE_FREE_RUN_FRACTION * total_steps)
    return resolve_warmup_steps(warmup_steps, beta2, total_steps)


def measured_factor(lr: float, update_sq: float, param_sq: float) -> float:
    """The measured warmup's factor on the rate of a group's next step.

    ``update_sq`` and ``param_sq`` are sums over the group's tensors of the squared last move
    at rate 1 of what the step measures (the move divided by the rate that step applied,
    ``lr_t``) and of its squared values before it: AdaWarm measures the parameters;
    AdaWarmScheduleFree ``z``, of whose move the parameters ``y`` take ``1 - beta1``, so there
    ``lr`` is the rate times ``1 - beta1``. At ``lr`` the next step would move the group by
    about ``rho = lr sqrt(update_sq / param_sq)`` of its norm; the factor caps that at
    ``MEASURED_CAP``: ``min(1, MEASURED_CAP / rho)``, and 1 where nothing moves or the norm is 0
    (Kosson et al. 2024, *Analyzing & reducing the need for learning rate warmup in GPT
    training*). Before a tensor's first step its sums are those that step will have: Adam's first
    update at rate 1 moves every element by 1 (``m_hat / sqrt(v_hat) = g / |g|``; a few ``eps``
    less, or 0 where the gradient is), so ``update_sq`` is the element count
    (``adawarm.state.first_relative_update``).
    """
    rho = lr * math.sqrt(update_sq / param_sq) if param_sq > 0.0 else 0.0
    return min(1.0, MEASURED_CAP / rho) if rho > 0.0 else 1.0


def ramp(step: int, warmup_steps: int) -> float:
    """The linear ramp ``min(1, t / W)``; 1 when ``W = 0``."""
    if warmup_steps == 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def rho_inf(beta2: float) -> float:
    """The maximum length of RAdam's approximated simple moving average."""
    return 2.0 / (1.0 - beta2) - 1.0


def rho(step: int, beta2: float) -> float:
    """The length ``rho_t`` of RAdam's approximated simple moving average at step ``t``."""
    beta2_t = beta2**step
    return rho_inf(beta2) - 2.0 * step * beta2_t / (1.0 - beta2_t)


def can_rectify(beta2: float) -> bool:
    """Whether rectification ever engages for this beta2 (``rho_inf > 5``, i.e. beta2 > 2/3)."""
    return beta2 > 0.0 and rho_inf(beta2) > RECTIFICATION_THRESHOLD


def rectification(step: int, beta2: float) -> float:
    """RAdam's variance rectification ``r_t``, or 0.0 on a momentum-only step (``rho_t <= 5``)."""
    rho_t = rho(step, beta2)
    if not rho_t > RECTIFICATION_THRESHOLD:
        return 0.0
    rho_max = rho_inf(beta2)
    return math.sqrt(
        (rho_t - 4.0) * (rho_t - 2.0) * rho_max / ((rho_max - 4.0) * (rho_max - 2.0) * rho_t)
    )


@dataclass(frozen=True)
class StepSchedule:
    """The scalars of one AdaWarm step ``t`` of one parameter group.

    ``rectification`` is ``r_t`` with rectification on (0.0 on a momentum-only step) and 1.0 with
    it off. ``eps`` is the epsilon added to ``sqrt(v_hat)``.
    """

    step: int
    ramp: float
    rectification: float
    lr: float
    decay: float
    bias_correction1: float
    bias_correction2_sqrt: float
    eps: float

    @property
    def adaptive(self) -> bool:
        """Whether this step divides by ``sqrt(v_hat)``; False on a momentum-only step."""
        return self.rectification > 0.0

    @property
    def step_size(self) -> float:
        """The coefficient of ``m`` (not ``m_hat``): ``lr_t r_t / (1 - beta1^t)``, or
        ``lr_t / (1 - beta1^t)`` on a momentum-only step."""
        scale = self.rectification if self.adaptive else 1.0
        return self.lr * scale / self.bias_correction1

    @property
    def warmup_factor(self) -> float:
        """The multiplier warmup puts on the adaptive step: ``ramp_t * r_t`` (0 on a momentum-only
        step, whose size is ``lr_t m_hat`` instead)."""
        return self.ramp * self.rectification


def step_schedule(
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    rectify: bool,
) -> StepSchedule:
    """The scalars of step ``step`` (1-based) for one group's hyper-parameters.

    ``warmup_steps`` must already be resolved to an int (see
    ``adawarm.schedule.resolve_warmup_steps``).
    """
    ramp_t = ramp(step, warmup_steps)
    lr_t = lr * ramp_t
    bias_correction2 = 1.0 - beta2**step
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    if rectify:
        r_t = rectification(step, beta2)
        eps_t = eps / bias_correction2_sqrt
    else:
        r_t = 1.0
        eps_t = eps
    return StepSchedule(
        step=step,
        ramp=ramp_t,
        rectification=r_t,
        lr=lr_t,
        decay=1.0 - lr_t * weight_decay,
        bias_correction1=1.0 - beta1**step,
        bias_correction2_sqrt=bias_correction2_sqrt,
        eps=eps_t,
    )


def warmup_factor(
    step: int,
    *,
    beta2: float,
    warmup_steps: int | str,
    rectify: bool,
    total_steps: int | None = None,
) -> float:
    """The warmup multiplier ``ramp_t * r_t`` at step ``t`` for plotting and logging. The
    measured warmup's factor depends on the run: an optimizer's ``warmup_factor()`` and
    ``measured_factors()`` give it."""
    if warmup_steps == MEASURED:
        raise ValueError(
            "Invalid warmup_steps: 'measured' has no factor before the run: it is measured from "
            "the steps; read optimizer.warmup_factor() or optimizer.measured_factors() instead"
        )
    if not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"Invalid step: {step!r}, expected an int >= 1")
    resolved = resolve_warmup_steps(warmup_steps, beta2, total_steps)
    r_t = rectification(step, beta2) if rectify else 1.0
    return ramp(step, resolved) * r_t


@dataclass(frozen=True)
class ScheduleFreeStep:
    """The scalars of one AdaWarmScheduleFree step ``t`` of one parameter group, and the state
    of the average after it (``lr_max``, ``weight_sum``).

    ``lr`` is the scheduled rate ``lr_t = lr * warmup_factor``; the weight of ``z`` in the new
    average is ``average`` (schedulefree's ``ckp1``: this step's weight over the sum of the
    weights so far, 0 while that sum is 0), and ``y`` moves by ``y_coefficient`` times the
    normalized gradient ``g / (sqrt(v / bias_correction2) + eps)`` (plus the weight decay).
    """

    step: int
    warmup_factor: float
    lr: float
    lr_max: float
    weight_sum: float
    average: float
    y_coefficient: float
    bias_correction2: float
    eps: float


def schedule_free_step(
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    warmup_steps: int,
    rectify: bool,
    r: float,
    weight_lr_power: float,
    lr_max: float,
    weight_sum: float,
) -> ScheduleFreeStep:
    """The scalars of schedule-free step ``step`` (1-based), from the average's state before it
    (``lr_max``, ``weight_sum``: 0 before the first step).

    The warmup factor is AdaWarm's, ``ramp_t * r_t`` (``r_t = 1`` without rectification, 0 on a
    step where RAdam takes no adaptive step: such a step is silent, as RAdamScheduleFree's
    default). The averaging weight follows the scheduled rate as in schedulefree:
    ``c_t = t^r * max(lr_1..lr_t)^weight_lr_power``, and z's weight in the average is
    ``c_t / (c_1 + ... + c_t)``. ``warmup_steps`` must already be resolved to an int.
    """
    factor = ramp(step, warmup_steps) * (rectification(step, beta2) if rectify else 1.0)
    lr_t = lr * factor
    lr_max = max(lr_t, lr_max)
    weight = float(step) ** r * lr_max**weight_lr_power
    weight_sum = weight_sum + weight
    average = weight / weight_sum if weight_sum > 0.0 else 0.0
    return ScheduleFreeStep(
        step=step,
        warmup_factor=factor,
        lr=lr_t,
        lr_max=lr_max,
        weight_sum=weight_sum,
        average=average,
        y_coefficient=lr_t * (beta1 * (1.0 - average) - 1.0),
        bias_correction2=1.0 - beta2**step,
        eps=eps,
    )
