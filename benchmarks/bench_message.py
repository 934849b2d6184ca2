"""Cost of one message on a region node, paid the way a deployment pays it: a fresh process per message.

    python -m benchmarks.bench_message [--model minilm|tiny] [--region DIR] [--repeats N] [--json PATH]

Flower 1.42's ``flower-supernode`` starts a new ``flwr-clientapp`` process for every train or evaluate message.
This runs one train and one evaluate message for one region, each in a fresh ``python`` process that imports
what ``flwr-clientapp`` imports and calls the real ClientApp handler; the child times its phases with
``time.perf_counter`` and reports them as JSON on stdout. Scenarios: token cache off / cold (empty) / warm (filled
by the cold run), each with torch threads left at the default and with the node config ``threads=1``; and once
with the ClientApp's ``gc.freeze`` calls disabled, to measure the process as it was before.

Phases (exclusive, seconds): interpreter start, imports of flwr / torch / transformers / peft / ours, data load,
PII redaction (with a region policy), tokenisation (with the cache's fingerprint and lookup), tokenizer load,
model build (from_pretrained + LoRA + received adapter), the train or evaluate work, other (message parsing, the
guard, reply); then ``to_reply`` (launch until
the reply is ready), the process exit after it, and the total wall time. Ratios are paired within each repeat
(scenarios run interleaved, every other repeat in reverse), so a change in the machine's load cancels out.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.output import write_result

_STARTED = time.monotonic()  # the child's first moment after the standard library: end of interpreter start
LAUNCHED_ENV = "FEDLOCALE_BENCH_LAUNCHED"
RESULT_PREFIX = "BENCH_RESULT "
DEFAULT_JSON = Path("benchmarks/results/bench_message.json")
DEFAULT_REGION = Path("data/demo/en-movies")
TREE = Path(__file__).resolve().parents[1]  # the checkout this bench belongs to
DEFAULT_TREES_JSON = Path("benchmarks/results/bench_message-before-after.json")

# What flwr-clientapp imports, in its order: Flower's runtime first, then the app module and what it pulls in.
IMPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flwr", ("flwr.app", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")),
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("peft", ("peft",)),
    ("ours", ("client.app",)),
)
# Phase -> functions whose time it takes, as looked up by name in the node's modules (NODE_MODULES).
PHASES: dict[str, tuple[str, ...]] = {
    "data": ("load_region",),
    "redact": ("redact_region",),
    "tokenise": ("encode_split",),
    "model": ("build_model", "load_adapter_state"),
    "work": ("train_encoded", "evaluate_encoded"),
    "personalize": ("personalize_node",),  # the test message's own personalization (its loads and builds apart)
}
OPTIONAL_PHASES = ("redact", "personalize")  # without a policy / a personalizing node these do not run
NODE_MODULES = ("client.app", "client.task", "client.pipeline")
COLUMNS = (
    "interpreter",
    *(name for name, _ in IMPORTS),
    "data",
    "redact",
    "tokenise",
    "tokenizer_load",
    "model",
    "work",
    "personalize",
    "other",
    "to_reply",
    "exit",
    "total",
)
STARTUP = ("interpreter", *(name for name, _ in IMPORTS))
MESSAGES = ("train", "evaluate")


@dataclass(frozen=True)
class Scenario:
    """One node setup: token cache off / cold / warm, torch threads, and whether the ClientApp's gc.freeze (after
    the imports and at exit) runs (False measures the process as it was before)."""

    cache: str
    threads: int | None
    gc_freeze: bool = True

    @property
    def name(self) -> str:
        """``cache/threads``, plus ``/no-freeze`` when the ClientApp's gc.freeze is disabled."""
        return f"{self.cache}/{'default' if self.threads is None else self.threads}" + (
            "" if self.gc_freeze else "/no-freeze"
        )


# Threads default and 1 side by side, so that a change in the machine's load hits both alike.
SCENARIOS = (
    Scenario("off", None),
    Scenario("off", 1),
    Scenario("cold", None),
    Scenario("cold", 1),
    Scenario("warm", None),
    Scenario("warm", 1),
    Scenario("off", 1, gc_freeze=False),
)


# ---------------------------------------------------------------------------------------------------------
# Child: one message in this fresh process


class PhaseClock:
    """Exclusive time per phase: a timed call inside another is taken out of the outer one's time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[float] = []  # time spent in nested phases, one slot per open phase

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its time charged to ``phase``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._stack.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - nested
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


def _import_phases() -> dict[str, float]:
    out = {}
    for phase, modules in IMPORTS:
        start = time.perf_counter()
        for module in modules:
            importlib.import_module(module)
        out[phase] = time.perf_counter() - start
    return out


def _instrument(clock: PhaseClock) -> dict[str, list[str]]:
    """Charge the node's steps (and the tokenizer load inside the model build) to their phases; return where
    each phase's functions were found.

    A function is wrapped in every node module that looks it up (``NODE_MODULES``: ``client.pipeline`` holds
    the data pipeline since it became its own module), so that the same bench times a checkout from before
    that change (``--baseline-tree``); a call goes through one module's name, so nothing is counted twice.
    """
    import importlib.util

    import transformers

    modules = [importlib.import_module(m) for m in NODE_MODULES if importlib.util.find_spec(m) is not None]
    found: dict[str, list[str]] = {}
    for phase, names in PHASES.items():
        for name in names:
            for module in modules:
                if callable(getattr(module, name, None)):
                    setattr(module, name, clock.wrap(phase, getattr(module, name)))
                    found.setdefault(phase, []).append(f"{module.__name__}.{name}")
    auto = transformers.AutoTokenizer
    auto.from_pretrained = staticmethod(clock.wrap("tokenizer_load", auto.from_pretrained))  # type: ignore[method-assign]
    return found


def _message(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The instruction as the SuperNode hands it over, and the node's context."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common import keys

    # flwr-clientapp sets the task identity before any message exists (flwr/supernode/runtime/run_clientapp.py)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    state = torch.load(spec["state"], weights_only=True)
    config = ConfigRecord({keys.TASK: spec["task"], keys.SPLIT: spec["split"]})
    kind = MessageType.TRAIN if spec["message"] == "train" else MessageType.EVALUATE
    msg = Message(RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config}), dst_node_id=2, message_type=kind)
    return msg, Context(run_id=1, node_id=2, node_config=spec["node_config"], state=RecordDict(), run_config={})


def _reply_summary(reply: Any) -> dict[str, Any]:
    """The reply's metrics and a hash of its arrays: equal hashes mean bit-identical adapters."""
    import hashlib

    from common import keys

    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error}")
    metrics = dict(reply.content.metric_records[keys.METRICS])
    digest = hashlib.sha256()
    for name, array in sorted(reply.content.array_records.get(keys.ARRAYS, {}).items()):
        digest.update(name.encode() + array.numpy().tobytes())
    return {"metrics": metrics, "arrays_sha256": digest.hexdigest() if reply.content.array_records else None}


class GcClock:
    """Seconds the cyclic garbage collector ran, from its start/stop callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


def _no_freeze() -> None:
    """Stands in for gc.freeze to measure the process as it was before the ClientApp called it."""


def run_child(spec_path: Path) -> dict[str, Any]:
    """Handle one message in this process; the phases in seconds plus what the reply said."""
    launched = float(os.environ[LAUNCHED_ENV])
    phases: dict[str, Any] = {"interpreter": _STARTED - launched}
    spec = json.loads(spec_path.read_text())
    if not spec["gc_freeze"]:
        gc.freeze = _no_freeze  # before client.app is imported: it then neither freezes nor registers a freeze
    phases.update(_import_phases())
    msg, context = _message(spec)
    clock, gc_clock = PhaseClock(), GcClock()
    instrumented = _instrument(clock)
    from client.app import make_app

    app = make_app()
    gc.callbacks.append(gc_clock)
    start = time.perf_counter()
    reply = app(msg, context)
    handler = time.perf_counter() - start
    gc.callbacks.remove(gc_clock)
    missing = [p for p in PHASES if p not in clock.seconds and p not in OPTIONAL_PHASES]
    if missing:
        raise RuntimeError(f"phase(s) {missing} never ran: the node no longer calls {[PHASES[p] for p in missing]}")
    phases.update(clock.seconds)
    for phase in OPTIONAL_PHASES:
        phases.setdefault(phase, 0.0)
    phases["other"] = handler - sum(clock.seconds.values())
    import torch

    return {
        "phases": phases,
        "calls": clock.calls,  # per phase: how often its functions ran for this one message
        "instrumented": instrumented,
        "gc_in_handler_s": gc_clock.seconds,
        "objects_tracked_by_gc": len(gc.get_objects()),
        "modules": len(sys.modules),
        "elapsed_since_launch": time.monotonic() - launched,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **_reply_summary(reply),
    }


# ---------------------------------------------------------------------------------------------------------
# Parent: prepare, launch, collect


def _prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The task JSON and the global adapter file the children read, and what was measured on."""
    from common import keys
    from common.config import ClientTask, ModelSettings, load_config
    from common.data import find_split
    from common.model import adapter_state, build_model

    region = args.region.resolve()
    if find_split(region, keys.TRAIN) is None:
        hint = " (build the demo data: .venv/bin/fedlocale data demo data/demo)" if "demo" in str(region) else ""
        raise SystemExit(f"no region data in {region}{hint}")
    cfg = load_config(args.config, regions_dir=region.parent)
    base = str(_tiny_model(work)) if args.model == "tiny" else "minilm"
    task = ClientTask(
        seed=cfg.seed,
        server_round=1,
        labels=cfg.labels,
        region_names=(region.name,),
        model=ModelSettings(base=base, max_length=cfg.model.max_length),
        lora=cfg.lora,
        train=cfg.train,
    )
    import torch

    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    torch.save(state, work / "state.pt")
    return {"region": str(region), "task": task.to_json(), "state": str(work / "state.pt")}


def _tiny_model(work: Path) -> Path:
    from assets.tiny import make_tiny_model

    return make_tiny_model(work / "tiny-bert", "bert")


def launch(spec: dict[str, Any], work: Path, tree: Path = TREE) -> dict[str, Any]:
    """Run one message in a fresh process on the checkout ``tree`` (its packages first on the path, its folder
    the working folder); its phases, plus exit and total as seen from here. The child is this file run as a
    script, so a checkout without this bench (or with an older one) is timed by the same code."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(tree), LAUNCHED_ENV: repr(time.monotonic())}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    to_reply = result.pop("elapsed_since_launch")  # the reply is pushed here; the process still has to exit
    result["phases"].update(to_reply=to_reply, exit=max(0.0, wall - to_reply), total=wall)
    return result


def run_all(args: argparse.Namespace, work: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every scenario and message, ``args.repeats`` times; cold runs get an empty cache, warm runs its filling."""
    prepared = _prepare(args, work)
    region = Path(prepared["region"])
    runs = []
    for repeat in range(args.repeats):
        # every other repeat in reverse order, so that a drift in the machine's load does not favour one side
        order = SCENARIOS if repeat % 2 == 0 else _reversed_keeping_cold_before_warm()
        for scenario in order:
            node: dict[str, Any] = {"region": region.name, "data-dir": str(region)}
            if scenario.cache != "off":
                node["cache-dir"] = str(work / f"cache-{repeat}-{scenario.threads}")
            if scenario.threads is not None:
                node["threads"] = scenario.threads
            for message in MESSAGES:
                spec = {**prepared, "message": message, "split": args.split, "node_config": node}
                result = launch({**spec, "gc_freeze": scenario.gc_freeze}, work)
                runs.append({"repeat": repeat, "scenario": scenario.name, "message": message, **result})
                say(f"repeat {repeat + 1}/{args.repeats} {scenario.name} {message}: {result['phases']['total']:.1f} s")
    return runs


# Messages of the before/after comparison: a train message, a validation evaluation, and the test evaluation
# on which a personalizing node personalizes (mode probe: one forward pass, no epochs of SGD).
TREE_MESSAGES = (("train", "train", None), ("evaluate", "val", None), ("evaluate", "test", "probe"))


def run_trees(
    args: argparse.Namespace, work: Path, trees: dict[str, Path], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Each message of ``TREE_MESSAGES`` on each checkout in ``trees``, ``args.repeats`` times, the checkouts
    alternating within each message (every other repeat in reverse), on one node setup: cache off, threads 1,
    a region policy (so that PII redaction runs), and personalization on the test message."""
    prepared = _prepare(args, work)
    region = Path(prepared["region"])
    policy, personalize = work / "policy.yaml", work / "personalize.yaml"
    policy.write_text(f"region: {region.name}\n")
    personalize.write_text("mode: probe\n")
    runs = []
    for repeat in range(args.repeats):
        order = list(trees.items()) if repeat % 2 == 0 else list(reversed(trees.items()))
        for message, split, mode in TREE_MESSAGES:
            for name, tree in order:
                node: dict[str, Any] = {
                    "region": region.name,
                    "data-dir": str(region),
                    "threads": 1,
                    "policy": str(policy),
                }
                if mode is not None:
                    node.update({"personalize": str(personalize), "personal-dir": str(work / f"own-{name}")})
                spec = {**prepared, "message": message, "split": split, "node_config": node, "gc_freeze": True}
                result = launch(spec, work, tree)
                label = f"{message}/{split}" + ("+personalize" if mode else "")
                runs.append({"repeat": repeat, "tree": name, "path": str(tree), "message": label, **result})
                say(f"repeat {repeat + 1}/{args.repeats} {name} {label}: {result['phases']['total']:.1f} s")
    return runs


def summarise_trees(runs: list[dict[str, Any]], trees: dict[str, Path]) -> dict[str, Any]:
    """Median phases and calls per checkout and message; per message the ratio of each phase, later checkout
    over the first, paired within each repeat; and whether both replied the same."""
    first, *_, last = trees
    median: dict[str, dict[str, float]] = {}
    calls: dict[str, dict[str, float]] = {}
    messages = list(dict.fromkeys(r["message"] for r in runs))
    for message in messages:
        for tree in trees:
            rs = [r for r in runs if r["message"] == message and r["tree"] == tree]
            median[f"{tree}/{message}"] = {c: statistics.median(r["phases"].get(c, 0.0) for r in rs) for c in COLUMNS}
            names = sorted({k for r in rs for k in r["calls"]})
            calls[f"{tree}/{message}"] = {k: statistics.median(r["calls"].get(k, 0) for r in rs) for k in names}
    ratios: dict[str, float] = {}
    same: dict[str, bool] = {}
    for message in messages:
        cell = {(r["repeat"], r["tree"]): r for r in runs if r["message"] == message}
        repeats = sorted({r["repeat"] for r in runs})
        for column in ("data", "redact", "model", "other", "to_reply", "total"):
            pairs = [(cell[(i, last)]["phases"][column], cell[(i, first)]["phases"][column]) for i in repeats]
            if all(b > 0 for _, b in pairs):
                ratios[f"{message}: {column} {last} / {first}"] = statistics.median(a / b for a, b in pairs)
        same[message] = len({_outcome(r) for r in runs if r["message"] == message}) == 1
    return {"median_s": median, "calls_median": calls, "ratios": ratios, "identical_replies": same}


def print_trees(summary: dict[str, Any]) -> None:
    """Median seconds per phase and calls of the data, redaction and model steps, per checkout and message."""
    short = {"interpreter": "interp", "transformers": "transf", "tokenizer_load": "tok-load", "personalize": "pers"}
    print(f"{'tree/message':<34}" + "".join(f"{short.get(c, c):>9}" for c in COLUMNS) + "   calls data/redact/model")
    for key, row in summary["median_s"].items():
        n = summary["calls_median"][key]
        counts = "/".join(f"{n.get(p, 0):g}" for p in ("data", "redact", "model"))
        print(f"{key:<34}" + "".join(f"{row[c]:>9.3f}" for c in COLUMNS) + f"   {counts}")
    print()
    for name, value in summary["ratios"].items():
        print(f"{name:<64}{value:>8.3f}")
    for name, same in summary["identical_replies"].items():
        print(f"{'identical replies, ' + name:<64}{'yes' if same else 'NO':>8}")


def _reversed_keeping_cold_before_warm() -> list[Scenario]:
    warm = [s for s in reversed(SCENARIOS) if s.cache == "warm"]
    rest = [s for s in reversed(SCENARIOS) if s.cache != "warm"]
    cut = max(i for i, s in enumerate(rest) if s.cache == "cold") + 1
    return rest[:cut] + warm + rest[cut:]


# ---------------------------------------------------------------------------------------------------------
# Summary


def _outcome(run: dict[str, Any]) -> str:
    return json.dumps([run["metrics"], run["arrays_sha256"]], sort_keys=True)


def _paired(runs: list[dict[str, Any]], message: str, a: str, b: str, column: str) -> float:
    """Median over repeats of ``a ÷ b`` for one column, each ratio taken within one repeat."""
    cell = {(r["repeat"], r["scenario"]): r["phases"] for r in runs if r["message"] == message}
    repeats = sorted({r["repeat"] for r in runs})
    return statistics.median(cell[(i, a)][column] / cell[(i, b)][column] for i in repeats)


def _startup(phases: dict[str, float]) -> float:
    return sum(phases[c] for c in STARTUP)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median phases per scenario and message, ratios paired within each repeat, and result identity."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{run['scenario']}/{run['message']}", []).append(run)
    median = {
        key: {col: statistics.median(r["phases"].get(col, 0.0) for r in rs) for col in COLUMNS}
        for key, rs in groups.items()
    }
    ratios: dict[str, float] = {}
    for message in MESSAGES:
        for threads in ("default", "1"):
            for column in ("tokenise", "to_reply"):
                ratios[f"{message}, threads {threads}: {column} warm / off"] = _paired(
                    runs, message, f"warm/{threads}", f"off/{threads}", column
                )
        for column in ("work", "model", "to_reply"):
            ratios[f"{message}, cache off: {column} threads 1 / default"] = _paired(
                runs, message, "off/1", "off/default", column
            )
        for column in ("work", "to_reply", "exit", "total"):
            ratios[f"{message}, cache off, threads 1: {column} with / without gc.freeze"] = _paired(
                runs, message, "off/1", "off/1/no-freeze", column
            )
        row = median[f"off/default/{message}"]
        ratios[f"{message}, cache off, threads default: start-up / to_reply"] = _startup(row) / row["to_reply"]
    identical = {}
    for message in MESSAGES:
        for threads in ("default", "1"):
            outcomes = {_outcome(r) for r in runs if r["message"] == message and r["scenario"].split("/")[1] == threads}
            identical[f"{message}, threads {threads}"] = len(outcomes) == 1
    gc_s = {key: statistics.median(r["gc_in_handler_s"] for r in rs) for key, rs in groups.items()}
    return {
        "median_s": median,
        "ratios": ratios,
        "results_identical_across_cache_modes": identical,
        "gc_in_handler_median_s": gc_s,
    }


def print_table(summary: dict[str, Any]) -> None:
    """Median seconds per phase, one row per scenario and message, then the ratios."""
    short = {"interpreter": "interp", "transformers": "transf", "tokenizer_load": "tok-load"}
    print(f"{'cache/threads':<22}{'message':<9}" + "".join(f"{short.get(c, c):>9}" for c in COLUMNS))
    for key, row in summary["median_s"].items():
        scenario, message = key.rsplit("/", 1)
        print(f"{scenario:<22}{message:<9}" + "".join(f"{row[c]:>9.3f}" for c in COLUMNS))
    print()
    for name, value in summary["ratios"].items():
        print(f"{name:<64}{value:>8.3f}")
    for name, same in summary["results_identical_across_cache_modes"].items():
        print(f"{'identical replies off / cold / warm, ' + name:<64}{'yes' if same else 'NO':>8}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-message-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_message", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--region", type=Path, default=DEFAULT_REGION, help="a region folder (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="train/LoRA settings from here")
    parser.add_argument("--split", default="val", help="split the evaluate message scores (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"default {DEFAULT_JSON} ({DEFAULT_TREES_JSON.name} with --baseline-tree)",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help="also time the checkout DIR (e.g. one from before a change) in the same run: per repeat, each message "
        "on DIR and on this checkout back to back (cache off, threads 1, a region policy, personalization on the "
        "test message) instead of the cache/threads scenarios",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(RESULT_PREFIX + json.dumps(run_child(args.child)), flush=True)
        return 0
    from deploy.env import apply_env

    apply_env()  # the children inherit it, as flwr-clientapp inherits the SuperNode's environment
    load_before = os.getloadavg()
    trees = {"before": args.baseline_tree.resolve(), "after": TREE} if args.baseline_tree else None
    with _workdir() as work:
        runs = run_trees(args, work, trees, _say) if trees else run_all(args, work, _say)
    summary = summarise_trees(runs, trees) if trees else summarise(runs)
    (print_trees if trees else print_table)(summary)
    args.json = args.json or (DEFAULT_TREES_JSON if trees else DEFAULT_JSON)
    out = {
        **({"trees": {k: str(v) for k, v in trees.items()}} if trees else {}),
        "model": args.model,
        "region": str(args.region),
        "split": args.split,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        **summary,
        "runs": runs,
    }
    return write_result(args.json, out)


if __name__ == "__main__":
    sys.exit(main())
