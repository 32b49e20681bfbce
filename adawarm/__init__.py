"""AdaWarm: AdamW with variance-aware warmup, fused in Triton with a pure-PyTorch fallback."""

from adawarm.functional import adawarm
from adawarm.optimizer import AdaWarm
from adawarm.schedule import StepSchedule, step_schedule, warmup_factor
from adawarm.schedule_free import AdaWarmScheduleFree

__all__ = [
    "AdaWarm",
    "AdaWarmScheduleFree",
    "StepSchedule",
    "adawarm",
    "step_schedule",
    "warmup_factor",
]
__version__ = "0.1.0"
