"""``fedlocale simulate``: the Flower simulation in process, one SuperNode per region, plus the baselines.

Writes into the run folder: summary.json, metrics.jsonl, federation.json, report.md with plots, adapter/ and
checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from client.pipeline import node_data
from common import keys
from common.audit import SERVER, load_verify_key, verify_all
from common.config import RunConfig
from common.data import RegionData
from common.errors import ConfigError
from common.metrics import confusion
from common.policy import RegionPolicy, load_policy
from common.runfiles import (
    AUDIT_DIR,
    CONFIG_FILE,
    FEDERATION_FILE,
    KEYS_FILE,
    LABEL_MIX_FILE,
    LEDGER_FILE,
    NODES_DIR,
    PUBLIC_KEY_FILE,
    SERVER_DIR,
    SERVER_ERROR_FILE,
    SIMULATED_CACHE_DIR,
    SIMULATED_PERSONAL_DIR,
    UPDATES_DIR,
    Summary,
    check_run_dir,
    clear_run_dir,
    write_atomic,
    write_summary,
)
from deploy.env import apply_env
from runfolder.summary import build_summary, read_metrics, with_personalized, with_served_vs_local_only
from simulations.baselines import run_baselines
from simulations.datasplit import run_label_mix
from simulations.personalize import global_pass, global_vs_local_only, personalize_run

if TYPE_CHECKING:
    import torch

    from client.task import Personal

log = logging.getLogger("fedlocale")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        # absolute: the saved config is read back from the run folder (`fedlocale personalize RUN_DIR`), where
        # a path relative to where the run was started would name nothing
        return str(value.absolute())
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (absolute paths), for provenance and to be loaded again."""
    return _jsonable(dataclasses.asdict(cfg))  # type: ignore[no-any-return]


def load_policies(cfg: RunConfig) -> dict[str, RegionPolicy]:
    """Every simulated node's policy, read up front: all problems of all files in one ConfigError."""
    policies: dict[str, RegionPolicy] = {}
    problems: list[str] = []
    for region in cfg.regions:
        if region.policy is None:
            continue
        try:
            policies[region.name] = load_policy(region.policy)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        if policies[region.name].region != region.name:
            problems.append(f"{region.policy}: region: is {policies[region.name].region!r}, used for {region.name!r}")
    if problems:
        raise ConfigError(problems, "region policies")
    return policies


def load_all(
    cfg: RunConfig,
    say: Callable[[str], None],
    policies: Mapping[str, RegionPolicy] | None = None,
    loaded: Mapping[str, RegionData] | None = None,
) -> dict[str, RegionData]:
    """Load every region up front so bad data or a bad policy fails before any process starts, through the
    node's own pipeline (``client.pipeline.node_data``): with a policy, the data the baselines use is redacted
    as the region's node redacts it. Not augmented: the baselines train on the regions' real examples.
    ``policies`` and ``loaded`` (the regions as already read and checked) spare parsing and reading again."""
    policies = load_policies(cfg) if policies is None else policies
    return {
        region.name: node_data(
            region.name,
            region.data,
            cfg.labels,
            policies.get(region.name),
            seed=cfg.seed,
            settings=cfg.data,
            say=say,
            loaded=loaded.get(region.name) if loaded is not None else None,
        ).data
        for region in cfg.regions
    }


def personal_lora(cfg: RunConfig, out_dir: Path) -> Personal | None:
    """Where and how the simulated nodes train their personal LoRA in the rounds (personalize mode dual),
    or None."""
    if cfg.personalize.mode != "dual":
        return None
    from client.task import Personal  # torch and transformers load with it: only when a run needs them

    apart = cfg.personalize.dual_train == "apart"
    return Personal(out_dir / SIMULATED_PERSONAL_DIR, cfg.personalize.local_r, apart)


def run_flower(
    cfg: RunConfig,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None],
    verbose: bool = False,
    resume: bool = False,
) -> float:
    """Run the Flower simulation (Ray backend) for ``cfg``; return its wall time. Stops Ray on any exit.

    ``resume`` continues the run recorded in ``out_dir`` (see ``server.federation.federate``).
    """
    apply_env()
    import ray
    from flwr.simulation import run_simulation

    from client.app import make_app as make_client_app
    from server.app import make_app as make_server_app

    flwr_logger = logging.getLogger("flwr")
    if not verbose:
        # Flower logs every sampling step at INFO and also propagates to the root logger (printing twice);
        # our own round lines say the same once. Errors still show.
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.propagate = False
    backend = {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "log_to_driver": True,
            "logging_level": "INFO" if verbose else "ERROR",
        },
    }
    personal = personal_lora(cfg, out_dir)
    started = time.perf_counter()
    banner = RunSimulationBanner()
    flwr_logger.addFilter(banner)
    try:
        run_simulation(
            server_app=make_server_app(cfg, out_dir, on_round, resume=resume),
            client_app=make_client_app(
                cfg.regions,
                audit_root=out_dir / AUDIT_DIR / NODES_DIR,
                personal=personal,
                cache_root=out_dir / SIMULATED_CACHE_DIR,
                canaries=cfg.audit.canaries,
                personalize_plan=cfg.personalize if cfg.personalize.dp else None,
                sim_seed=cfg.seed,
            ),
            num_supernodes=len(cfg.regions),
            backend_config=backend,  # type: ignore[arg-type]
        )
    finally:
        flwr_logger.removeFilter(banner)
        stop_ray(ray)
    return time.perf_counter() - started


class RunSimulationBanner(logging.Filter):
    """Drops Flower's "DEPRECATED FEATURE: The `run_simulation` function is deprecated" warning, and only it.

    Flower 1.42 has no supported way to run a simulation inside the calling process: its replacement, ``flwr run``,
    runs the apps in a separate (detached) SuperLink process, where our round callbacks, progress bar and
    Ctrl-C handling cannot reach. The banner would tell every user of ``fedlocale simulate`` to change a call
    they do not make; every other Flower warning, deprecations included, still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the run_simulation deprecation banner, True for every other record."""
        message = record.getMessage()
        return not (message.startswith("DEPRECATED FEATURE:") and "`run_simulation` function is deprecated" in message)


def stop_ray(ray: Any) -> None:
    """Shut Ray down and kill any of its processes that outlive that (after Ctrl-C some daemons do).

    Python's own multiprocessing helpers (the resource tracker the baselines' queues registered with) are this
    process's children too but not Ray's: killed, the next run in this process (a benchmark runs several) finds
    its tracker dead and prints tracebacks as the tracker is started again without what it knew."""
    import psutil  # comes with ray

    started_here = [proc for proc in psutil.Process().children(recursive=True) if not _multiprocessing_helper(proc)]
    if ray.is_initialized():
        ray.shutdown()
    _, alive = psutil.wait_procs(started_here, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def _multiprocessing_helper(proc: Any) -> bool:
    """Whether ``proc`` (a psutil.Process) is multiprocessing's resource tracker or forkserver."""
    import psutil

    try:
        command = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "multiprocessing.resource_tracker" in command or "multiprocessing.forkserver" in command


def simulate(
    cfg: RunConfig,
    out_dir: Path,
    *,
    config_path: str = "",
    overrides: Sequence[str] = (),
    say: Callable[[str], None] = print,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    verbose: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    local_predictions: dict[str, np.ndarray] | None = None,
) -> Summary:
    """Run the federated simulation and the configured baselines; write every output file; return the summary.

    ``local_predictions``, if given, receives the local-only baseline's test predictions per region (for A/B
    comparisons made after the run); given already filled to a run without that baseline (the same regions and
    seed, e.g. a benchmark borrowing another run's baselines), its predictions stand for the baseline's in the
    served − local-only comparison (``served_vs_local_only``).
    ``resume`` continues the federated run that ``out_dir`` holds after its last finished round (its config must
    match; a finished run only repeats the final test evaluation); the baselines run again in full.

    ``out_dir`` holding a run is refused (``RunFolderExistsError``) unless ``resume`` or ``overwrite``; with
    ``overwrite`` the old run's own files are removed only once the config, the policies and every region's data
    have passed their checks (other files in the folder stay). ``config_path`` and ``overrides`` (the ``--set``
    assignments ``cfg`` was loaded with) let a problem the checks find name its line or its override.
    """
    from client.dp import DpRefused
    from client.preflight import preflight
    from runfolder.report import write_report
    from server.federation import FederationError, check_resumable, read_state

    # Everything is checked before the first write, so a refused run leaves the folder exactly as it was.
    check_run_dir(out_dir, overwrite=overwrite, resume=resume)
    # everything knowable before training (the model and LoRA targets, each region's data and policy), before
    # anything is written or started: the same checks as `fedlocale check`
    path = Path(config_path) if config_path else None
    policies = load_policies(cfg)
    checked = preflight(cfg, policies, path, say=say, overrides=overrides)
    for warning in checked.warnings:
        say(f"warning: {warning}")
    state = read_state(out_dir) if resume else None
    if state is not None:
        check_resumable(state, cfg, out_dir)  # the server checks again; refusing here spares starting Ray
    data = load_all(cfg, say, policies, checked.loaded)
    if overwrite and not resume:
        clear_run_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / CONFIG_FILE, yaml.safe_dump(config_dict(cfg), sort_keys=False))
    # the regions' label mix for the report: the data is local in a simulation (a deployment records none)
    mix = run_label_mix(cfg.labels, data, [region.data for region in cfg.regions])
    write_atomic(out_dir / LABEL_MIX_FILE, json.dumps(mix, ensure_ascii=False, indent=2) + "\n")
    fed_file = out_dir / FEDERATION_FILE
    fed_file.unlink(missing_ok=True)
    (out_dir / SERVER_ERROR_FILE).unlink(missing_ok=True)
    after = f", resuming after round {state.completed_round}" if state else (", nothing to resume" if resume else "")
    say(f"federated: {len(cfg.regions)} regions × {cfg.rounds} rounds{after}")
    federated_s = run_flower(cfg, out_dir, on_round or (lambda record: None), verbose, resume)
    error_file = out_dir / SERVER_ERROR_FILE
    if error_file.exists():
        last = error_file.read_text().strip().splitlines()[-1]
        raise FederationError(f"the federated run failed: {last} (traceback in {error_file})")
    if not fed_file.exists():
        raise FederationError(f"the federated run ended without writing {fed_file}; see the log above for its error")
    federation = json.loads(fed_file.read_text())
    local_preds: dict[str, np.ndarray] = {} if local_predictions is None else local_predictions
    # the baseline's adapters, kept only when personalization may serve them (consider_local_only)
    local_adapters: dict[str, dict[str, torch.Tensor]] | None = {} if cfg.personalize.weighs_local_only() else None
    started = time.perf_counter()
    baselines = run_baselines(cfg, data, say, local_preds, local_adapters)
    baselines_s = time.perf_counter() - started if baselines else None
    made = global_pass(cfg, out_dir, data)
    federated_confusion = {
        name: confusion(np.array([ex.label for ex in data[name].test]), probs.argmax(axis=1), len(cfg.labels)).tolist()
        for name, probs in made.probs.items()
    }
    summary = build_summary(
        cfg,
        data,
        federation,
        baselines,
        federated_s,
        config_path,
        federated_confusion=federated_confusion,
        baselines_s=baselines_s,
    )
    if cfg.personalize.mode != "none":
        try:
            entries = personalize_run(cfg, out_dir, data, local_preds or None, say, local_adapters, made)
            summary = with_personalized(summary, entries)
        except DpRefused as err:
            # a region's budget no longer allows its DP personalization (e.g. a round trained twice spent more
            # than planned): the finished run is kept, summary and report written without personalization
            say(f"warning: personalization not done: {err}; the summary and report have none")
    if local_preds and not summary.overall.get(keys.PERSONALIZED):
        # every region serves the global model: compare it with local-only here (personalization's A/B did not)
        summary = with_served_vs_local_only(summary, global_vs_local_only(cfg, data, local_preds, made.probs))
    del made  # the model is not needed by the audits below, which load their own
    summary = dataclasses.replace(summary, audit=audit_run(out_dir, cfg.region_names, say))
    if cfg.audit.privacy:
        from runfolder.privacy import audit_privacy, with_privacy, write_privacy_report

        write_summary(out_dir, summary)  # the audit reads the finished run as `fedlocale audit privacy` would
        privacy = audit_privacy(out_dir, say=say)
        summary = with_privacy(summary, privacy)
        say(f"privacy audit: report {write_privacy_report(out_dir, privacy)}")
    write_summary(out_dir, summary)
    write_report(out_dir, summary, read_metrics(out_dir))
    return summary


def audit_run(
    out_dir: Path, regions: Sequence[str], say: Callable[[str], None], node_dirs: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """Verify the run's ledgers against the keys its nodes and server made, and write the auditor's report.

    ``node_dirs`` names each region's audit folder when it is not the simulation's ``AUDIT_DIR/nodes/REGION``
    (a deployment on one machine). This checks the run as it left the machine; an auditor repeats it with keys
    obtained from each operator (``fedlocale audit verify``), which is what makes the check mean something.
    """
    from runfolder.audit_report import write_audit_report
    from server.audit import recompute

    audit = out_dir / AUDIT_DIR
    nodes = node_dirs or {name: audit / NODES_DIR / name for name in regions}
    signers = {SERVER: audit / SERVER_DIR} | {name: nodes[name] for name in regions if name in nodes}
    present = {name: folder for name, folder in signers.items() if (folder / PUBLIC_KEY_FILE).is_file()}
    keys_file = audit / KEYS_FILE
    write_atomic(
        keys_file,
        yaml.safe_dump({n: os.path.relpath(f / PUBLIC_KEY_FILE, audit) for n, f in present.items()}, sort_keys=False),
    )
    trusted = {name: load_verify_key(folder / PUBLIC_KEY_FILE) for name, folder in present.items()}
    updates = audit / UPDATES_DIR
    result = verify_all(
        [f / LEDGER_FILE for f in present.values()],
        trusted,
        (lambda server: recompute(server, updates)) if updates.is_dir() else None,
    )
    report = write_audit_report(list(result.checks), audit, list(result.findings))
    verdict = "verified" if result.ok else f"NOT verified ({len(result.findings)} problem(s))"
    say(f"audit: {len(result.checks)} ledgers {verdict}; report {report}")
    return {
        "verified": result.ok,
        "findings": list(result.findings),
        "ledgers": {c.signer: len(c.entries) for c in result.checks if c.signer},
        "missing_ledgers": sorted(set(signers) - set(present)),  # e.g. a node that never received a message
        "rounds_recomputed": result.rounds_recomputed,
        "report": str(report.relative_to(out_dir)),
    }
