"""Turn a finished simulation run (summary.json + metrics.jsonl) into a Markdown report with PNG plots.

The report is read by people who did not run the simulation, so it explains the training modes in
plain words, shows sizes in MB and durations in minutes and seconds, and says out loud when a plot or
a baseline is missing instead of leaving a gap.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.keys import (
    CENTRALIZED,
    FEDERATED,
    LOCAL_ONLY,
    PERSONALIZED,
    SERVED_VS_LOCAL_ONLY,
    TEST,
    TRAIN,
    VAL,
)
from common.runfiles import (
    AB_PLOT,
    BYTES_PLOT,
    DP_PLOT,
    KEPT_CHECKPOINT,
    LABEL_MIX_FILE,
    LABEL_MIX_PLOT,
    LOSS_PLOT,
    MODES_PLOT,
    POOLED,
    REPORT_FILE,
    VAL_PLOT,
    Summary,
    write_atomic,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_label_mix", "write_report"]

MODES: tuple[str, ...] = (FEDERATED, PERSONALIZED, LOCAL_ONLY, CENTRALIZED)
MODE_LABELS: dict[str, str] = {
    FEDERATED: "Federated",
    PERSONALIZED: "Personalized",
    LOCAL_ONLY: "Local-only",
    CENTRALIZED: "Centralized",
}
# the timing keys that are not a mode's training (``{mode}_s``)
TIMING_LABELS: dict[str, str] = {
    "federation_loop_s": "Federation rounds (without start-up)",
    "baselines_s": "Both baselines, as the phase passed (side by side: less than their sum)",
    "personalize_s": "Personalization",
}
MODE_COLORS: dict[str, str] = {
    FEDERATED: "#1f77b4",
    PERSONALIZED: "#9467bd",
    LOCAL_ONLY: "#ff7f0e",
    CENTRALIZED: "#2ca02c",
}
METRIC_LABELS: dict[str, str] = {"macro_f1": "macro-F1", "accuracy": "accuracy", "loss": "loss"}
SCORE_METRICS: tuple[str, ...] = ("macro_f1", "accuracy")
SPLIT_ORDER: tuple[str, ...] = (TRAIN, VAL, TEST)

DPI = 110
MB = 1_000_000  # decimal megabytes, the unit network bills and download dialogs use
LOG_SCALE_RATIO = 50.0
# Ten colours times seven markers keep up to 70 regions apart on the line plots.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")

GLOSSARY = """**How to read this report.**

- *Macro-F1* is a score from 0 to 1 (higher is better) that averages the F1 score over the labels, so
  rare labels count as much as common ones. *Accuracy* is the share of test texts labelled correctly.
- *Federated*: one shared model; each region trains it on its own data and only the small LoRA adapter
  weights travel to the server, which averages them.
- *Local-only*: each region trains its own model on its own data and never shares anything.
- *Centralized*: all data pooled in one place. This is a reference point that is usually not allowed
  when data must stay in its country."""

Series = dict[str, dict[int, tuple[float, float]]]  # region -> round -> (value, num_examples)


# ---------------------------------------------------------------- public API


def write_report(out_dir: Path, summary: Summary, metrics: list[dict[str, Any]]) -> Path:
    """Write out_dir/report.md and its PNG plots; return the report path.

    ``summary`` is the run's summary.json and ``metrics`` the lines of metrics.jsonl. Every key
    is treated as optional: missing baselines become "n/a" cells, and a plot whose data is absent is
    skipped with a one-line note in the report (and any stale PNG of that name is removed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overall = _collect_overall(summary)
    sections = [
        _render_header(summary, overall),
        _render_glossary(),
        _render_results_table(summary, overall),
        _render_plots(out_dir, summary, metrics, overall),
        _render_label_mix(out_dir),
        _render_ab(out_dir, summary),
        *_render_served_vs_local_only(summary),
        _render_communication(summary),
        _render_timing(summary),
        _render_participation(summary),
        *_render_privacy(out_dir, summary, metrics),
    ]
    path = out_dir / REPORT_FILE
    write_atomic(path, "\n\n".join(sections) + "\n")
    return path


# ---------------------------------------------------------------- reading the inputs


def _section(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Return ``data[key]`` when it is a dict, else an empty dict."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _number(data: Mapping[str, Any], key: str) -> float | None:
    """Return ``data[key]`` as a finite float, or None when it is missing or not a number."""
    value = data.get(key)
    # bool is an int subclass; a stray True must not turn into a score of 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _mode_scores(block: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Return ``{mode: {metric: value}}`` for the modes present in one region (or overall) block."""
    scores: dict[str, dict[str, float]] = {}
    for mode in MODES:
        values = {m: v for m in SCORE_METRICS if (v := _number(_section(block, mode), m)) is not None}
        if values:
            scores[mode] = values
    return scores


def _collect_overall(summary: Summary) -> dict[str, dict[str, float]]:
    """Return overall scores per mode, recomputing a missing one from the regions.

    The recomputation uses the same test-size weighting as the runner, and only happens when every
    region has that score, so a baseline run on a subset of regions is never passed off as overall.
    """
    overall = _mode_scores(summary.overall)
    regions = list(summary.regions.values())
    for mode in MODES:
        for metric in SCORE_METRICS:
            if metric in overall.get(mode, {}):
                continue
            value = _weighted_region_score(regions, mode, metric)
            if value is not None:
                overall.setdefault(mode, {})[metric] = value
    return overall


def _weighted_region_score(regions: Sequence[Any], mode: str, metric: str) -> float | None:
    """Return the test-size weighted mean of one score over all regions, or None if any is missing."""
    pairs = []
    for raw in regions:
        block = raw if isinstance(raw, dict) else {}
        value, weight = _number(_section(block, mode), metric), _number(block, "num_test")
        if value is None or weight is None:
            return None
        pairs.append((value, weight))
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None


def _collect_series(metrics: Sequence[Mapping[str, Any]], split: str, metric: str) -> Series:
    """Return ``{region: {round: (value, num_examples)}}`` for one split; later lines win."""
    series: Series = {}
    for line in metrics:
        region, rnd, value = line.get("region"), _number(line, "round"), _number(line, metric)
        if line.get("split") != split or not isinstance(region, str) or rnd is None or value is None:
            continue
        series.setdefault(region, {})[int(rnd)] = (value, _number(line, "num_examples") or 0.0)
    return series


def _pick_metric(metrics: Sequence[Mapping[str, Any]], split: str) -> str | None:
    """Return macro_f1 when any line of the split has it, else accuracy when one has that."""
    for metric in SCORE_METRICS:
        if _collect_series(metrics, split, metric):
            return metric
    return None


def _weighted_mean_by_round(series: Series) -> dict[int, float]:
    """Return the example-weighted mean over regions for each round."""
    means: dict[int, float] = {}
    for rnd in sorted({r for points in series.values() for r in points}):
        points = [by_round[rnd] for by_round in series.values() if rnd in by_round]
        total = sum(w for _, w in points)
        # without example counts every region counts the same rather than dropping the round
        means[rnd] = sum(v * w for v, w in points) / total if total > 0 else sum(v for v, _ in points) / len(points)
    return means


def _per_round_entries(summary: Summary) -> list[dict[str, Any]]:
    """Return the per-round communication entries that carry a round number, sorted by round."""
    raw = summary.communication.get("per_round")
    by_round: dict[int, dict[str, Any]] = {}
    for entry in raw if isinstance(raw, list) else []:
        rnd = _number(entry, "round") if isinstance(entry, dict) else None
        if rnd is not None:
            by_round[int(rnd)] = entry  # a repeated round (e.g. a resumed run) keeps its last entry
    return [by_round[r] for r in sorted(by_round)]


def _participant_count(entry: Mapping[str, Any], fallback: int) -> int:
    """Return how many regions took part in a round, or ``fallback`` when it was not recorded."""
    participants = entry.get("participants")
    return len(participants) if isinstance(participants, list) else fallback


# ---------------------------------------------------------------- formatting


def _fmt_score(value: float | None) -> str:
    """Format a 0-1 score the same way everywhere, so the table and the prose agree."""
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_count(value: float | None) -> str:
    """Format an example count with thousands separators."""
    return "n/a" if value is None else f"{int(value):,}"


def _fmt_bytes(value: float) -> str:
    """Format a byte count with a unit a non-engineer recognises, plus the exact figure."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:,.2f} {unit} ({int(value):,} bytes)"
    return f"{int(value):,} bytes"


def _fmt_mb(value: float) -> str:
    """Format a byte count in MB."""
    return f"{value / MB:,.2f} MB"


def _fmt_duration(seconds: float) -> str:
    """Format seconds as s, min s or h min, whichever reads naturally."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _md_cell(text: str) -> str:
    """Escape a value for a Markdown table cell."""
    return text.replace("|", "\\|")


# ---------------------------------------------------------------- report sections


def _render_header(summary: Summary, overall: Mapping[str, Mapping[str, float]]) -> str:
    """Return the title and the one-paragraph summary of the run."""
    run = summary.run
    name = run.get("name") or "unnamed run"
    regions = summary.regions
    sentences = [
        (
            f"This run trained one shared text classifier across {len(regions)} regions "
            "(countries) without moving their data out of the country."
        )
    ]
    sentences += _describe_rounds(run)
    sentences += _describe_kept_checkpoints(regions)
    sentences += _describe_setup(run)
    return f"# Federated run report: {name}\n\n" + " ".join(sentences) + "\n\n" + _describe_overall(overall)


def _describe_rounds(run: Mapping[str, Any]) -> list[str]:
    """Return sentences about how many rounds ran, the best round and early stopping."""
    done, planned, best = _number(run, "rounds_done"), _number(run, "rounds_planned"), _number(run, "best_round")
    sentences = []
    if done is not None:
        of_planned = f" of {int(planned)} planned" if planned is not None else ""
        sentences.append(f"It ran **{int(done)}{of_planned} rounds**.")
    stopped = run.get("stopped_early")
    if isinstance(stopped, bool):
        sentences.append(
            "Training stopped early, before all planned rounds were used."
            if stopped
            else "Training did not stop early."
        )
    validated = run.get("validated_rounds")
    if isinstance(validated, list) and validated and done is not None and len(validated) < int(done):
        head = ", ".join(str(r) for r in validated[:-1])
        listed = f"{head} and {validated[-1]}" if head else str(validated[-1])
        sentences.append(
            f"The global model was validated after rounds {listed} only (`early_stopping.every`), the baselines "
            "at as many checkpoints."
        )
    if best is not None:
        sentences.append(
            f"The best global model came from **round {int(best)}**; the federated test scores below use that model."
        )
    return sentences


def _describe_kept_checkpoints(regions: Mapping[str, Any]) -> list[str]:
    """Return a sentence on which validation checkpoint each baseline kept (a simulation's summary records it), so
    that a reader sees best compared with best."""
    kept: dict[str, list[int]] = {}
    of: dict[str, int] = {}
    for block in regions.values():
        for mode in (CENTRALIZED, LOCAL_ONLY):
            scores = block.get(mode) if isinstance(block, dict) else None
            entry = scores.get(KEPT_CHECKPOINT) if isinstance(scores, dict) else None
            # a summary.json from before the record, or edited by hand, is read as far as it makes sense
            if isinstance(entry, dict) and isinstance(entry.get("number"), int) and isinstance(entry.get("of"), int):
                kept.setdefault(mode, []).append(entry["number"])
                of[mode] = max(of.get(mode, 0), entry["of"])
    parts = []
    if CENTRALIZED in kept:
        parts.append(f"the centralized model kept its checkpoint {kept[CENTRALIZED][0]} of {of[CENTRALIZED]}")
    if LOCAL_ONLY in kept:
        low, high = min(kept[LOCAL_ONLY]), max(kept[LOCAL_ONLY])
        which = f"checkpoint {low}" if low == high else f"checkpoints {low} to {high}"
        parts.append(f"the regions' local-only models kept {which} of {of[LOCAL_ONLY]}")
    if not parts:
        return []
    return [
        "Each baseline kept its best validation checkpoint as the federation kept its best round: "
        + "; ".join(parts)
        + "."
    ]


def _describe_setup(run: Mapping[str, Any]) -> list[str]:
    """Return one sentence naming the model, aggregation and seed, when known."""
    parts = [
        f"{label}: `{run[key]}`"
        for label, key in (("Model", "model"), ("aggregation", "aggregation"))
        if run.get(key) not in (None, "")
    ]
    optimizer = run.get("optimizer")
    if isinstance(optimizer, Mapping) and optimizer.get("name"):
        settings = ", ".join(f"{k} {v:g}" for k, v in optimizer.items() if k != "name" and isinstance(v, int | float))
        parts.append(f"server optimizer: `{optimizer['name']}`" + (f" ({settings})" if settings else ""))
    if run.get("seed") is not None:
        parts.append(f"seed {run['seed']}")
    return [", ".join(parts) + "."] if parts else []


def _describe_overall(overall: Mapping[str, Mapping[str, float]]) -> str:
    """Return the sentence comparing overall macro-F1 of the three modes."""
    metric = "macro_f1" if any("macro_f1" in s for s in overall.values()) else "accuracy"
    found = [(mode, overall[mode][metric]) for mode in MODES if metric in overall.get(mode, {})]
    if not found:
        return "No overall test scores were recorded."
    label = METRIC_LABELS[metric]
    first_mode, first_value = found[0]
    parts = [f"{MODE_LABELS[first_mode]}: {_fmt_score(first_value)} {label} overall"]
    parts += [f"{MODE_LABELS[mode].lower()} {_fmt_score(value)}" for mode, value in found[1:]]
    return ", ".join(parts) + "."


def _render_glossary() -> str:
    """Return a short plain-language explanation of the scores and modes."""
    return GLOSSARY


def _render_results_table(summary: Summary, overall: Mapping[str, Mapping[str, float]]) -> str:
    """Return the per-region results table with an overall row and the best mode in bold."""
    regions = summary.regions
    rows = [(name, block if isinstance(block, dict) else {}) for name, block in regions.items()]
    modes = [m for m in MODES if m in overall or any(m in _mode_scores(b) for _, b in rows)]
    if not modes:
        return "## Results per region\n\nNo test scores were recorded."
    header = ["Region", "Train examples", "Test examples"]
    header += [f"{MODE_LABELS[m]} {METRIC_LABELS[k]}" for m in modes for k in ("accuracy", "macro_f1")]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, block in rows:
        counts = (_number(block, "num_train"), _number(block, "num_test"))
        lines.append(_table_row(_md_cell(name), counts, _mode_scores(block), modes))
    lines.append(_table_row("**overall**", _overall_counts(rows), overall, modes))
    note = "The overall row weights each region by its number of test examples."
    pooled = [(m, v) for m in modes if isinstance(v := summary.overall.get(m, {}).get(POOLED), (int, float))]
    if pooled:
        # under strong label skew a region's test split may hold one class, where macro-F1 is degenerate
        note += (
            " Macro-F1 of all regions' test examples pooled (each region predicted by its own model of the mode; "
            "the fair comparison when regions hold few classes): "
            + ", ".join(f"{MODE_LABELS[m].lower()} {_fmt_score(float(v))}" for m, v in pooled)
            + "."
        )
    if len(modes) > 1:
        note = (
            "Bold marks the best mode in each row by macro-F1 (by accuracy when macro-F1 is missing); "
            "n/a means that mode was not run. " + note
        )
    return "## Results per region\n\n" + "\n".join(lines) + "\n\n" + note


def _overall_counts(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[float | None, float | None]:
    """Return total train and test examples, or None for a column with any unknown count."""
    totals: list[float | None] = []
    for key in ("num_train", "num_test"):
        values = [_number(block, key) for _, block in rows]
        totals.append(sum(v for v in values if v is not None) if values and None not in values else None)
    return totals[0], totals[1]


def _table_row(
    label: str,
    counts: tuple[float | None, float | None],
    scores: Mapping[str, Mapping[str, float]],
    modes: Sequence[str],
) -> str:
    """Return one Markdown table row, bolding the cells of the best mode."""
    best = _best_modes(scores)
    cells = [label, _fmt_count(counts[0]), _fmt_count(counts[1])]
    for mode in modes:
        for metric in ("accuracy", "macro_f1"):
            text = _fmt_score(scores.get(mode, {}).get(metric))
            cells.append(f"**{text}**" if mode in best and text != "n/a" else text)
    return "| " + " | ".join(cells) + " |"


def _best_modes(scores: Mapping[str, Mapping[str, float]]) -> set[str]:
    """Return the modes tied for the best shown score; empty when there is nothing to compare."""
    for metric in SCORE_METRICS:
        # compare what the reader sees, so two cells that print the same are bolded together
        shown = {mode: round(s[metric], 3) for mode, s in scores.items() if metric in s}
        if len(shown) >= 2:
            top = max(shown.values())
            return {mode for mode, value in shown.items() if value == top}
    return set()


def _render_plots(
    out_dir: Path,
    summary: Summary,
    metrics: Sequence[Mapping[str, Any]],
    overall: Mapping[str, Mapping[str, float]],
) -> str:
    """Draw every plot that has data and return the Plots section linking them."""
    plots: list[tuple[str, str, Callable[[Path], bool], str, str]] = [
        (
            VAL_PLOT,
            "Validation score by round",
            lambda p: _plot_val(p, summary, metrics),
            "How well the shared model did on each region's validation data after each round.",
            "there are no validation lines in metrics.jsonl",
        ),
        (
            MODES_PLOT,
            "Federated vs. baselines per region",
            lambda p: _plot_modes(p, summary, overall),
            "Final test score of each training mode, per region and overall.",
            "no region has a test score",
        ),
        (
            BYTES_PLOT,
            "Data sent per round",
            lambda p: _plot_bytes(p, summary),
            "Traffic between the regions and the server, compared with sending the full model.",
            "per-round communication was not recorded",
        ),
        (
            LOSS_PLOT,
            "Training loss by round",
            lambda p: _plot_train_loss(p, summary, metrics),
            "Local training loss of each region per round (lower is better).",
            "there are no training-loss lines in metrics.jsonl",
        ),
    ]
    parts = ["## Plots"]
    for filename, title, draw, caption, reason in plots:
        path = out_dir / filename
        if draw(path):
            parts.append(f"### {title}\n\n{caption}\n\n![{title}]({filename})")
        else:
            # a PNG left over from an earlier run in the same folder would contradict the report
            path.unlink(missing_ok=True)
            parts.append(f"_Skipped plot `{filename}` ({title.lower()}): {reason}._")
    return "\n\n".join(parts)


def _render_label_mix(out_dir: Path) -> str:
    """The Label mix section from ``label_mix.json`` (a simulation's regions): a table of each region's label
    shares per split and a stacked-bar plot of its train split. A deployment records none: the section says so."""
    plot = out_dir / LABEL_MIX_PLOT
    try:
        loaded = json.loads((out_dir / LABEL_MIX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        loaded = None
    record: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    regions = _section(record, "regions")
    mix = {name: _section(entry, TRAIN) for name, entry in regions.items() if isinstance(entry, dict)}
    if not mix or not all(isinstance(n, (int, float)) for counts in mix.values() for n in counts.values()):
        plot.unlink(missing_ok=True)
        return (
            "## Label mix per region\n\n_Not recorded: only a simulation records it (`label_mix.json`); a "
            "deployment's server learns nothing about a region's data._"
        )
    labels = sorted({label for counts in mix.values() for label in counts})
    lines = ["## Label mix per region", ""]
    split = record.get("split")
    if isinstance(split, dict):
        params = _section(split, "parameters")
        how = ", ".join(f"{k} {v}" for k, v in params.items() if v is not None)
        lines += [f"Regions made by `fedlocale data split` of `{_md_cell(str(split.get('source')))}` ({how}).", ""]
    lines += [
        "Share of each label in each region's splits (examples in brackets), as the simulation loaded them.",
        "",
        "| region | " + " | ".join(f"{s} ({', '.join(labels)})" for s in SPLIT_ORDER) + " |",
        "|---|" + "---|" * len(SPLIT_ORDER),
    ]
    for name, entry in regions.items():
        cells = []
        for split_name in SPLIT_ORDER:
            counts = _section(entry, split_name)
            total = sum(v for v in counts.values() if isinstance(v, (int, float)))
            shares = " / ".join(f"{counts.get(label, 0) / total:.0%}" for label in labels) if total else "-"
            cells.append(f"{shares} ({total:g})")
        lines.append(f"| {_md_cell(name)} | " + " | ".join(cells) + " |")
    plot_label_mix(
        plot,
        {name: {k: int(v) for k, v in counts.items()} for name, counts in mix.items()},
        "Label mix of each region's train split",
    )
    lines += ["", f"![Label mix of each region's train split]({LABEL_MIX_PLOT})"]
    return "\n".join(lines)


def plot_label_mix(path: Path, mix: Mapping[str, Mapping[str, int]], title: str) -> None:
    """A stacked bar per region of its label shares (``mix``: region -> label -> count), its size above it."""
    import numpy as np

    names = list(mix)
    labels = sorted({label for counts in mix.values() for label in counts})
    fig, ax = new_figure(max(6.0, 0.7 * len(names) + 2), 4.5)
    totals = [sum(mix[n].values()) for n in names]
    bottom = np.zeros(len(names))
    for i, label in enumerate(labels):
        shares = np.array([mix[n].get(label, 0) / t if t else 0.0 for n, t in zip(names, totals, strict=True)])
        ax.bar(names, shares, bottom=bottom, label=label, color=PALETTE[i % len(PALETTE)])
        bottom += shares
    for x, total in enumerate(totals):
        ax.text(x, 1.01, str(total), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.08)
    _style(ax, title, "region (examples above each bar)", "share of examples")
    ax.tick_params(axis="x", labelrotation=45, labelsize=9)
    _legend_outside(ax)
    save_figure(fig, path)


def _render_communication(summary: Summary) -> str:
    """Return the Communication section: sizes, adapter/full ratio and traffic totals."""
    comm = summary.communication
    adapter, full = _number(comm, "adapter_bytes"), _number(comm, "full_model_bytes")
    entries = _per_round_entries(summary)
    lines = []
    if adapter is not None:
        lines.append(f"- Adapter sent per region and direction: {_fmt_bytes(adapter)}")
    if full is not None:
        lines.append(f"- Full model size: {_fmt_bytes(full)}")
    if adapter is not None and full:
        lines.append(
            f"- The adapter is **{100 * adapter / full:.2f}%** of the full model ({full / adapter:,.0f}x smaller)."
            if adapter
            else "- The adapter is empty."
        )
    for key, label in (
        ("bytes_up", "Total uploaded (regions to server)"),
        ("bytes_down", "Total downloaded (server to regions)"),
    ):
        total = _traffic_total(comm, entries, key)
        if total is not None:
            lines.append(f"- {label}: {_fmt_mb(total)}")
    if full is not None and entries:
        fallback = len(summary.regions)
        full_total = sum(full * _participant_count(e, fallback) for e in entries)
        lines.append(f"- Sending the full model instead would have taken {_fmt_mb(full_total)} in each direction.")
    body = "\n".join(lines) if lines else "No communication figures were recorded."
    return "## Communication\n\n" + body


def _traffic_total(comm: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Return the recorded total for ``key``, or the sum of the per-round figures when it is missing."""
    total = _number(comm, f"{key}_total")
    if total is not None:
        return total
    values = [v for e in entries if (v := _number(e, key)) is not None]
    return sum(values) if values else None


def _render_timing(summary: Summary) -> str:
    """Return the Timing section as a small table of wall-clock times."""
    timing = summary.timing
    rows = [(key, value) for key in timing if (value := _number(timing, key)) is not None]
    if not rows:
        return "## Timing\n\nNo timing was recorded."
    lines = ["| What | Wall-clock time | Seconds |", "|---|---:|---:|"]
    for key, seconds in rows:
        mode = key.removesuffix("_s")
        label = f"{MODE_LABELS[mode]} training" if mode in MODE_LABELS else TIMING_LABELS.get(key, _md_cell(key))
        lines.append(f"| {label} | {_fmt_duration(seconds)} | {seconds:,.1f} |")
    return "## Timing\n\n" + "\n".join(lines)


def _render_participation(summary: Summary) -> str:
    """Return the section listing regions that missed rounds."""
    return "## Participation\n\n" + "\n".join(_participation_lines(summary))


def _participation_lines(summary: Summary) -> list[str]:
    """Return one line per region that missed a round, or a single line saying none did."""
    recorded = [e for e in _per_round_entries(summary) if isinstance(e.get("participants"), list)]
    if not recorded:
        return ["Which regions took part in each round was not recorded."]
    missed: dict[str, list[int]] = {name: [] for name in summary.regions}
    for entry in recorded:
        for name, rounds in missed.items():
            if name not in entry["participants"]:
                rounds.append(int(_number(entry, "round") or 0))
    lines = [
        f"- **{name}** missed {len(rounds)} of {len(recorded)} rounds "
        f"(round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))})"
        for name, rounds in missed.items()
        if rounds
    ]
    return lines or ["Every region took part in every round."]


# ---------------------------------------------------------------- plots


def new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, Axes]:
    """Return a fresh figure and axes drawn with the headless Agg backend."""
    import matplotlib

    # the runner has no display; choose the backend here so importing this module stays side-effect free
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def save_figure(fig: Figure, path: Path) -> None:
    """Save the figure as PNG and free it, so a long sweep does not pile up open figures."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())  # a reader never sees half a plot, an old one stays until replaced


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Apply title and axis labels in the sizes used by every plot."""
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(labelsize=10)


def _set_round_ticks(ax: Axes, rounds: Sequence[int]) -> None:
    """Put a tick on every round when there are few of them, else let matplotlib pick integers."""
    from matplotlib.ticker import MaxNLocator

    if len(rounds) <= 25:
        ax.set_xticks(list(rounds))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        # without this the locator may add an empty round 0 or a round past the last one
        ax.set_xlim(min(rounds) - 0.6, max(rounds) + 0.6)


def _legend_outside(ax: Axes) -> None:
    """Place the legend right of the axes, where it never hides a line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)


def _region_order(summary: Summary, series: Series) -> list[str]:
    """Return regions in summary order followed by any that only appear in metrics."""
    names = [n for n in summary.regions if n in series]
    return names + sorted(n for n in series if n not in names)


def _plot_lines(ax: Axes, series: Series, names: Sequence[str]) -> list[int]:
    """Draw one line per region and return every round that appears."""
    for i, name in enumerate(names):
        rounds = sorted(series[name])
        ax.plot(
            rounds,
            [series[name][r][0] for r in rounds],
            label=name,
            color=PALETTE[i % len(PALETTE)],
            marker=MARKERS[i % len(MARKERS)],
            linewidth=1.6,
            markersize=5,
        )
    return sorted({r for points in series.values() for r in points})


def _plot_val(path: Path, summary: Summary, metrics: Sequence[Mapping[str, Any]]) -> bool:
    """Draw validation score of the global model by round; return False when there is no data."""
    metric = _pick_metric(metrics, VAL)
    if metric is None:
        return False
    series = _collect_series(metrics, VAL, metric)
    fig, ax = new_figure()
    rounds = _plot_lines(ax, series, _region_order(summary, series))
    if len(series) > 1:
        mean = _weighted_mean_by_round(series)
        ax.plot(
            list(mean),
            list(mean.values()),
            color="black",
            linestyle="--",
            linewidth=2.2,
            label="Mean (weighted by examples)",
        )
    best = _number(summary.run, "best_round")
    if best is not None:
        ax.axvline(best, color="grey", linestyle=":", linewidth=1.5, label=f"Best round ({int(best)})")
    label = METRIC_LABELS[metric]
    _style(ax, f"Validation {label} of the global model", "Round", f"Validation {label}")
    _set_round_ticks(ax, rounds)
    _legend_outside(ax)
    save_figure(fig, path)
    return True


def _render_privacy(out_dir: Path, summary: Summary, metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The differential privacy section, when any region's node trained with DP-SGD: epsilon spent per region
    and round (plotted) and, plainly, which served models the guarantee covers. Nothing without DP."""
    blocks = summary.regions.items()
    regions = {name: block["dp"] for name, block in blocks if isinstance(block, dict) and "dp" in block}
    path = out_dir / DP_PLOT
    if not regions:
        path.unlink(missing_ok=True)
        return []
    lines = [
        "## Differential privacy",
        "",
        "Regions whose policy requires DP trained with record-level DP-SGD (each training example's gradient "
        "clipped, Gaussian noise per step, Poisson sampling; Opacus's accountant). The federated (global) model "
        "is covered: it is post-processing of the DP updates. A personalized model is covered only when it was "
        "trained under `personalize.dp` (DP-SGD again, charged to the same budget: the epsilon below is then "
        "the total after personalization); otherwise it trained on the region's data again without DP and is "
        "**not** covered. Evaluation metrics and the train loss a node reports are not covered either.",
        "",
        "| region | epsilon spent | delta | federated model covered | personalized model covered | "
        "served model covered |",
        "|---|---|---|---|---|---|",
    ]
    for name, dp in regions.items():
        covers = dp.get("covers", {})
        block = summary.regions.get(name, {})
        served = _served_covered(block.get(PERSONALIZED) if isinstance(block, dict) else None, covers)
        spent = f"{dp.get('epsilon_spent', float('nan')):.3g}"
        if "epsilon_rounds" in dp:
            spent += f" ({dp['epsilon_rounds']:.3g} after the rounds)"
        lines.append(
            f"| {_md_cell(name)} | {spent} | {dp.get('delta')} | "
            f"{'yes' if covers.get(FEDERATED) else 'no'} | {'yes' if covers.get(PERSONALIZED) else 'no'} | "
            f"{served} |"
        )
    series = _collect_series(metrics, TRAIN, "dp_epsilon")
    if series:
        fig, ax = new_figure()
        rounds = _plot_lines(ax, series, _region_order(summary, series))
        _style(ax, "Privacy spent per region", "Round", "epsilon spent (cumulative)")
        _set_round_ticks(ax, rounds)
        _legend_outside(ax)
        save_figure(fig, path)
        lines += ["", f"![Privacy spent per region]({DP_PLOT})"]
    return ["\n".join(lines)]


def _served_covered(personalized: object, covers: Mapping[str, Any]) -> str:
    """Whether the model a DP region serves is covered, in words: the global one (no personalization, or the
    choice kept it) is; the personalized one is when ``covers`` says so."""
    if not isinstance(personalized, dict):
        return "yes if it serves the global model (no personalization recorded here)"
    chosen = personalized.get("chosen")
    if chosen == LOCAL_ONLY:
        # consider_local_only: trained on the region's data without DP (personalize.dp refuses the two together)
        return "**no** (local-only model, trained without DP)"
    if chosen != PERSONALIZED:
        return "yes (global model chosen)"
    return (
        "yes (personalized, under personalize.dp)" if covers.get(PERSONALIZED) else "**no** (personalized without DP)"
    )


def _plot_train_loss(path: Path, summary: Summary, metrics: Sequence[Mapping[str, Any]]) -> bool:
    """Draw each region's local training loss by round; return False when there is no data."""
    series = _collect_series(metrics, TRAIN, "loss")
    if not series:
        return False
    fig, ax = new_figure()
    rounds = _plot_lines(ax, series, _region_order(summary, series))
    _style(ax, "Local training loss per region", "Round", "Training loss")
    _set_round_ticks(ax, rounds)
    _legend_outside(ax)
    save_figure(fig, path)
    return True


def _plot_modes(path: Path, summary: Summary, overall: Mapping[str, Mapping[str, float]]) -> bool:
    """Draw grouped bars of each mode's test score per region and overall; False when there is none."""
    groups = [(str(n), _mode_scores(b if isinstance(b, dict) else {})) for n, b in summary.regions.items()]
    groups.append(("overall", {mode: dict(scores) for mode, scores in overall.items()}))
    metric = next((m for m in SCORE_METRICS if any(m in s for _, g in groups for s in g.values())), None)
    modes = [m for m in MODES if any(metric in g.get(m, {}) for _, g in groups)]
    if metric is None or not modes:
        return False
    fig, ax = new_figure(width=max(8.0, 1.1 * len(groups) * max(len(modes), 2) / 2 + 3))
    width = 0.8 / max(len(modes), 2)  # a lone mode gets half-width bars, not one solid block
    for i, mode in enumerate(modes):
        values = [g.get(mode, {}).get(metric) for _, g in groups]
        xs = [x + (i - (len(modes) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=MODE_LABELS[mode], color=MODE_COLORS[mode])
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=8, padding=2)
    # a divider makes clear that "overall" is a summary, not one more region
    ax.axvline(len(groups) - 1.5, color="grey", linewidth=1, linestyle=":")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        [name for name, _ in groups], rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center"
    )
    ax.set_ylim(0, 1.12)
    label = METRIC_LABELS[metric]
    _style(ax, f"Test {label} by training mode", "Region", f"Test {label}")
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15 if len(groups) <= 6 else -0.3),
        ncol=len(modes),
        fontsize=9,
        frameon=False,
    )
    save_figure(fig, path)
    return True


def _plot_bytes(path: Path, summary: Summary) -> bool:
    """Draw bytes up/down per round against the full-model equivalent; False when not recorded."""
    entries = [
        e
        for e in _per_round_entries(summary)
        if _number(e, "bytes_up") is not None or _number(e, "bytes_down") is not None
    ]
    if not entries:
        return False
    comm = summary.communication
    rounds = [int(_number(e, "round") or 0) for e in entries]
    fig, ax = new_figure()
    for offset, key, label, color in (
        (-0.2, "bytes_up", "Sent by regions (up)", "#1f77b4"),
        (0.2, "bytes_down", "Sent by server (down)", "#ff7f0e"),
    ):
        ax.bar(
            [r + offset for r in rounds],
            [(_number(e, key) or 0.0) / MB for e in entries],
            0.38,
            label=label,
            color=color,
        )
    ratio = _draw_full_model_line(ax, comm, entries, rounds, len(summary.regions))
    # on a linear axis a 100x smaller adapter bar would be a flat line under the full-model line
    log_scale = ratio is not None and ratio > LOG_SCALE_RATIO
    if log_scale:
        _use_log_axis(ax)
    _style(ax, _bytes_title(comm), "Round", "MB per round" + (" (log scale)" if log_scale else ""))
    _set_round_ticks(ax, rounds)
    _legend_outside(ax)
    save_figure(fig, path)
    return True


def _draw_full_model_line(
    ax: Axes, comm: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], rounds: Sequence[int], fallback: int
) -> float | None:
    """Draw what full models would cost per round; return full/sent ratio, or None if unknown."""
    full = _number(comm, "full_model_bytes")
    if full is None:
        return None
    values = [full * _participant_count(e, fallback) / MB for e in entries]
    # steps between rounds so a change in participants shows up as a change in the line
    edges = [rounds[0] - 0.5] + [(a + b) / 2 for a, b in itertools.pairwise(rounds)] + [rounds[-1] + 0.5]
    ax.stairs(
        values,
        edges,
        baseline=None,
        color="#d62728",
        linestyle="--",
        linewidth=2,
        label="Full model instead\n(size x participants)",
    )
    adapter = _number(comm, "adapter_bytes")
    if adapter:
        return full / adapter
    sent = max((_number(e, k) or 0.0) for e in entries for k in ("bytes_up", "bytes_down")) / MB
    return max(values) / sent if sent > 0 else None


def _use_log_axis(ax: Axes) -> None:
    """Switch the y axis to log scale with plain tick labels (1, 10, 1,000) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:,.0f}" if value >= 1 else f"{value:g}"))


def _bytes_title(comm: Mapping[str, Any]) -> str:
    """Return the bytes plot title, stating the adapter's share of the full model when both are known."""
    adapter, full = _number(comm, "adapter_bytes"), _number(comm, "full_model_bytes")
    if adapter is None or not full:
        return "Data sent per round"
    return f"Data sent per round (adapter = {100 * adapter / full:.2g}% of the full model)"


# ---------------------------------------------------------------- personalization A/B


def _ab_rows(summary: Summary) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for name, region in sorted(summary.regions.items()):
        entry = region.get(PERSONALIZED) if isinstance(region, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("ab"), dict):
            rows.append((name, entry))
    return rows


def _render_ab(out_dir: Path, summary: Summary) -> str:
    """The A/B section: per region, the served model against the global and local-only ones, with 95 % CIs."""
    rows = _ab_rows(summary)
    path = out_dir / AB_PLOT
    if not rows:
        path.unlink(missing_ok=True)
        return "## Personalization (A/B)\n\nNo personalization in this run (`personalize.mode: none`)."
    lines = [
        "## Personalization (A/B)",
        "",
        "Each region adapted the global model on its own node (nothing was sent; with `dual`, a personal LoRA "
        "trained alongside the global one in the rounds was stacked onto it after them) and then chose on its "
        "validation data which model to serve (`personalize.choice`; by default the personalized one unless the "
        "global one is better there with 95 % confidence; with `personalize.consider_local_only` the region's "
        "local-only model too, served only if validation prefers it by the same rule or by "
        "`personalize.local_only_choice`). *From round* is the round "
        "whose global adapter "
        "personalization started from (`personalize.start`: the best round or the last). The table "
        "compares the model each region serves with the others on the region's test data: the difference in "
        "macro-F1 and its 95 % paired-bootstrap interval. An interval that stays above 0 means the served model is "
        "better beyond chance.",
        "",
        "| Region | Serves | From round | vs federated | vs local-only |",
        "|---|---|---:|---:|---:|",
    ]
    for name, entry in rows:
        cells = []
        for key in (f"vs_{FEDERATED}", f"vs_{LOCAL_ONLY}"):
            d = entry["ab"].get(key)
            cells.append(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if isinstance(d, dict) else "n/a")
        start = entry.get("start_round", "n/a")
        lines.append(f"| {name} | {entry.get('chosen', '?')} | {start} | {cells[0]} | {cells[1]} |")
    _plot_ab(path, rows)
    lines += ["", f"![Difference in macro-F1 with 95 % interval]({AB_PLOT})"]
    return "\n".join(lines)


def _render_served_vs_local_only(summary: Summary) -> list[str]:
    """Per region, the model it serves against its local-only baseline on test, when that baseline ran: the
    difference in macro-F1, its 95 % paired-bootstrap interval and whether the interval reaches 0 (the target
    that no region is better off alone). No section without such entries."""
    rows = [
        (name, region[SERVED_VS_LOCAL_ONLY])
        for name, region in sorted(summary.regions.items())
        if isinstance(region, dict) and isinstance(region.get(SERVED_VS_LOCAL_ONLY), dict)
    ]
    if not rows:
        return []
    below = [name for name, entry in rows if not entry.get("reaches_zero", True)]
    lines = [
        "## Served model vs local-only",
        "",
        "Each region's served model against the model it could have trained alone (the local-only baseline) on "
        "the region's test data: served − local-only macro-F1 with its 95 % paired-bootstrap interval. An interval "
        "entirely below 0 means the region would have done better alone, beyond chance. "
        + (
            f"**{len(below)} of {len(rows)} region(s) below 0: {', '.join(below)}.**"
            if below
            else f"In all {len(rows)} region(s) the interval reaches 0 or above."
        ),
        "",
        "| Region | Serves | served − local-only [95 % CI] | reaches 0 |",
        "|---|---|---:|---|",
    ]
    for name, entry in rows:
        interval = f"{entry['diff']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"
        reaches = "yes" if entry.get("reaches_zero", True) else "**no**"
        lines.append(f"| {name} | {entry.get('served', '?')} | {interval} | {reaches} |")
    return ["\n".join(lines)]


def _plot_ab(path: Path, rows: list[tuple[str, dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    series = ((FEDERATED, "vs federated"), (LOCAL_ONLY, "vs local-only"))
    for offset, (mode, label) in enumerate(series):
        key, color = f"vs_{mode}", MODE_COLORS[mode]
        ys, xs, err = [], [], []
        for i, (_, entry) in enumerate(rows):
            d = entry["ab"].get(key)
            if isinstance(d, dict):
                ys.append(i + 0.15 * (1 - 2 * offset))
                xs.append(d["diff"])
                err.append((d["diff"] - d["low"], d["high"] - d["diff"]))
        if xs:
            ax.errorbar(xs, ys, xerr=list(zip(*err, strict=True)), fmt="o", color=color, label=label, capsize=3)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel("macro-F1 of the served model minus the other (95 % paired bootstrap)")
    ax.legend(loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
