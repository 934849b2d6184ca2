"""Turn verified audit ledgers into a Markdown report with PNG plots, for a privacy auditor who does not read code.

The report answers four questions in order: can the ledgers be trusted (the verdict), what left each region's
node and under which policy, what the server made of what it received, and what a signed ledger can and cannot
prove. It reads only the entries it is given (``LedgerCheck``), never the folders they came from, so nothing
but ledger content (names, sizes, hashes, reasons) can end up in it: no keys, no data, no metric values.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.audit import AGGREGATE, DISPATCH, EGRESS, FAILED, INBOUND, REFUSED, SENT, SERVER, LedgerCheck
from common.runfiles import AUDIT_PLOT, AUDIT_REPORT_FILE, write_atomic
from runfolder.report import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["write_audit_report"]

HASH_CHARS = 12
LOG_SCALE_RATIO = 20.0  # train replies are ~40x evaluate replies; on a linear axis the evaluate line sits on zero
MESSAGE_ORDER = ("train", "evaluate")
MESSAGE_COLORS = {"train": "#1f77b4", "evaluate": "#ff7f0e"}
REFUSED_COLOR = "#d62728"

Entry = Mapping[str, Any]

SHOWS_TEXT = """## What this report shows, and what it does not

**It shows** what each region's node itself recorded about every reply it was asked to send: when, how many
bytes, which tensors (names, shapes, number type — never their values), the names of the metrics, a fingerprint
(SHA-256 hash) of the exact payload, and a fingerprint of the residency policy that was in force. Replies the
policy stopped are recorded with the reasons. The server's ledger shows which updates it received, which it
combined with which weights, which it rejected and why, and the fingerprint of every resulting shared model.
Each entry carries the hash of the one before it and a digital signature, so an entry that was changed,
removed from the middle, re-ordered or written with another key is detected by the verification above.

**It does not show:**

- *That a ledger is complete at its end.* If the last entries of a ledger were deleted, what remains is a
  valid, shorter ledger. For every update the server combined into the shared model, the cross-check with the
  server ledger closes this gap (that update must appear in the region's own ledger). It does not for
  evaluation replies, refused replies, or anything after the server's last recorded step.
- *That the signer is who it claims to be.* A signature proves that the holder of a key wrote the entry; that
  the key belongs to the region's node rests on how the public keys reached the auditor.
- *What the numbers inside an update were.* The ledgers hold fingerprints, not contents. Proving that a
  fingerprint matches a particular update, or that the server's arithmetic was right, needs the kept updates
  (recomputation), not this report.
- *That an update reveals nothing about the training data.* Model updates can still carry information about
  the data they were trained on; whether differential privacy was applied is not recorded in these entries.
- *Exact times.* Times are each signer's own clock, shown in UTC.
- *Network traffic.* Byte counts are the payload (tensor bytes plus the encoded metrics), without transport
  overhead or encryption. For refused replies they are the size the reply would have had; only an error
  message with the reason left the node.
- *Which data an evaluation used.* The ledger does not record whether an evaluate reply was computed on
  validation or test data; the final test evaluation appears as a second evaluate reply for the round whose
  shared model was chosen."""


# ------------------------------------------------------------------------------------------------- public API


def write_audit_report(
    checks: Sequence[LedgerCheck], out_dir: Path, findings: Sequence[str] = (), not_checked: Sequence[str] = ()
) -> Path:
    """Write ``out_dir/audit-report.md`` and one bytes-per-round PNG per region; return the report's path.

    ``checks`` are the ledgers as verified by the caller (the server's has signer ``server``); ``findings`` are
    the problems the caller's verification found, printed verbatim (empty means everything verified);
    ``not_checked`` the checks that could not run, each with why (listed under the verdict, so a reader never takes
    a check that did not run for one that passed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    servers = [c for c in checks if c.signer == SERVER]
    nodes = sorted((c for c in checks if c.signer not in (SERVER, None)), key=lambda c: str(c.signer))
    sections = [
        "# Audit report: what left each region",
        _verdict(checks, findings, not_checked),
        *(_region_section(node, out_dir) for node in nodes),
        _server_section(servers, nodes),
        SHOWS_TEXT,
    ]
    path = out_dir / AUDIT_REPORT_FILE
    write_atomic(path, "\n\n".join(sections) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- formatting


def _short(digest: Any) -> str:
    """The first hex digits of a hash, enough to tell hashes apart by eye; a dash when there is none."""
    return f"`{str(digest)[:HASH_CHARS]}…`" if digest else "—"


def _when(value: Any) -> str:
    """An entry's time as ``YYYY-MM-DD HH:MM:SS`` in UTC (the raw text when it is not an ISO time)."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _num(value: Any) -> str:
    """An integer with thousands separators, a dash when absent."""
    return f"{int(value):,}" if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell (a pipe would end the cell, a newline the row)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """``text`` as inline code, verbatim: the fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], prefix: str = "") -> list[str]:
    """A Markdown table; ``prefix`` (e.g. ``> ``) puts it inside a quote block."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [prefix + line for line in lines]


def _line_ranges(lines: Sequence[int]) -> str:
    """Ledger line numbers compressed into ranges: 1–3, 5."""
    parts: list[str] = []
    for number in sorted(lines):
        if parts and parts[-1].split("–")[-1] == str(number - 1):
            parts[-1] = f"{parts[-1].split('–')[0]}–{number}"
        else:
            parts.append(str(number))
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- verdict


def _verdict(checks: Sequence[LedgerCheck], findings: Sequence[str], not_checked: Sequence[str] = ()) -> str:
    """The box at the top: verified or not, every problem verbatim, and which ledgers were read."""
    # a ledger that failed its own check is a problem even if the caller forgot to pass it on
    problems = list(findings) + [c.problem for c in checks if c.problem and c.problem not in findings]
    if not checks:
        problems.append("no ledgers were given to this report")
    if problems:
        head = [
            f"> **❌ NOT VERIFIED — {len(problems)} problem(s) found.** Do not rely on the rest of this report "
            "until each is explained:",
            ">",
            *(f"> - {_code(p)}" for p in problems),
        ]
    else:
        head = [
            "> **✅ VERIFIED.** The checks found no problem: every ledger below is intact and in order, and each "
            "entry is signed with the key given for its signer.",
        ]
    if not_checked:
        head += [">", "> **Not checked:**", ">", *(f"> - {_cell(what)}" for what in not_checked)]
    rows = [_ledger_row(c) for c in checks]
    return "\n".join(
        [
            *head,
            ">",
            *_table(("Ledger file", "Signed by", "Entries", "First entry (UTC)", "Last entry (UTC)"), rows, "> "),
        ]
    )


def _ledger_row(check: LedgerCheck) -> tuple[str, str, str, str, str]:
    """One ledger in the verdict box."""
    first = _when(check.entries[0]["time"]) if check.entries else "—"
    last = _when(check.entries[-1]["time"]) if check.entries else "—"
    return (f"`{check.path}`", check.signer or "unknown", f"{len(check.entries):,}", first, last)


# ---------------------------------------------------------------------------------------------- one region


@dataclass
class _Notes:
    """Distinct refusal/failure reasons, numbered in order of first appearance, with the lines they apply to."""

    lines: dict[str, list[int]] = field(default_factory=dict)

    def mark(self, reason: str, line: int) -> str:
        """The footnote mark for ``reason`` (recording that ``line`` had it)."""
        self.lines.setdefault(reason, []).append(line)
        return f"[{list(self.lines).index(reason) + 1}]"

    def render(self) -> list[str]:
        """The numbered reasons, each with the ledger lines it stopped."""
        return [
            f"{i}. {reason} — ledger line(s) {_line_ranges(lines)}"
            for i, (reason, lines) in enumerate(self.lines.items(), start=1)
        ]


def _egress(check: LedgerCheck) -> list[Entry]:
    """The node's egress entries, in ledger order."""
    return [e for e in check.entries if e["body"].get("kind") == EGRESS]


def _region_section(check: LedgerCheck, out_dir: Path) -> str:
    """One region: a row per reply, why any were stopped, a summary and the bytes-per-round plot."""
    region = str(check.signer)
    entries = _egress(check)
    notes = _Notes()
    lines = [f"## Region {region}", "", f"From `{check.path}`: {len(check.entries):,} entries signed by {region}."]
    others = len(check.entries) - len(entries)
    if others:
        lines.append(f"{others} entries are not about outgoing replies and are not shown.")
    if not entries:
        return "\n".join([*lines, "", "No reply was recorded as leaving or being stopped."])
    header = (
        "Line",
        "Time (UTC)",
        "Run",
        "Round",
        "Message",
        "Status",
        "Bytes",
        "Tensors (values)",
        "Metrics",
        "Payload SHA-256",
        "Policy",
    )
    lines += ["", *_table(header, (_egress_row(e, notes) for e in entries))]
    if notes.lines:
        lines += ["", "**Why replies were stopped** (the node's own words):", "", *notes.render()]
    lines += ["", *_region_summary(region, entries)]
    lines += ["", _plot_block(region, entries, out_dir)]
    return "\n".join(lines)


def _egress_row(entry: Entry, notes: _Notes) -> list[str]:
    """One reply: what it was, whether it left, how big, and the fingerprints of payload and policy."""
    body = entry["body"]
    status = str(body.get("status"))
    if status == REFUSED:
        status = (
            f"**refused** {notes.mark('; '.join(map(str, body.get('reasons') or ['no reason given'])), entry['_line'])}"
        )
    elif status == FAILED:
        status = f"**failed** {notes.mark(str(body.get('reason') or 'no reason given'), entry['_line'])}"
    tensors = body.get("tensors") or []
    values = sum(math.prod(int(n) for n in t.get("shape", [])) for t in tensors)
    return [
        str(entry["_line"]),
        _when(entry["time"]),
        str(body.get("run", "—")),
        str(body["round"]) if body.get("round") is not None else "—",
        str(body.get("message", "—")),
        status,
        _num(body.get("bytes")),
        f"{len(tensors)} ({values:,})" if tensors else "0",
        ", ".join(sorted(body.get("metrics") or {})) or "—",
        _short(body.get("sha256")) if body.get("status") == SENT else "— (not sent)",
        _short(body.get("policy")),
    ]


def _region_summary(region: str, entries: Sequence[Entry]) -> list[str]:
    """Totals sent per message type, stops, redactions, training examples and the policy in force."""
    status = Counter(str(e["body"].get("status")) for e in entries)
    items = [
        f"- **Sent:** {_sent_totals(entries)}",
        f"- **Stopped:** {status[REFUSED]} refused by the region's policy, {status[FAILED]} failed with an error "
        "(for these only an error message with the reason left the node).",
        f"- **Personal data replaced before training:** {_redactions(entries)}",
        f"- **Training examples reported:** {_distinct(e['body'].get('train_examples') for e in entries)}",
        f"- **Policy in force:** {_policies(entries)}",
    ]
    foreign = sorted({str(e["body"]["region"]) for e in entries if e["body"].get("region")} - {region})
    if foreign:
        items.append(f"- ⚠ **Entries name another region:** {', '.join(foreign)} (the ledger is signed by {region}).")
    return ["**Summary.**", "", *items]


def _sent_totals(entries: Sequence[Entry]) -> str:
    """Replies and bytes that left, per message type."""
    count: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for entry in entries:
        body = entry["body"]
        if body.get("status") == SENT:
            count[str(body.get("message"))] += 1
            nbytes[str(body.get("message"))] += int(body.get("bytes") or 0)
    if not count:
        return "nothing (no reply left this node)."
    parts = [f"{m}: {count[m]} replies, {nbytes[m]:,} bytes" for m in sorted(count, key=_message_rank)]
    return "; ".join(parts) + f" — in all {sum(nbytes.values()):,} bytes."


def _redactions(entries: Sequence[Entry]) -> str:
    """The largest count per PII type over all entries, and whether the counts varied."""
    recorded = [e["body"]["redactions"] for e in entries if isinstance(e["body"].get("redactions"), dict)]
    largest: dict[str, int] = {}
    for counts in recorded:
        for kind, n in counts.items():
            largest[kind] = max(largest.get(kind, 0), int(n))
    if not largest:
        return "none recorded." if recorded else "not recorded."
    text = ", ".join(f"{kind} {n:,}" for kind, n in sorted(largest.items()))
    # every reply re-reads the same region data, so adding the counts up would multiply them
    text += " (the largest count in any one entry: each entry counts the same data again, so they are not added)"
    if len({tuple(sorted(c.items())) for c in recorded}) > 1:
        text += "; ⚠ the counts differ between entries, so the data or the redaction rules changed during the run"
    return text + "."


def _distinct(values: Iterable[Any]) -> str:
    """The distinct values in order of appearance, or a dash."""
    seen = list(dict.fromkeys(v for v in values if v is not None))
    return ", ".join(_num(v) for v in seen) if seen else "—"


def _policies(entries: Sequence[Entry]) -> str:
    """The policy hash(es) in force, flagged when it changed during the run."""
    lines: dict[str, list[int]] = {}
    for entry in entries:
        if entry["body"].get("policy"):
            lines.setdefault(str(entry["body"]["policy"]), []).append(int(entry["_line"]))
    if not lines:
        return "⚠ none recorded (the node ran without a residency policy)."
    if len(lines) == 1:
        ((digest, where),) = lines.items()
        missing = len(entries) - len(where)
        tail = f" ({missing} entries, e.g. failures, record none)" if missing else ""
        return f"{_short(digest)}, the same in every entry that records one{tail}."
    parts = [f"{_short(d)} (lines {_line_ranges(where)})" for d, where in lines.items()]
    return "⚠ **the policy changed during the run:** " + ", then ".join(parts) + "."


# ------------------------------------------------------------------------------------------------------ plots


def _plot_block(region: str, entries: Sequence[Entry], out_dir: Path) -> str:
    """The plot of one region with a caption, or a note saying why there is none."""
    name = AUDIT_PLOT.format(re.sub(r"[^A-Za-z0-9._-]", "_", region))
    if not _plot_bytes(region, entries, out_dir / name):
        (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report would contradict this one
        return "*No plot: no reply of this region names a round.*"
    return (
        f"![Bytes sent per round by {region}]({name})\n\n"
        "*Bytes of each reply per round (payload only). Lines join the replies sent; hollow diamonds are a second "
        "reply for a round already shown (the final test evaluation re-uses the round of the chosen model); "
        "crosses on a red band are replies the policy refused, at the size they would have had — they did not "
        "leave.*"
    )


@dataclass(frozen=True)
class _Point:
    """One reply on the plot."""

    round: int
    nbytes: int
    message: str
    status: str
    repeat: bool  # a second reply of the same message and round: the final test evaluation re-uses a round


def _points(entries: Sequence[Entry]) -> list[_Point]:
    """Every sent or refused reply that names a round, in ledger order."""
    seen: set[tuple[str, int]] = set()
    points = []
    for entry in entries:
        body = entry["body"]
        if not isinstance(body.get("round"), int) or body.get("status") not in (SENT, REFUSED):
            continue  # the guard records no round for failures, so they have no place on this axis
        key = (str(body.get("message")), body["round"])
        points.append(_Point(key[1], int(body.get("bytes") or 0), key[0], str(body["status"]), key in seen))
        seen.add(key)
    return points


def _message_rank(message: str) -> tuple[int, str]:
    """Train before evaluate, anything unexpected after them."""
    return (MESSAGE_ORDER.index(message) if message in MESSAGE_ORDER else len(MESSAGE_ORDER), message)


def _plot_bytes(region: str, entries: Sequence[Entry], path: Path) -> bool:
    """Draw bytes sent per round (train and evaluate apart, refusals marked); False when there is nothing."""
    points = _points(entries)
    if not points:
        return False
    fig, ax = new_figure(7.0, 4.0)
    for message in sorted({p.message for p in points}, key=_message_rank):
        _draw_message(ax, message, [p for p in points if p.message == message])
    for i, rnd in enumerate(sorted({p.round for p in points if p.status == REFUSED})):
        label = "round with a refused reply" if i == 0 else None
        ax.axvspan(rnd - 0.3, rnd + 0.3, color=REFUSED_COLOR, alpha=0.1, lw=0, label=label)
    _style_axes(ax, region, points)
    save_figure(fig, path)
    return True


def _draw_message(ax: Axes, message: str, points: Sequence[_Point]) -> None:
    """One message type: a line through first replies, hollow diamonds for repeats, crosses for refusals."""
    color = MESSAGE_COLORS.get(message)
    first = [p for p in points if p.status == SENT and not p.repeat]
    again = [p for p in points if p.status == SENT and p.repeat]
    refused = [p for p in points if p.status == REFUSED]
    if first:
        ax.plot([p.round for p in first], [p.nbytes for p in first], marker="o", color=color, label=f"{message}, sent")
    if again:
        ax.scatter(
            [p.round for p in again],
            [p.nbytes for p in again],
            marker="D",
            s=60,
            facecolors="none",
            edgecolors=color,
            label=f"{message}, sent again for a round (e.g. final test)",
            zorder=3,
        )
    if refused:
        ax.scatter(
            [p.round for p in refused],
            [p.nbytes for p in refused],
            marker="x",
            s=80,
            color=color,
            label=f"{message}, refused (did not leave)",
            zorder=3,
        )


def _style_axes(ax: Axes, region: str, points: Sequence[_Point]) -> None:
    """Title, labels, one tick per round, and plain byte numbers (log scale when sizes differ a lot)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    sizes = [p.nbytes for p in points]
    if min(sizes) > 0 and max(sizes) / min(sizes) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    # "4,428" reads as bytes to anyone; "4×10³" does not
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    rounds = sorted({p.round for p in points})
    if len(rounds) <= 25:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"What left {region}, per round", fontsize=13)
    ax.set_xlabel("round", fontsize=11)
    ax.set_ylabel("bytes (payload)", fontsize=11)
    ax.legend(fontsize=9)


# ----------------------------------------------------------------------------------------------------- server


@dataclass
class _Step:
    """Consecutive server entries of one run and round: a training round, or an evaluation on its own."""

    run: Any
    round: Any
    entries: list[Entry] = field(default_factory=list)

    def of(self, kind: str, message: str | None = None) -> list[Entry]:
        """This step's entries of one kind (and message)."""
        return [
            e
            for e in self.entries
            if e["body"].get("kind") == kind and (message is None or e["body"].get("message") == message)
        ]


def _steps(entries: Sequence[Entry]) -> list[_Step]:
    """Server entries cut into steps in ledger order; a dispatch always opens a new step."""
    steps: list[_Step] = []
    for entry in entries:
        body = entry["body"]
        key = (body.get("run"), body.get("round"))
        if not steps or body.get("kind") == DISPATCH or (steps[-1].run, steps[-1].round) != key:
            steps.append(_Step(*key))
        steps[-1].entries.append(entry)
    return steps


def _server_section(servers: Sequence[LedgerCheck], nodes: Sequence[LedgerCheck]) -> str:
    """What the server sent, received, combined and rejected, round by round."""
    lines = ["## What the server did"]
    if not servers:
        return "\n".join(
            [
                *lines,
                "",
                "No server ledger was given, so this report cannot say which updates the "
                "server received or combined into the shared model.",
            ]
        )
    sent = _sent_updates(nodes)
    given = {str(n.signer) for n in nodes}
    for server in servers:
        lines += ["", f"From `{server.path}`: {len(server.entries):,} entries signed by the server."]
        for step in _steps(server.entries):
            lines += ["", *_step_lines(step, sent, given)]
    return "\n".join(lines)


def _sent_updates(nodes: Sequence[LedgerCheck]) -> dict[str, list[tuple[str, Entry]]]:
    """Every train reply a node recorded as sent, by payload hash, with the node's name."""
    sent: dict[str, list[tuple[str, Entry]]] = defaultdict(list)
    for node in nodes:
        for entry in _egress(node):
            if entry["body"].get("status") == SENT and entry["body"].get("message") == "train":
                sent[str(entry["body"].get("sha256"))].append((str(node.signer), entry))
    return sent


def _step_lines(step: _Step, sent: Mapping[str, list[tuple[str, Entry]]], given: set[str]) -> list[str]:
    """One round (or evaluation-only step) of the server ledger in plain words."""
    aggregates = step.of(AGGREGATE)
    dispatches = step.of(DISPATCH)
    if not dispatches and not aggregates:
        title = f"### Run {step.run}, evaluation of round {step.round}'s model"
        intro = [
            "Evaluation only, no training: most likely the final test evaluation (the ledger does not say "
            "which data was used).",
            "",
        ]
    else:
        title, intro = f"### Run {step.run}, round {step.round}", []
    lines = [title, "", *intro]
    for entry in dispatches:
        body = entry["body"]
        lines.append(
            f"- **Sent out:** shared model {_short(body.get('global_sha256'))} to "
            f"{len(body.get('nodes') or [])} node(s) at {_when(entry['time'])} UTC."
        )
    lines.append(f"- **Replies:** {_inbound_counts(step)}")
    for entry in aggregates:
        lines += _aggregate_lines(entry["body"], dispatches, sent, given)
    if dispatches and not aggregates:
        lines.append("- ⚠ **No aggregation recorded** for this round (the run stopped or the ledger ends here).")
    return lines


def _inbound_counts(step: _Step) -> str:
    """How many replies of each message type arrived intact or as errors."""
    parts = []
    for message in MESSAGE_ORDER:
        statuses = Counter(str(e["body"].get("status")) for e in step.of(INBOUND, message))
        if statuses:
            parts.append(f"{message}: {statuses['received']} received, {statuses['error']} error(s)")
    return ("; ".join(parts) or "none recorded") + "."


def _aggregate_lines(
    body: Entry, dispatches: Sequence[Entry], sent: Mapping[str, list[tuple[str, Entry]]], given: set[str]
) -> list[str]:
    """Who was combined with which weight, who was rejected and why, and the resulting shared model."""
    rows = [_participant_row(p, body, sent, given) for p in body.get("participants") or []]
    header = ("Region", "Node", "Training examples", "Weight", "Update SHA-256", "In the region's own ledger")
    lines = ["- **Combined:**" if rows else "- **Combined:** nothing (no update was accepted).", ""]
    if rows:
        lines += [*_table(header, rows), ""]
    for reject in body.get("rejected") or []:
        lines.append(
            f"- **Rejected:** {reject.get('region') or 'unknown region'} (node {reject.get('node')}): "
            f"{reject.get('reason') or 'no reason given'}"
        )
    optimizer = body.get("optimizer")
    if isinstance(optimizer, Mapping) and optimizer.get("name"):
        # the ledger's canonical JSON sorts the keys: the step size first, as the config lists it
        names = sorted(optimizer, key=lambda k: (k != "server_lr", k))
        settings = ", ".join(f"{k} {optimizer[k]}" for k in names if k != "name")
        stepped = f"server optimizer {optimizer['name']} ({settings}), step {body.get('optimizer_step')}"
    else:
        stepped = f"server step size {body.get('server_lr')}"
    lines.append(
        f"- **Result:** shared model {_short(body.get('global_sha256'))} (method {body.get('method')}, {stepped})."
    )
    sent_out = {e["body"].get("global_sha256") for e in dispatches}
    if sent_out and body.get("base_sha256") not in sent_out:
        lines.append(f"- ⚠ The round started from {_short(body.get('base_sha256'))}, not from the model sent out.")
    return lines


def _participant_row(
    part: Entry, body: Entry, sent: Mapping[str, list[tuple[str, Entry]]], given: set[str]
) -> list[str]:
    """One combined update, and where (if anywhere) its region recorded sending it."""
    weight = part.get("weight")
    return [
        str(part.get("region")),
        str(part.get("node")),
        _num(part.get("num_examples")),
        f"{100 * float(weight):.1f} %" if isinstance(weight, int | float) else "—",
        _short(part.get("sha256")),
        _match(part, body, sent.get(str(part.get("sha256")), []), given),
    ]


def _match(part: Entry, body: Entry, matches: Sequence[tuple[str, Entry]], given: set[str]) -> str:
    """Whether the update's payload hash appears in its own region's ledger, for the same run and round."""
    if not matches:
        return "⚠ not found" if str(part.get("region")) in given else "(no ledger of this region given)"
    where = ", ".join(f"{signer} line {e['_line']}" for signer, e in matches)
    signer, entry = matches[0]
    same = (entry["body"].get("run"), entry["body"].get("round")) == (body.get("run"), body.get("round"))
    if len(matches) == 1 and signer == part.get("region") and same:
        return f"yes, line {entry['_line']}"
    return f"⚠ {where}"
