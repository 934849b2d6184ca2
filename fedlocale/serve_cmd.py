"""``fedlocale export`` and ``fedlocale predict``: ship a region's model out of a run folder, and use it."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from common.errors import EXIT_BAD_INPUT, InputError

if TYPE_CHECKING:
    from runfolder.export import Exported

EXIT_ROWS_SKIPPED = 3


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_parsers(sub: Any) -> None:
    """Add the ``export`` and ``predict`` subcommands to the CLI's subparsers."""
    export = sub.add_parser(
        "export",
        help="export one region's adapter (or a merged model) with a model card",
        description="Write a folder that plain peft (or, with --merge, plain transformers) loads: adapter or model, "
        "tokenizer, labels.json, README.md (model card) and fedlocale.json. The adapter is the one the run chose "
        "for the region: personalized (RUN_DIR/personalized/REGION), its local-only one (RUN_DIR/local_only/REGION, "
        "with personalize.consider_local_only), else the global RUN_DIR/adapter.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (with summary.json)")
    export.add_argument("--region", required=True, help="a region of the run")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (new or empty)")
    export.add_argument(
        "--merge", action="store_true", help="fold the adapter into the base model: no peft needed to load it"
    )
    export.add_argument(
        "--adapter",
        choices=("global", "personalized", "local_only"),
        default=None,
        help="force this adapter (default: the one the run chose for the region: personalized, local_only, else "
        "global)",
    )
    export.add_argument(
        "--force", action="store_true", help="replace an earlier export in --out (never a folder that is not one)"
    )

    predict = sub.add_parser(
        "predict",
        help="label texts with an export or a run's adapter folder, one JSON line per row",
        description="INPUT is .jsonl (a JSON object per line with a string 'text'), .csv with a 'text' header, or "
        "- for stdin (a line starting with '{' is a JSON object, any other line is the text). Other fields pass "
        "through (line/label/probs get an input_ prefix). Output: one JSON line per good row, "
        '{"line": N, ..., "label": NAME, "probs": {NAME: P}}. Bad rows are listed on stderr as file:line: reason '
        "and skipped. Exit code 0: every row predicted; 3: some rows skipped; 2: nothing could be read.",
    )
    predict.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="export (merged or not) or RUN_DIR/adapter")
    predict.add_argument("input", metavar="INPUT", help=".jsonl, .csv, or - for stdin")
    predict.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="write here instead of stdout (never the INPUT)"
    )
    predict.add_argument("--force", action="store_true", help="replace an existing --out file")
    predict.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="texts per batch (32)")
    predict.add_argument(
        "--max-length",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens per text; default: the export's, or the run config's model.max_length, else 128",
    )


def cmd_export(args: argparse.Namespace) -> int:
    """``fedlocale export``."""
    from runfolder.export import export_run

    info = export_run(args.run_dir, args.region, args.out, merged=args.merge, adapter=args.adapter, force=args.force)
    what = "merged model" if args.merge else "LoRA adapter"
    print(f"wrote {args.out}: {what} of region {args.region}")
    print(f"  adapter: {info['adapter']['kind']} ({info['adapter']['reason']})")
    print(f"  base model: {info['base_model']['name']} ({info['base_model']['path']})")
    print(f"  model card: {args.out / 'README.md'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``fedlocale predict``: exit 0 if every row was predicted, 3 if some were skipped, 2 if none was read."""
    from runfolder.export import load_exported, stored_max_length
    from runfolder.predict import input_name, iter_inputs

    _check_out(args.out, args.input, args.force)  # before anything is read
    items = iter_inputs(args.input)
    # Read up to the first good row before loading the model: an unreadable input fails fast.
    head = _until_first_row(items)
    problems = [item for item in head if isinstance(item, str)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if len(problems) == len(head):
        print(f"fedlocale: {input_name(args.input)}: no row could be read; nothing predicted", file=sys.stderr)
        return EXIT_BAD_INPUT
    exported = load_exported(args.model_dir, args.max_length)
    stored = stored_max_length(args.model_dir)
    if args.max_length and stored and args.max_length != stored:
        print(f"fedlocale: note: --max-length {args.max_length}, the model was trained with {stored}", file=sys.stderr)
    done, skipped = _predict_all(args, exported, itertools.chain(head[-1:], items), skipped=len(problems))
    where = f" into {args.out}" if args.out else ""
    note = f"; skipped {skipped} bad row(s), listed above" if skipped else ""
    print(f"fedlocale: predicted {done} row(s){where}{note}", file=sys.stderr)
    return EXIT_ROWS_SKIPPED if skipped else 0


def _check_out(out: Path | None, source: str, force: bool) -> None:
    """Refuse an --out that is the input, a folder, or an existing file without --force (InputError, exit 2)."""
    if out is None:
        return
    if source != "-" and os.path.exists(source) and out.exists() and os.path.samefile(source, out):
        raise InputError(f"--out {out} is the input {source}; it would be replaced by the predictions")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name a file in it, e.g. {out / 'predictions.jsonl'}")
    if out.exists() and not force:
        raise InputError(f"--out {out} exists; pass --force to replace it, or choose another file")


def _until_first_row(items: Iterator[Any]) -> list[Any]:
    """The problems before the first good row, then that row; only problems if there is none."""
    head = []
    for item in items:
        head.append(item)
        if not isinstance(item, str):
            break
    return head


def _predict_all(args: argparse.Namespace, exported: Exported, items: Iterable[Any], skipped: int) -> tuple[int, int]:
    """Predict every good row of ``items`` into --out or stdout, listing bad ones; (predicted, skipped)."""
    from tqdm import tqdm

    from runfolder.predict import Row, predict_rows

    bar = tqdm(total=_count_lines(args.input), desc="predict", unit="row", file=sys.stderr, disable=None)
    bar.update(skipped)

    def good_rows() -> Iterator[Row]:
        nonlocal skipped
        for item in items:
            if isinstance(item, Row):
                yield item
                continue
            skipped += 1
            bar.update(1)
            bar.write(item, file=sys.stderr)

    model, tokenizer, labels, max_length = exported
    done = 0
    with _sink(args.out) as out:
        for result in predict_rows(
            model,
            tokenizer,
            labels,
            good_rows(),
            max_length=max_length,
            batch_size=args.batch_size,
            on_block=bar.update,
        ):
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            done += 1
    bar.total = bar.n  # the line count was an estimate (blank lines, multi-line CSV cells)
    bar.close()
    return done, skipped


@contextlib.contextmanager
def _sink(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a file that appears (whole) only if the block succeeds."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _count_lines(source: str) -> int | None:
    """Lines of an input file, for the progress bar's total; unknown for stdin or an unreadable file."""
    path = Path(source)
    if source == "-" or not path.is_file():
        return None
    with path.open("rb") as fh:
        lines = sum(1 for line in fh if line.strip())
    return max(0, lines - 1) if path.suffix == ".csv" else lines
