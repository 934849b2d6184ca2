"""``fedlocale audit verify`` and ``fedlocale audit report``: check signed ledgers offline, and explain them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.audit import (
    SERVER,
    AuditKeyError,
    Verification,
    collect_ledgers,
    key_id,
    load_verify_key,
    read_keys_file,
    verify_all,
)
from common.errors import InputError

EXIT_BROKEN = 1
UPDATES_NEXT_TO_SERVER = "updates"  # a run folder's layout: audit/server/ledger.jsonl beside audit/updates/


def add_parsers(sub: Any) -> None:
    """Add the ``audit`` command and its ``verify`` and ``report`` actions to the CLI's subparsers."""
    audit = sub.add_parser("audit", help="verify signed egress ledgers offline; write an auditor's report")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="check chains, signatures, and that the server used only what the nodes recorded sending (says what it "
        "could not check)",
        description="Checks every LEDGER (a ledger.jsonl, or a folder searched for them): each entry follows the "
        "previous one and is signed by the key trusted for its signer; every update the server aggregated appears "
        "in exactly one node's ledger with the same hash; with kept updates (audit.keep_updates), each round's "
        "global adapter is recomputed and compared. Prints each claim only for a check that ran, and "
        "'not checked:' for one that could not (no server ledger, no kept updates). A ledger named twice is "
        "checked once. Exit 0 only if all that was checked holds, 1 naming the first broken entry of "
        "each ledger otherwise, 2 on unusable input. Trust comes only from the keys you give: use copies of the "
        "nodes' and the server's ledger.pub obtained from their operators, not ones found next to the ledgers.",
    )
    report = actions.add_parser(
        "report",
        help="verify, then write a Markdown report per region with plots of what left and when",
        description="Runs the same checks as `audit verify`, then writes OUT/audit-report.md and one plot per "
        "region. Exit codes as for verify; the report is written either way and says what failed.",
    )
    policy = actions.add_parser(
        "policy",
        help="check policy files and print the hash each ledger entry records for them",
        description="Validates each policy FILE (every problem with file:line) and prints its region and the "
        "SHA-256 of its content, the value node ledgers carry in their 'policy' field. Exit 2 on a bad file.",
    )
    policy.add_argument("files", type=Path, nargs="+", metavar="FILE", help="region policy YAML files")
    privacy = actions.add_parser(
        "privacy",
        help="membership-inference audit per region of a finished run: AUC and TPR at low FPR of each model",
        description="For each region, attacks the final global adapter, the model the region serves and (with "
        "audit.keep_updates) its own last update: how well a loss-threshold attack and a reference attack "
        "(calibrated against earlier rounds' global adapters) tell the region's training records from its test "
        "records. Writes the 'privacy' section of summary.json and RUN_DIR/audit/privacy-report.md with a log-log "
        "ROC plot per region. Only aggregate numbers are written. Exit 2 when RUN_DIR is not a finished run with "
        "at least two rounds kept in checkpoints/, or a --region is not in it.",
    )
    privacy.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    privacy.add_argument(
        "--region",
        dest="regions",
        action="append",
        default=[],
        metavar="R",
        help="audit only this region (repeatable; default every region)",
    )
    privacy.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples of each AUC (default 1000)"
    )
    privacy.add_argument(
        "--references",
        type=int,
        default=None,
        metavar="N",
        help="reference models: the global adapters of the N rounds just before the delivered one (default: the "
        "run's audit.references, 2); each costs one pass over the audited records",
    )
    node = actions.add_parser(
        "node",
        help="on a region's node: membership-inference audit of the adapters the node holds, against its own data",
        description="Run on a deployed region's node. Audits the global adapter the run delivered and the model the "
        "node serves (its personalized adapter when its personalization chose it) against the node's own records: "
        "its training records as the node trained on them (members) and its test split (non-members). References "
        "are the earlier rounds' global adapters the node kept (node config keep-globals), else the run's initial "
        "adapter rebuilt from its seed. Writes only aggregate numbers (AUC with a bootstrap interval, TPR at 1 %% "
        "and 0.1 %% FPR, per model and attack) to OUT/node-privacy.json and OUT/node-privacy.md; nothing about an "
        "individual record. Exit 2 on a missing setting, data folder, test split or kept adapter, or an earlier "
        "report in OUT without --overwrite.",
    )
    node.add_argument(
        "--node-config",
        required=True,
        metavar="CONFIG",
        help="the node's --node-config string, as its SuperNode runs with it (`fedlocale deploy plan` prints it): "
        'region="…" data-dir="…" keep-globals="…" and, if set, policy, personal-dir, personalize, threads',
    )
    node.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder on the node for the report")
    node.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    node.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples of each AUC (default 1000)"
    )
    for action in (verify, report):
        action.add_argument("ledgers", type=Path, nargs="+", metavar="LEDGER", help="ledger files or folders")
        action.add_argument(
            "--key",
            dest="keys",
            action="append",
            default=[],
            metavar="NAME=FILE",
            help="trust FILE (PEM Ed25519 public key) for signer NAME (a region or 'server'); repeatable",
        )
        action.add_argument(
            "--keys", dest="keys_file", type=Path, metavar="FILE", help="YAML file: signer name → public key file"
        )
        action.add_argument(
            "--updates",
            type=Path,
            metavar="DIR",
            help="kept updates to recompute each round from (default: 'updates' beside the server ledger's folder)",
        )
    report.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the report (new or existing; only audit-report.md and audit-bytes-*.png are written there)",
    )
    report.add_argument(
        "--overwrite", action="store_true", help="replace an earlier audit report (and its plots) in --out"
    )


def trusted_keys(pairs: Sequence[str], keys_file: Path | None) -> dict[str, Any]:
    """Signer name → public key, from ``--keys`` then ``--key`` (which wins)."""
    files = read_keys_file(keys_file) if keys_file else {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise AuditKeyError(f"--key {pair!r}: expected NAME=FILE")
        files[name] = Path(file)
    if not files:
        raise AuditKeyError("no trusted keys: give --key NAME=FILE or --keys FILE")
    return {name: load_verify_key(path) for name, path in files.items()}


def _updates_dir(args: argparse.Namespace, ledgers: Sequence[Path]) -> Path | None:
    if args.updates is not None:
        return args.updates  # type: ignore[no-any-return]
    for path in ledgers:
        candidate = path.parent.parent / UPDATES_NEXT_TO_SERVER
        if path.parent.name == SERVER and candidate.is_dir():
            return candidate
    return None


def run_checks(args: argparse.Namespace) -> Verification:
    """Verify the ledgers named on the command line (raises an InputError on unusable keys, paths or updates)."""
    from server.audit import recompute

    trusted = trusted_keys(args.keys, args.keys_file)
    ledgers, notes = collect_ledgers(args.ledgers)
    updates = _updates_dir(args, ledgers)
    print(f"trusted keys: {', '.join(f'{n} ({key_id(k)})' for n, k in sorted(trusted.items()))}")
    for note in notes:
        print(f"note: {note}")
    return verify_all(ledgers, trusted, (lambda server: recompute(server, updates)) if updates else None)


def _print(result: Verification) -> None:
    """Each ledger's state, then only claims for checks that ran, and what was not checked and why."""
    for check in result.checks:
        mark = "ok    " if check.ok else "BROKEN"
        print(f"{mark} {check.signer or '?':<16} {len(check.entries):>5} entries  {check.path}")
    if result.ok:
        print("verified:")
        for claim in result.checked:
            print(f"  - {claim}")
    for what in result.not_checked:
        print(f"not checked: {what}")
    if result.ok:
        return
    print(f"fedlocale: NOT verified: {len(result.findings)} problem(s)", file=sys.stderr)
    for finding in result.findings:
        print(f"  {finding}", file=sys.stderr)


def cmd_policy(files: Sequence[Path]) -> int:
    """Print each policy's region and content hash; a bad file raises ConfigError (exit 2, every problem)."""
    from common.errors import ConfigError
    from common.policy import load_policy

    problems: list[str] = []
    for path in files:
        try:
            policy = load_policy(path)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        print(f"{policy.digest()}  {policy.region:<16} {path}")
    if problems:
        raise ConfigError(problems)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Verify (and with ``report``, describe) ledgers; exit 0 only when everything holds."""
    if args.audit_command == "policy":
        return cmd_policy(args.files)
    if args.audit_command == "privacy":
        return cmd_privacy(args.run_dir, args.regions, args.bootstrap, args.references)
    if args.audit_command == "node":
        return cmd_node_audit(args.node_config, args.out, args.overwrite, args.bootstrap)
    if args.audit_command == "report":
        check_report_out(args.out, args.overwrite)
    result = run_checks(args)
    _print(result)
    if args.audit_command == "report":
        from runfolder.audit_report import write_audit_report

        path = write_audit_report(list(result.checks), args.out, list(result.findings), list(result.not_checked))
        print(f"report: {path}")
    return 0 if result.ok else EXIT_BROKEN


def check_report_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``audit report --out`` that is a file, or a folder holding an earlier report (which the user
    may have annotated), unless ``overwrite``; checked before the ledgers are read."""
    from common.runfiles import AUDIT_PLOT, AUDIT_REPORT_FILE

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; audit report writes a folder ({AUDIT_REPORT_FILE} and plots)")
    earlier = sorted(out.glob(AUDIT_REPORT_FILE)) + sorted(out.glob(AUDIT_PLOT.format("*")))
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise InputError(f"--out {out} holds an earlier audit report ({names}); pass --overwrite to replace it")


def cmd_privacy(run_dir: Path, regions: Sequence[str], bootstrap: int, references: int | None = None) -> int:
    """Run the membership-inference audit, then write summary.json's privacy section and the privacy report."""
    from common.runfiles import read_summary, write_summary
    from runfolder.privacy import audit_privacy, with_privacy, write_privacy_report

    if bootstrap < 100:
        raise InputError(f"--bootstrap {bootstrap}: must be >= 100 for a 95 % interval")
    if references is not None and references < 1:
        raise InputError(f"--references {references}: must be >= 1 (the reference attack needs a reference model)")
    audit = audit_privacy(run_dir, regions, bootstrap=bootstrap, reference_count=references)
    write_summary(run_dir, with_privacy(read_summary(run_dir), audit))
    print(f"report: {write_privacy_report(run_dir, audit)}")
    return 0


def cmd_node_audit(node_config: str, out: Path, overwrite: bool, bootstrap: int) -> int:
    """``fedlocale audit node``: the node's own privacy audit, written to OUT (aggregate numbers only)."""
    import click
    from flwr.common.config import parse_config_args

    from client.node_audit import audit_node, check_out, write_node_report
    from client.task import node_settings, resolve_region
    from common import keys

    if bootstrap < 100:
        raise InputError(f"--bootstrap {bootstrap}: must be >= 100 for a 95 % interval")
    try:
        config = parse_config_args([node_config])
    except click.ClickException as err:
        raise InputError(f"--node-config {node_config!r}: {err.format_message()}") from err
    if keys.NODE_REGION not in config or keys.NODE_DATA_DIR not in config:
        raise InputError(f"--node-config needs {keys.NODE_REGION}='…' and {keys.NODE_DATA_DIR}='…', got {config}")
    region = resolve_region(config, {})
    node = node_settings(config)
    check_out(out, overwrite)  # before the models load: an earlier report is refused at once
    audit = audit_node(region, node, bootstrap=bootstrap)
    json_path, md_path = write_node_report(out, audit, overwrite=overwrite)
    print(f"report: {md_path} and {json_path} (aggregate numbers only)")
    return 0
