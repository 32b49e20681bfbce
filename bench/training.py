"""One training run of the quality grid: a cell, a method, a learning rate and a seed."""

from __future__ import annotations

import datetime
import functools
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from adawarm import AdaWarm, AdaWarmScheduleFree
from adawarm.schedule import MEASURED, WARMUP_NAMES
from bench import RUNS
from bench.grid import USER_SCHEDULE, USER_WARMUP, Cell, Method
from bench.lm import ModelConfig, batches, fine_tuning_corpus, loss_on, make_model, stdlib_corpus
from bench.peers import BY_KIND

MODEL = ModelConfig(d_model=32, n_layers=2, context=32)
BATCH_SIZE = 12
BETA1 = 0.9
WEIGHT_DECAY = 0.01
EVALUATIONS = 6  # validation losses per run, the last at its final step
EVAL_BATCHES = 8
# The pre-trained model that fine-tuning cells start from: pre-LN, AdamW with a linear warmup
# and cosine decay at its best rate on the grid's pre-LN cells, on the pre-training text.
PRETRAIN_STEPS = 1500
PRETRAIN_LR = 1e-2


@dataclass
class Run:
    cell: str
    method: str
    lr: float
    seed: int
    final_loss: float
    curve: list[tuple[int, float]]
    seconds: float
    # Method.settings of what it trained with; None in grids saved before runs recorded them.
    settings: dict | None = None
    # The measured warmup's factor on the first group's rate, (step, factor) at FACTOR_STEPS;
    # None for other methods.
    factors: list[tuple[int, float]] | None = None


# The steps a measured warmup's factor is recorded at: every one of the first 10, then about
# 12 a decade (the factor moves most early on).
FACTOR_STEPS = frozenset({*range(1, 11), *(round(10 ** (1 + k / 12)) for k in range(1, 37))})

# One run: its cell, method, learning rate, seed and the cache folder of the pre-trained model.
Job = tuple[Cell, Method, float, int, Path]

corpus = functools.cache(stdlib_corpus)
fine_tuning = functools.cache(fine_tuning_corpus)


def make_optimizer(method: Method, params, lr: float, cell: Cell) -> torch.optim.Optimizer:
    betas = (BETA1, cell.beta2)
    if method.kind == "adawarm":
        return AdaWarm(
            params,
            lr=lr,
            betas=betas,
            weight_decay=WEIGHT_DECAY,
            # AdaWarm's own names as such ("auto" steps aside for a warming scheduler)
            warmup_steps=(
                method.warmup if method.warmup in WARMUP_NAMES else method.warmup_steps(cell)
            ),
            total_steps=method.total_steps(cell),
            rectify=method.rectify,
            compensation=method.compensation,
            state_dtype=getattr(torch, method.state_dtype),
            backend="torch",
        )
    if method.kind == "adawarm-schedulefree":
        return AdaWarmScheduleFree(
            params,
            lr=lr,
            betas=betas,
            weight_decay=WEIGHT_DECAY,
            warmup_steps=(
                method.warmup if method.warmup in WARMUP_NAMES else method.warmup_steps(cell)
            ),
            total_steps=method.total_steps(cell),
            rectify=method.rectify,
            compensation=method.compensation,
            state_dtype=getattr(torch, method.state_dtype),
            backend="torch",
        )
    if method.kind.startswith("measured"):  # a prototype of a measured warmup (bench.adaptive)
        from bench.adaptive import make_measured

        return make_measured(method, params, lr, cell, betas=betas, weight_decay=WEIGHT_DECAY)
    if method.kind == "radam":
        return torch.optim.RAdam(
            params, lr=lr, betas=betas, weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True
        )
    if method.kind == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(
            params,
            lr=lr,
            betas=betas,
            weight_decay=WEIGHT_DECAY,
            warmup_steps=method.warmup_steps(cell),
        )
    adamw = BY_KIND[method.kind].load() if method.kind in BY_KIND else torch.optim.AdamW
    return adamw(params, lr=lr, betas=betas, weight_decay=WEIGHT_DECAY)


def lr_multiplier(method: Method, cell: Cell) -> Callable[[int], float]:
    """The LambdaLR factor for scheduler step ``s`` (optimizer step ``s + 1``).

    AdamW's warmup, if any, is part of it; AdaWarm ramps inside the optimizer, and its ramp
    multiplies this factor (stepping aside under the user's own warmup); the schedule-free
    optimizers run at a constant rate with their own warmup, as schedulefree's authors intend.
    """
    if method.schedule_free:
        return lambda s: 1.0
    steps = cell.steps
    user_warmup = round(USER_WARMUP * steps) if cell.schedule == USER_SCHEDULE else 0
    own_warmup = method.warmup_steps(cell) if method.adamw_like else 0

    def factor(s: int) -> float:
        warm = min(1.0, s / user_warmup) if user_warmup else 1.0  # HF: 0 at the first step
        if own_warmup:
            warm *= min(1.0, (s + 1) / own_warmup)
        if cell.schedule == "constant":
            return warm
        decay_from = user_warmup
        progress = min(max(s - decay_from, 0), steps - decay_from) / (steps - decay_from)
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def pretrained_path(cache: Path) -> Path:
    return cache / f"pretrained-pre-LN-{PRETRAIN_STEPS}-steps.pt"


def pretrain(cache: Path) -> Path:
    """Train (once; later calls find the file) the model the fine-tuning cells start from."""
    path = pretrained_path(cache)
    if path.exists():
        return path
    torch.manual_seed(1234)
    model = make_model("pre-LN", MODEL)
    cell = Cell("pre-LN", 0.95, PRETRAIN_STEPS, USER_SCHEDULE, (PRETRAIN_LR,), 1)
    optimizer = make_optimizer(Method("AdamW", "adamw"), model.parameters(), PRETRAIN_LR, cell)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(Method("AdamW", "adamw"), cell)
    )
    data = batches(corpus().train, MODEL.context, BATCH_SIZE, PRETRAIN_STEPS, seed=1234)
    for step in range(PRETRAIN_STEPS):
        loss = loss_on(model, data[step])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    return path


def train_one(job: Job) -> Run:
    """Train one run and return its validation curve; stops early once the loss is not finite."""
    cell, method, lr, seed, cache = job
    torch.set_num_threads(1)
    # AdaWarm says once per run that its ramp steps aside for the user's warmup; the report
    # says it once for all.
    warnings.filterwarnings("ignore", message="AdaWarm: the LR scheduler")
    start = time.perf_counter()
    text = fine_tuning() if cell.fine_tune else corpus()
    torch.manual_seed(seed)
    model = make_model(cell.architecture, MODEL)
    if cell.fine_tune:
        model.load_state_dict(torch.load(pretrained_path(cache)))
    model = model.to(getattr(torch, method.param_dtype))
    optimizer = make_optimizer(method, model.parameters(), lr, cell)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(method, cell))
    train_batches = batches(text.train, MODEL.context, BATCH_SIZE, cell.steps, seed)
    eval_windows = batches(text.validation, MODEL.context, BATCH_SIZE, EVAL_BATCHES, 10_000)
    schedule_free = method.schedule_free
    if schedule_free:
        optimizer.train()

    def validation_loss() -> float:
        if schedule_free:
            optimizer.eval()  # evaluate at the averaged iterate
        with torch.no_grad():
            loss = statistics.fmean(loss_on(model, windows).item() for windows in eval_windows)
        if schedule_free:
            optimizer.train()
        return loss

    eval_every = max(1, cell.steps // EVALUATIONS)
    curve = []
    factors = [] if method.warmup == MEASURED else None
    for step in range(cell.steps):
        loss = loss_on(model, train_batches[step])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if method.eight_bit:
            from bench.state8bit import store_in_eight_bits

            store_in_eight_bits(optimizer, method.eight_bit, seed, step + 1)
        if factors is not None and step + 1 in FACTOR_STEPS:
            factors.append((step + 1, float(optimizer.measured_factors()[0])))
        scheduler.step()
        if (step + 1) % eval_every == 0 or step + 1 == cell.steps:
            curve.append((step + 1, validation_loss()))
            if not math.isfinite(curve[-1][1]):
                break  # diverged: the remaining steps cannot recover
    elapsed = time.perf_counter() - start
    return Run(
        cell.name,
        method.name,
        lr,
        seed,
        curve[-1][1],
        curve,
        elapsed,
        method.settings(cell),
        factors,
    )


def train_all(jobs: list[Job], workers: int, desc: str) -> list[Run]:
    """Train ``jobs`` (as :func:`train_one` takes them) on ``workers`` processes, in order."""
    from tqdm import tqdm

    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(train_one, jobs), total=len(jobs), desc=desc, unit="run"))


def train_methods(
    pairs: list[tuple[Cell, Method]],
    workers: int,
    desc: str,
    seeds_of: Callable[[Cell], range] = lambda cell: range(cell.seeds),
) -> list[Run]:
    """Every run of each (cell, method) of ``pairs``, at the cell's rates and at the seeds
    ``seeds_of`` gives it (the cell's, by default; the long runs first: the pool ends
    together)."""
    jobs = [
        (cell, method, lr, seed, RUNS / "cache")
        for cell, method in pairs
        for lr in cell.lrs
        for seed in seeds_of(cell)
    ]
    jobs.sort(key=lambda job: -job[0].steps)
    if any(cell.fine_tune for cell, _ in pairs):
        pretrain(RUNS / "cache")
    return train_all(jobs, workers, desc)


def measured_heading(workers: int, runs: int, seconds: float, command: str) -> str:
    """The first words of a report: when, where and by which command its runs were trained."""
    return (
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()}, {workers} "
        f"processes x 1 thread, torch {torch.__version__}: {runs} runs in {seconds:.0f} s "
        f"(`{command}`)."
    )
