"""Baselines computed beside a simulation: centralized (the joint objective) and each region alone.

Both use the same model and optimizer as the federated run and as much training
(``client.local_only.matched_settings``), the same plain ``train_local`` / ``evaluate`` functions as the clients,
and, as the federated run keeps its best round, keep their best of as many validation checkpoints
(``client.local_only.train_best_checkpoint``, with which a node trains its own local-only model).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.local_only import KeptCheckpoint, matched_settings, seed_tag, train_best_checkpoint
from client.train import EvalResult, evaluate, plan_steps, predict_proba, scores
from common import keys
from common.config import RunConfig
from common.data import Example, RegionData
from common.errors import EXIT_FAILED, FedlocaleError
from common.metrics import weighted_mean
from common.model import LoadedModel, adapter_state, build_model
from common.runfiles import CONFUSION, KEPT_CHECKPOINT
from common.seeds import derive_seed

Scores = dict[str, dict[str, Any]]
# the side-by-side processes' name (multiprocessing's), numbered from 1
WORKER_NAME = "fedlocale-baselines"


def _scores(result: EvalResult) -> dict[str, Any]:
    # the confusion matrix lets the summary pool the regions' test examples (runfolder.summary.POOLED)
    return {
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "loss": result.loss,
        CONFUSION: [list(row) for row in result.confusion],
    }


def _evaluate(cfg: RunConfig, loaded: LoadedModel, examples: list[Example]) -> EvalResult:
    return evaluate(
        loaded.model,
        loaded.tokenizer,
        examples,
        len(cfg.labels),
        max_length=cfg.model.max_length,
        batch_size=cfg.train.eval_batch_size,
    )


def validation_score(cfg: RunConfig, loaded: LoadedModel, regions: Mapping[str, RegionData]) -> float | None:
    """The federated run's validation criterion (``early_stopping.metric``, the example-weighted mean over the
    regions' val splits) for ``loaded`` on ``regions``; None when no region has a val example."""
    results = {name: _evaluate(cfg, loaded, region.val) for name, region in regions.items() if region.val}
    if not results:
        return None
    metric = cfg.early_stopping.metric
    return weighted_mean(
        {name: float(getattr(r, metric)) for name, r in results.items()},
        {name: float(r.num_examples) for name, r in results.items()},
    )


def train_baseline(
    cfg: RunConfig,
    train: list[Example],
    tag: str,
    regions: int,
    validate: Callable[[LoadedModel], float | None],
    on_step: Callable[[], None] | None = None,
) -> tuple[LoadedModel, KeptCheckpoint]:
    """Train one baseline model on ``train`` (the data of ``regions`` regions) with as much training as the
    federated run (``client.local_only.matched_settings``), validated by ``validate`` where the run validates (after
    each of ``cfg.rounds`` even shares of its steps, or every ``early_stopping.every``-th and the last); the best
    checkpoint (by ``early_stopping``'s metric) is left loaded."""
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    kept = train_best_checkpoint(
        loaded,
        train,
        matched_settings(cfg.train, cfg.rounds, regions),
        cfg.rounds,
        lambda: validate(loaded),
        higher_is_better=cfg.early_stopping.metric != "loss",
        min_delta=cfg.early_stopping.min_delta,
        max_length=cfg.model.max_length,
        seed=derive_seed(cfg.seed, tag),
        desc=tag,
        on_step=on_step,
        every=cfg.early_stopping.every,
    )
    return loaded, kept


def _train_and_test(
    cfg: RunConfig,
    train: list[Example],
    tests: Mapping[str, RegionData],
    tag: str,
    predictions: dict[str, np.ndarray] | None = None,
    regions: int = 1,
    adapters: dict[str, dict[str, torch.Tensor]] | None = None,
    on_step: Callable[[], None] | None = None,
) -> Scores:
    """Train one model on ``train`` (the data of ``regions`` regions); test it on each region; put its test
    predictions in ``predictions`` and its adapter state (best checkpoint) in ``adapters``.

    Like the federated run, which keeps its best round on validation, the baseline keeps its best checkpoint:
    it is validated on the val splits of ``tests`` where the federation validates, at the same shares of its steps
    (``train_baseline``), and the best one (by ``early_stopping``'s metric) is the one tested. More passes
    over-fit a baseline as they do the federation: best is compared with best.
    """
    loaded, kept = train_baseline(cfg, train, tag, regions, lambda model: validation_score(cfg, model, tests), on_step)
    if adapters is not None:
        for name in tests:
            adapters[name] = adapter_state(loaded.model)
    # one pass over each test split gives both the scores and the predictions the paired comparisons read
    out: Scores = {}
    for name, region in tests.items():
        probs = predict_proba(
            loaded.model,
            loaded.tokenizer,
            [ex.text for ex in region.test],
            max_length=cfg.model.max_length,
            batch_size=cfg.train.eval_batch_size,
        )
        out[name] = _scores(scores(probs, np.array([ex.label for ex in region.test], dtype=int), len(cfg.labels)))
        # which of its checkpoints the baseline kept, beside the federation's best round: best against best
        out[name][KEPT_CHECKPOINT] = kept.to_json()
        if predictions is not None:
            predictions[name] = probs.argmax(axis=1)
    return out


@dataclass(frozen=True)
class BaselineJob:
    """One model a baseline trains: the centralized one (``region`` None: on every region's train split, tested on
    every region) or ``region``'s local-only one (on its train split, tested on its test split)."""

    baseline: str  # keys.CENTRALIZED or keys.LOCAL_ONLY
    region: str | None = None

    @property
    def tag(self) -> str:
        """The tag its training seed is derived with (and its progress bar's name)."""
        return "centralized" if self.region is None else seed_tag(self.region)

    @property
    def label(self) -> str:
        """Its name in progress lines and errors."""
        return "centralized" if self.region is None else f"local-only {self.region}"

    def start_line(self, data: Mapping[str, RegionData]) -> str:
        """The progress line said when it starts."""
        if self.region is None:
            return f"centralized: training on the union of {len(self.train(data))} examples"
        return f"local-only: training {self.region} ({len(self.train(data))} examples)"

    def train(self, data: Mapping[str, RegionData]) -> list[Example]:
        """The examples it trains on."""
        if self.region is None:
            return [ex for region in data.values() for ex in region.train]
        return list(data[self.region].train)

    def tests(self, data: Mapping[str, RegionData]) -> Mapping[str, RegionData]:
        """The regions it is validated and tested on."""
        return data if self.region is None else {self.region: data[self.region]}

    def regions(self, data: Mapping[str, RegionData]) -> int:
        """How many regions' data it trains on (its training is matched to theirs in the run)."""
        return len(data) if self.region is None else 1

    def steps(self, cfg: RunConfig, data: Mapping[str, RegionData]) -> int:
        """How many optimizer steps it trains (its share of the baselines' work)."""
        return plan_steps(len(self.train(data)), matched_settings(cfg.train, cfg.rounds, self.regions(data)))


@dataclass(frozen=True)
class JobResult:
    """What a baseline job produced: test scores per region, wall-clock seconds, test predictions per region and,
    when asked for, the adapter state (best checkpoint) it would serve."""

    scores: Scores
    seconds: float
    predictions: dict[str, np.ndarray]
    adapter: dict[str, torch.Tensor] | None


def baseline_jobs(cfg: RunConfig, data: Mapping[str, RegionData]) -> list[BaselineJob]:
    """The jobs of the baselines ``cfg.baselines`` asks for: one centralized model, one local-only model per
    region."""
    jobs = [BaselineJob(keys.CENTRALIZED)] if keys.CENTRALIZED in cfg.baselines else []
    if keys.LOCAL_ONLY in cfg.baselines:
        jobs += [BaselineJob(keys.LOCAL_ONLY, name) for name in data]
    return jobs


def run_job(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    job: BaselineJob,
    keep_adapter: bool = False,
    on_step: Callable[[], None] | None = None,
) -> JobResult:
    """Train and test the model of ``job`` (``_train_and_test``); ``keep_adapter`` keeps its adapter state."""
    started = time.perf_counter()
    predictions: dict[str, np.ndarray] = {}
    adapters: dict[str, dict[str, torch.Tensor]] | None = {} if keep_adapter else None
    scores = _train_and_test(
        cfg, job.train(data), job.tests(data), job.tag, predictions, job.regions(data), adapters, on_step=on_step
    )
    adapter = adapters[job.region] if adapters is not None and job.region is not None else None
    return JobResult(scores, time.perf_counter() - started, predictions, adapter)


def run_centralized(cfg: RunConfig, data: Mapping[str, RegionData]) -> tuple[Scores, float]:
    """One model trained on the union of every region's train split; test scores per region and seconds."""
    result = run_job(cfg, data, BaselineJob(keys.CENTRALIZED))
    return result.scores, result.seconds


def run_local_only(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    log: Callable[[str], None] = print,
    predictions: dict[str, np.ndarray] | None = None,
    adapters: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[Scores, float]:
    """Each region trains alone on its own data (``client.local_only``, as a node would) and is tested on its own
    test split.

    ``predictions``, if given, receives each region's test predictions (for the paired A/B comparison);
    ``adapters`` each region's trained adapter state (for ``personalize.consider_local_only``, which may serve it).
    """
    scores: Scores = {}
    seconds = 0.0
    for name in data:
        job = BaselineJob(keys.LOCAL_ONLY, name)
        log(job.start_line(data))
        result = run_job(cfg, data, job, adapters is not None)
        _collect(result, name, scores, predictions, adapters)
        seconds += result.seconds
    return scores, seconds


def _collect(
    result: JobResult,
    region: str,
    scores: Scores,
    predictions: dict[str, np.ndarray] | None,
    adapters: dict[str, dict[str, torch.Tensor]] | None,
) -> None:
    scores.update(result.scores)
    if predictions is not None:
        predictions[region] = result.predictions[region]
    if adapters is not None and result.adapter is not None:
        adapters[region] = result.adapter


class BaselineFailed(FedlocaleError):
    """A baseline job failed in its process: the message names the job and the error; ``exit_code`` is the
    error's own when it was a FedlocaleError."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_baselines(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    say: Callable[[str], None] = print,
    predictions: dict[str, np.ndarray] | None = None,
    adapters: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, tuple[Scores, float]]:
    """The baselines ``cfg.baselines`` asks for: ``{baseline: (test scores per region, seconds)}``, the seconds
    being the sum of its jobs' wall-clock times; local-only's test predictions go into ``predictions`` and, if
    given, its adapters into ``adapters``.

    With ``simulation.baseline_processes`` above 1 the jobs (the centralized model, each local-only model) are
    shared out to that many processes, each with an even share of the cores as torch threads
    (``_run_side_by_side``); otherwise they run one after another in this process. A job's result does not depend
    on where it ran, except through the number of torch threads (the order of floating-point sums).
    """
    jobs = baseline_jobs(cfg, data)
    processes = min(cfg.simulation.baseline_processes, len(jobs))
    out: dict[str, tuple[Scores, float]] = {}
    if processes <= 1:
        if keys.CENTRALIZED in cfg.baselines:
            say(BaselineJob(keys.CENTRALIZED).start_line(data))
            out[keys.CENTRALIZED] = run_centralized(cfg, data)
        if keys.LOCAL_ONLY in cfg.baselines:
            out[keys.LOCAL_ONLY] = run_local_only(cfg, data, say, predictions, adapters)
        return out
    results = _run_side_by_side(cfg, data, jobs, processes, say, adapters is not None)
    for baseline in keys.BASELINES:
        if baseline not in cfg.baselines:
            continue
        scores: Scores = {}
        seconds = 0.0
        for job in jobs:  # in the regions' order, whatever order the jobs finished in
            if job.baseline != baseline:
                continue
            result = results[job]
            if job.region is None:
                scores.update(result.scores)
            else:
                _collect(result, job.region, scores, predictions, adapters)
            seconds += result.seconds
        out[baseline] = (scores, seconds)
    return out


def share_out(sizes: Sequence[int], processes: int) -> list[list[int]]:
    """Indices of ``sizes`` for each of ``processes`` workers, largest first to the least loaded worker (LPT:
    within 4/3 of the best split), so that the workers finish close together."""
    loads = [0] * processes
    shares: list[list[int]] = [[] for _ in range(processes)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        worker = min(range(processes), key=lambda w: (loads[w], w))
        shares[worker].append(index)
        loads[worker] += sizes[index]
    return [share for share in shares if share]


def _run_side_by_side(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    jobs: list[BaselineJob],
    processes: int,
    say: Callable[[str], None],
    keep_adapters: bool,
) -> dict[BaselineJob, JobResult]:
    """Run ``jobs`` in ``processes`` spawned processes, sharing them out by their steps (``share_out``). The
    processes report each step (one progress bar here), each job's start and its result through one queue; a job
    that fails, or a process that dies, stops the others and raises BaselineFailed."""
    from tqdm import tqdm

    sizes = [job.steps(cfg, data) for job in jobs]
    shares = share_out(sizes, processes)
    threads = max(1, (os.cpu_count() or 1) // len(shares))
    say(
        f"baselines: {len(jobs)} models ({', '.join(dict.fromkeys(j.baseline for j in jobs))}) in {len(shares)} "
        f"processes side by side, {threads} torch thread(s) each"
    )
    # spawn, not fork: this process has run Ray and holds torch's thread pools, which a fork would copy half-made
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    workers: list[Any] = []
    for share in shares:
        mine = [jobs[i] for i in share]
        needed = (
            data if any(job.region is None for job in mine) else {j.region: data[j.region] for j in mine if j.region}
        )
        workers.append(
            context.Process(
                target=_work,
                args=(cfg, needed, mine, keep_adapters, threads, events),
                name=f"{WORKER_NAME}-{len(workers) + 1}",
                daemon=True,
            )
        )
    results: dict[BaselineJob, JobResult] = {}
    try:
        for worker in workers:
            worker.start()
        # disable=None: a bar on a terminal, nothing in CI logs
        with tqdm(total=sum(sizes), desc="baselines", unit="step", disable=None, leave=False) as bar:
            checked = time.monotonic()
            while len(results) < len(jobs):
                # checked every second, not only when the queue is quiet: the other process's steps may never let
                # it be
                if time.monotonic() - checked >= 1.0:
                    _check_alive(workers, shares, jobs, results)
                    checked = time.monotonic()
                try:
                    event = events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if event[0] == "step":
                    bar.update(1)
                    continue
                bar.clear()
                if event[0] == "start":
                    say(event[1])
                elif event[0] == "done":
                    _, job, result, adapter = event
                    result = dataclasses.replace(result, adapter=_tensors(adapter))
                    results[job] = result
                    say(f"{job.label}: done in {result.seconds:.0f} s")
                else:  # "failed"
                    _, job, message, code = event
                    raise BaselineFailed(f"the {job.label} baseline failed: {message}", code)
                bar.refresh()
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return results


def _check_alive(
    workers: list[Any], shares: list[list[int]], jobs: list[BaselineJob], results: Mapping[BaselineJob, JobResult]
) -> None:
    for worker, share in zip(workers, shares, strict=True):
        left = [jobs[i].label for i in share if jobs[i] not in results]
        # a process ends by itself only after its last job, or after reporting a failure (read as an event);
        # an exit code other than 0 means it was killed or crashed
        if left and worker.exitcode not in (None, 0):
            raise BaselineFailed(
                f"the process training {', '.join(left)} ended with exit code {worker.exitcode} before finishing "
                "(out of memory? the system log may say)"
            )


def _work(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    jobs: list[BaselineJob],
    keep_adapters: bool,
    threads: int,
    events: Any,
) -> None:
    """A side-by-side process: run ``jobs`` one after another, reporting through ``events``."""
    # Ctrl-C reaches the whole process group: the parent stops this process, which need not print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    for job in jobs:
        events.put(("start", job.start_line(data)))
        try:
            result = run_job(cfg, data, job, keep_adapters, on_step=lambda: events.put(("step",)))
        except Exception as err:  # the parent stops the other processes and raises it as BaselineFailed
            code = err.exit_code if isinstance(err, FedlocaleError) else EXIT_FAILED
            events.put(("failed", job, f"{type(err).__name__}: {err}", code))
            return
        # tensors sent through a queue travel as shared-memory handles that must outlive the sender; numpy copies
        # do not: the adapter crosses as numpy, beside the result
        adapter = {k: v.numpy() for k, v in result.adapter.items()} if result.adapter is not None else None
        events.put(("done", job, dataclasses.replace(result, adapter=None), adapter))


def _tensors(adapter: Mapping[str, np.ndarray] | None) -> dict[str, torch.Tensor] | None:
    return {k: torch.from_numpy(v) for k, v in adapter.items()} if adapter is not None else None
