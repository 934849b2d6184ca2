"""Tests for runfolder.audit_report.write_audit_report.

The ledgers are real: written with ``common.audit.Ledger`` (real Ed25519 keys, fixed times) and read back with
``verify_ledger``, so the report is tested on exactly what an auditor would hand it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from common.audit import Ledger, LedgerCheck, load_verify_key, verify_ledger
from common.runfiles import AUDIT_REPORT_FILE, KEY_FILE
from runfolder.audit_report import write_audit_report

T0 = datetime(2026, 11, 29, 21, 0, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POLICY_A = "a1" * 32
POLICY_B = "b2" * 32
TENSORS = [
    {"name": "layer.0.query.lora_A.weight", "shape": [4, 32], "dtype": "float32"},
    {"name": "layer.0.query.lora_B.weight", "shape": [32, 4], "dtype": "float32"},
    {"name": "classifier.bias", "shape": [2], "dtype": "float32"},
]  # 128 + 128 + 2 = 258 values
# metric values with many digits, so a leak into the report cannot be a coincidence
TRAIN_LOSS = 0.6918783783912659
ACCURACY = 0.4166666666666667
REFUSAL = "30 training examples, the policy needs at least 50"
FAILURE = "RuntimeError: out of memory | while training"
SHA = {
    name: f"{i:x}" * 64 for i, name in enumerate(("north-1", "north-2", "north-eval", "south-1", "g0", "g1", "g2"), 1)
}


def egress(round_: int | None, message: str, status: str, region: str = "north", **extra: Any) -> dict[str, Any]:
    """A node's egress body as client/guard.py writes it."""
    train = message == "train"
    body: dict[str, Any] = {
        "kind": "egress",
        "run": 7,
        "round": round_,
        "message": message,
        "region": region,
        "status": status,
        "tensors": TENSORS if train else [],
        "metrics": {"num-examples": 64, "train-loss": TRAIN_LOSS} if train else {"accuracy": ACCURACY},
        "sha256": None,
        "bytes": 1_032 + 16 if train else 123,
        "policy": POLICY_A,
        "redactions": {"email": 3, "phone": 1},
        "train_examples": 64,
    }
    body.update(extra)
    return body


def write(folder: Path, signer: str, bodies: list[dict[str, Any]], start: int = 0) -> None:
    """Append ``bodies`` to the signer's ledger in ``folder`` at one-minute steps from T0."""
    ledger = Ledger.in_folder(folder, signer)
    for i, body in enumerate(bodies):
        ledger.append(body, T0 + timedelta(minutes=start + i))


def check(folder: Path, signer: str) -> LedgerCheck:
    """The ledger in ``folder`` verified against its own public key."""
    return verify_ledger(folder / "ledger.jsonl", {signer: load_verify_key(folder / "ledger.pub")})


def north_bodies() -> list[dict[str, Any]]:
    """Two training rounds and their evaluations, then a repeated evaluation (the final test)."""
    return [
        egress(1, "train", "sent", sha256=SHA["north-1"]),
        egress(1, "evaluate", "sent", sha256=SHA["north-eval"]),
        egress(2, "train", "sent", sha256=SHA["north-2"]),
        egress(2, "evaluate", "sent", sha256=SHA["north-eval"][::-1]),
        egress(1, "evaluate", "sent", sha256=SHA["north-eval"][1:] + "0", bytes=122),
    ]


def east_bodies() -> list[dict[str, Any]]:
    """Refused twice by the policy, then a failure (which the guard records without round or bytes)."""
    return [
        egress(1, "train", "refused", "east", reasons=[REFUSAL], redactions={}, train_examples=30),
        egress(2, "train", "refused", "east", reasons=[REFUSAL], redactions={}, train_examples=30),
        {"kind": "egress", "run": 7, "message": "evaluate", "region": "east", "status": "failed", "reason": FAILURE},
    ]


def server_bodies() -> list[dict[str, Any]]:
    """Round 1: north combined, east rejected; round 2 starts from the wrong model; then the final test."""
    east_reason = f"node failed: refused by the policy of region east: {REFUSAL}"
    return [
        {"kind": "dispatch", "run": 7, "round": 1, "message": "train", "global_sha256": SHA["g0"], "nodes": [1, 2]},
        {"kind": "inbound", "run": 7, "round": 1, "message": "train", "node": 1, "region_index": 0,
         "sha256": SHA["north-1"], "status": "received"},
        {"kind": "inbound", "run": 7, "round": 1, "message": "train", "node": 2, "status": "error",
         "reason": east_reason},
        {"kind": "aggregate", "run": 7, "round": 1, "method": "weighted", "server_lr": 1.0, "base_sha256": SHA["g0"],
         "participants": [{"region": "north", "node": 1, "sha256": SHA["north-1"], "num_examples": 64,
                           "weight": 1.0}],
         "rejected": [{"node": "2", "region": "east", "reason": east_reason}], "global_sha256": SHA["g1"]},
        {"kind": "inbound", "run": 7, "round": 1, "message": "evaluate", "node": 1, "region_index": 0,
         "sha256": SHA["north-eval"], "status": "received"},
        {"kind": "dispatch", "run": 7, "round": 2, "message": "train", "global_sha256": SHA["g1"], "nodes": [1, 2]},
        {"kind": "aggregate", "run": 7, "round": 2, "method": "weighted", "server_lr": 0.01, "base_sha256": SHA["g0"],
         "optimizer": {"name": "fedadam", "server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001},
         "optimizer_step": 2, "optimizer_state_sha256": SHA["g2"][::-1],
         "participants": [{"region": "north", "node": 1, "sha256": SHA["north-2"], "num_examples": 64,
                           "weight": 1.0}],
         "rejected": [], "global_sha256": SHA["g2"]},
        {"kind": "inbound", "run": 7, "round": 1, "message": "evaluate", "node": 1, "region_index": 0,
         "sha256": SHA["north-eval"][::-1], "status": "received"},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LedgerCheck]]:
    """A server and two region ledgers, written and verified for real."""
    root = tmp_path_factory.mktemp("audit")
    write(root / "north", "north", north_bodies())
    write(root / "east", "east", east_bodies(), start=1)
    write(root / "server", "server", server_bodies())
    return root, [check(root / "server", "server"), check(root / "north", "north"), check(root / "east", "east")]


@pytest.fixture(scope="module")
def report(ledgers: tuple[Path, list[LedgerCheck]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The report of the verified ledgers with no findings: its folder and its text."""
    out = tmp_path_factory.mktemp("report")
    path = write_audit_report(ledgers[1], out)
    assert path == out / AUDIT_REPORT_FILE
    return out, path.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The text of one ``## title`` section."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def rows(text: str) -> list[list[str]]:
    """The cells of every table row that starts with a ledger line number."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in text.splitlines()
            if re.match(r"^\| \d+ \|", line)]  # fmt: skip


def test_verdict_lists_every_ledger(report: tuple[Path, str], ledgers: tuple[Path, list[LedgerCheck]]) -> None:
    text = report[1]
    assert all(c.ok for c in ledgers[1])
    assert "✅ VERIFIED" in text and "NOT VERIFIED" not in text
    top = text.split("## Region", 1)[0]
    for c in ledgers[1]:
        assert f"`{c.path}` | {c.signer} | {len(c.entries)} | 2026-11-29 21:0" in top


def test_region_rows_statuses_and_bytes(report: tuple[Path, str]) -> None:
    north = rows(section(report[1], "Region north"))
    assert [(r[3], r[4], r[5], r[6]) for r in north] == [
        ("1", "train", "sent", "1,048"),
        ("1", "evaluate", "sent", "123"),
        ("2", "train", "sent", "1,048"),
        ("2", "evaluate", "sent", "123"),
        ("1", "evaluate", "sent", "122"),
    ]
    assert north[0][1] == "2026-11-29 21:00:00" and north[0][7] == "3 (258)"
    assert north[0][8] == "num-examples, train-loss" and north[1][8] == "accuracy"
    assert north[0][9] == f"`{SHA['north-1'][:12]}…`" and north[0][10] == f"`{POLICY_A[:12]}…`"
    east = rows(section(report[1], "Region east"))
    assert [(r[3], r[5], r[6], r[9]) for r in east] == [
        ("1", "**refused** [1]", "1,048", "— (not sent)"),
        ("2", "**refused** [1]", "1,048", "— (not sent)"),
        ("—", "**failed** [2]", "—", "— (not sent)"),
    ]


def test_reasons_and_summary(report: tuple[Path, str]) -> None:
    east = section(report[1], "Region east")
    assert f"1. {REFUSAL} — ledger line(s) 1–2" in east
    assert f"2. {FAILURE} — ledger line(s) 3" in east
    assert "**Sent:** nothing" in east and "2 refused by the region's policy, 1 failed" in east
    north = section(report[1], "Region north")
    assert "train: 2 replies, 2,096 bytes; evaluate: 3 replies, 368 bytes — in all 2,464 bytes." in north
    assert "email 3, phone 1 (the largest count in any one entry" in north and "differ" not in north
    assert f"`{POLICY_A[:12]}…`, the same in every entry" in north and "changed" not in north
    assert "**Training examples reported:** 64" in north


def test_server_section(report: tuple[Path, str]) -> None:
    server = section(report[1], "What the server did")
    assert "### Run 7, round 1" in server
    assert f"| north | 1 | 64 | 100.0 % | `{SHA['north-1'][:12]}…` | yes, line 1 |" in server
    assert f"**Rejected:** east (node 2): node failed: refused by the policy of region east: {REFUSAL}" in server
    assert f"shared model `{SHA['g1'][:12]}…` (method weighted, server step size 1.0)." in server
    assert "train: 1 received, 1 error(s)" in server
    assert "### Run 7, evaluation of round 1's model" in server
    round_2 = server.split("### Run 7, round 2", 1)[1].split("###", 1)[0]
    assert f"`{SHA['north-2'][:12]}…` | yes, line 3 |" in round_2
    assert "**Combined:**" in round_2 and "Rejected" not in round_2
    assert (
        "(method weighted, server optimizer fedadam (server_lr 0.01, beta_1 0.9, beta_2 0.99, tau 0.001), step 2)."
        in round_2
    )
    assert f"⚠ The round started from `{SHA['g0'][:12]}…`, not from the model sent out." in round_2


def test_plots_exist_and_are_linked(report: tuple[Path, str]) -> None:
    out, text = report
    for region in ("north", "east"):
        png = out / f"audit-bytes-{region}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
        assert f"](audit-bytes-{region}.png)" in text


def test_no_metric_values_or_keys(report: tuple[Path, str], ledgers: tuple[Path, list[LedgerCheck]]) -> None:
    text = report[1]
    # the report names metrics but never prints their values, not even rounded
    for value in (TRAIN_LOSS, ACCURACY):
        assert str(value)[:5] not in text
    assert "PRIVATE KEY" not in text
    root = ledgers[0]
    for signer in ("north", "east", "server"):
        assert (root / signer / KEY_FILE).is_file()  # the key sat next to the ledger the report read
        secret = (root / signer / KEY_FILE).read_text().splitlines()[1]
        assert secret not in text


def test_findings_are_printed_verbatim(ledgers: tuple[Path, list[LedgerCheck]], tmp_path: Path) -> None:
    findings = [
        "/x/server/ledger.jsonl:4: round 1: update 2d3a908bc88ccf60… of north is in no node's ledger",
        "odd `back`ticks | and pipes_with_underscores_",
    ]
    text = write_audit_report(ledgers[1], tmp_path, findings).read_text(encoding="utf-8")
    assert "❌ NOT VERIFIED — 2 problem(s) found." in text and "✅" not in text
    for finding in findings:
        assert finding in text


def test_a_failed_check_is_never_reported_as_verified(tmp_path: Path) -> None:
    write(tmp_path / "north", "north", north_bodies())
    ledger = tmp_path / "north" / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # an entry removed from the middle
    broken = check(tmp_path / "north", "north")
    assert broken.problem is not None
    text = write_audit_report([broken], tmp_path / "out").read_text(encoding="utf-8")
    assert "NOT VERIFIED — 1 problem(s)" in text and broken.problem in text


def test_policy_change_and_varying_redactions_are_flagged(tmp_path: Path) -> None:
    write(tmp_path / "south", "south", [
        egress(1, "train", "sent", sha256=SHA["south-1"], region="south", redactions={"email": 2}),
        egress(2, "train", "sent", sha256=SHA["south-1"][::-1], region="south", redactions={"email": 5},
               policy=POLICY_B),
    ])  # fmt: skip
    text = write_audit_report([check(tmp_path / "south", "south")], tmp_path / "out").read_text(encoding="utf-8")
    assert f"the policy changed during the run:** `{POLICY_A[:12]}…` (lines 1), then `{POLICY_B[:12]}…`" in text
    assert "email 5 (the largest count" in text and "the counts differ between entries" in text
    assert "No server ledger was given" in text


def test_region_without_rounds_has_no_plot_and_stale_one_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "audit-bytes-east.png").write_bytes(PNG_MAGIC)  # from an earlier report
    write(tmp_path / "east", "east", east_bodies()[2:])
    text = write_audit_report([check(tmp_path / "east", "east")], out).read_text(encoding="utf-8")
    assert "*No plot: no reply of this region names a round.*" in text
    assert not (out / "audit-bytes-east.png").exists()


def test_cli_report_out_never_replaces_the_users_files(
    ledgers: tuple[Path, list[LedgerCheck]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    from fedlocale.cli import main

    root = ledgers[0]
    keys = [f"--key={name}={root / name / 'ledger.pub'}" for name in ("server", "north", "east")]
    sources = [str(root / name / "ledger.jsonl") for name in ("server", "north", "east")]
    mine = tmp_path / "report.md"
    mine.write_text("the user's own report\n")
    assert main(["audit", "report", *sources, *keys, "--out", str(mine)]) == 2
    assert f"--out {mine} is a file" in capsys.readouterr().err
    assert mine.read_text() == "the user's own report\n"
    # an existing folder: the report's own files are written (atomically), the user's others are untouched
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("mine\n")
    (folder / "audit-bytes-north.png.bak").write_bytes(b"\x89PNG mine")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert main(["audit", "report", *sources, *keys, "--out", str(folder)]) == 0
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {AUDIT_REPORT_FILE, "audit-bytes-north.png", "audit-bytes-east.png"}
    # an earlier report (perhaps annotated by its reader) is replaced only with --overwrite
    report = folder / AUDIT_REPORT_FILE
    report.write_text(report.read_text(encoding="utf-8") + "\nauditor's note\n", encoding="utf-8")
    annotated = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert main(["audit", "report", *sources, *keys, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} holds an earlier audit report ({AUDIT_REPORT_FILE}, audit-bytes-east.png" in err
    assert "pass --overwrite" in err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == annotated
    assert main(["audit", "report", *sources, *keys, "--out", str(folder), "--overwrite"]) == 0
    assert "auditor's note" not in report.read_text(encoding="utf-8")
