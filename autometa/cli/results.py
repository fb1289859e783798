"""The commands on a stored study's results: ``leaderboard`` (terminal, CSV, Markdown),
``report`` (HTML), ``predict`` and ``export`` (a trial's model back)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autometa.cli.common import (
    cache_dir_flag,
    console,
    data_root_flag,
    plain,
    plugin_option_flag,
    plugin_options,
    quiet_optuna,
    report_flags,
)
from autometa.config import DEFAULT_STORAGE, check_writable_dir
from autometa.errors import redact

if TYPE_CHECKING:
    from autometa.leaderboard import Leaderboard


def add_parsers(sub: Any) -> None:
    """``leaderboard``, ``report``, ``predict`` and ``export``."""
    board = sub.add_parser("leaderboard", help="show the leaderboard of a stored study")
    board.add_argument("study", help="study name")
    _stored_study_flags(board)
    board.add_argument("--top-k", type=int, help="best trials scored on meta-test")
    report_flags(board)
    add_report_parser(sub)
    add_model_parsers(sub)


def _stored_study_flags(parser: argparse.ArgumentParser) -> None:
    """Where this machine finds a stored study: its storage, artifact store, data, device."""
    parser.add_argument("--storage", help="Optuna storage URL (default: $AUTOMETA_STORAGE, "
                                          f"else {DEFAULT_STORAGE})")
    parser.set_defaults(storage_default=DEFAULT_STORAGE)
    parser.add_argument("--artifacts", help="the artifact store as this machine reaches it "
                                            "(default: the study's)")
    data_root_flag(parser)
    cache_dir_flag(parser)
    parser.add_argument("--device", help="torch device to score and predict on (default: "
                                         "the study's)")


def add_report_parser(sub: Any) -> None:
    """``report``: one HTML file of one or several stored studies (autometa.report)."""
    report = sub.add_parser(
        "report", help="write an offline HTML report of one or several studies",
        description="Write DIR/<study>.html (one study) or DIR/report.html (several: one per "
                    "task, compared by average rank): leaderboard, figures, failed trials "
                    "and how to reproduce the search. Opens offline; runs no script.")
    report.add_argument("studies", nargs="+", metavar="STUDY", help="study name(s)")
    report.add_argument("--out", type=Path, default=Path("autometa-reports"),
                        help="directory for the HTML file (default autometa-reports)")
    report.add_argument("--format", default="html",
                        help="html (default), or a report format a plugin registers (see "
                             "`autometa plugins`)")
    plugin_option_flag(report)
    _stored_study_flags(report)
    report.add_argument("--top-k", type=int, help="best trials scored on meta-test")


def add_model_parsers(sub: Any) -> None:
    """``predict`` and ``export``: a trial's model back (autometa.predictor)."""
    predict = sub.add_parser(
        "predict", help="predict new inputs with a trial's adapted model",
        description="Adapt the model of the trial ranked --rank on meta-val (a target task: "
                    "on its train split; a few-shot task: on --support) and write one CSV "
                    "row per input: its id, the predicted label and a p_<class> column per "
                    "class (regression: prediction).")
    export = sub.add_parser(
        "export", help="write a trial's model (model.pt, plan.json; model.pt2: runs without "
                       "autometa)",
        description="Write DIR/model.pt (tensors only: torch.load(..., weights_only=True)) "
                    "and DIR/plan.json (trial, plugins, hyperparameters, task, scores). For a "
                    "target task also DIR/model.pt2, the model adapted on its train split "
                    "with its input scaling, as a torch.export program that plain PyTorch "
                    "runs (torch.export.load), and DIR/model.json (its input and output); "
                    "DIR/model.onnx too where the onnx package is installed. For a few-shot "
                    "task whose adaptation is tensor maths (protonet, nearest-centroid): "
                    "DIR/adapt.pt2 and DIR/predict.pt2.")
    for parser in (predict, export):
        parser.add_argument("study", help="study name")
        parser.add_argument("--rank", type=int, default=1,
                            help="the trial's meta-val rank among completed trials (1)")
        _stored_study_flags(parser)
    predict.add_argument("--input", type=Path, required=True,
                         help="a CSV of feature rows (the study's CSV task's columns), or "
                              "image files / a folder of images")
    predict.add_argument("--support", type=Path,
                         help="labelled examples to adapt on: a CSV with the task's label "
                              "column (a CSV task's own; else 'label', or 'target' for "
                              "regression), or a folder of class folders (few-shot tasks; "
                              "default for a target task: its train split)")
    predict.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    export.add_argument("--out", type=Path, required=True, help="the folder to write")
    export.add_argument("--force", action="store_true",
                        help="write into a folder that is not empty")


def cmd_leaderboard(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.leaderboard import check_top_k, load_leaderboard

    if args.top_k is not None:
        check_top_k(args.top_k)
    check_writable_dir(args.out, "--out")
    quiet_optuna()
    board = load_leaderboard(args.study, args.storage, top_k=args.top_k,
                             artifacts=args.artifacts, data_root=args.data_root,
                             device=args.device, cache_dir=args.cache_dir)
    ready()
    show_leaderboard(board, args.out)
    return 0


def cmd_predict(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.model_files import check_out_file, predict_file
    from autometa.predictor import load_model

    check_out_file(args.out)
    quiet_optuna()
    model = load_model(args.study, args.rank, storage=args.storage, artifacts=args.artifacts,
                       data_root=args.data_root, device=args.device,
                       cache_dir=args.cache_dir)
    n = predict_file(model, args.input, args.out, support=args.support)
    ready()
    print(f"wrote {args.out} ({n} prediction{'s' * (n != 1)})")
    return 0


def cmd_export(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.errors import ConfigError
    from autometa.export_program import export_program
    from autometa.model_files import check_out_dir, export
    from autometa.predictor import load_model

    check_out_dir(args.out, args.force)
    quiet_optuna()
    model = load_model(args.study, args.rank, storage=args.storage, artifacts=args.artifacts,
                       data_root=args.data_root, device=args.device,
                       cache_dir=args.cache_dir)
    paths = export(model, args.out, force=args.force)
    failure: ConfigError | None = None
    notes: list[str] = []
    try:
        program = export_program(model, args.out)
        paths, notes = paths + program.paths, program.notes
    except ConfigError as exc:  # model.pt and plan.json are written: said, then exit 2
        failure = exc
    ready()
    print(f"wrote {', '.join(map(str, paths))} (study {args.study!r}, rank {args.rank}: "
          f"trial {model.trial}, {model.algorithm} + {model.source})")
    for note in notes:
        print(note)
    if failure is not None:
        raise failure
    return 0


def cmd_report(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    import shlex

    from autometa.leaderboard import check_top_k, load_leaderboard
    from autometa.report import check_distinct

    check_distinct(args.studies)
    if args.top_k is not None:
        check_top_k(args.top_k)
    check_writable_dir(args.out, "--out")
    write = _report_format(args.format, plugin_options(args.plugin_option))
    quiet_optuna()
    boards = [load_leaderboard(name, args.storage, top_k=args.top_k, artifacts=args.artifacts,
                               data_root=args.data_root, device=args.device,
                               cache_dir=args.cache_dir)
              for name in args.studies]
    ready()
    flags = [f for key in ("out", "storage", "artifacts", "data_root", "device", "top_k")
             if getattr(args, key) is not None
             for f in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]
    command = redact(shlex.join(["autometa", "report", *args.studies, *flags]))
    path = write(boards, args.out, command)
    print(f"wrote {path}")
    return 0


def _report_format(name: str, options: dict[str, dict[str, Any]]
                   ) -> Callable[[list[Leaderboard], Path, str], Path]:
    """The writer of report format ``name``: autometa's HTML, or a plugin's
    (``register_report_formats``), which gets its plugin's ``--plugin-option`` settings.

    Raises:
        ConfigError: no such format, or options for a plugin that is not loaded.
        PluginError: the plugin's format cannot be loaded.
    """
    from autometa.errors import ConfigError, closest
    from autometa.plugins import create_host
    from autometa.report import write_report

    host = create_host()
    host.check_options(options)
    if name == "html":
        return lambda boards, out, command: write_report(boards, out, command=command)
    if not host.registered("report_format", name):
        known = ["html", *host.names("report_format")]
        raise ConfigError(f"--format: unknown report format {name!r}{closest(name, known)}; "
                          f"formats: {', '.join(known)}")
    reg = host.get("report_format", name)
    factory = reg.load()

    def write(boards: list[Leaderboard], out: Path, command: str) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        with reg.guard("raised while writing the report"):
            path = factory(boards, out, options=dict(options.get(reg.plugin, {})))
        return Path(path)

    return write


def show_leaderboard(board: Leaderboard, directory: Path) -> None:
    """Print ``board`` for a terminal; write its CSV and Markdown into ``directory`` unless
    another process writes them (see :attr:`Leaderboard.writes_reports`)."""
    from rich.table import Table

    from autometa.report import compare

    arrow = "lower is better" if board.direction == "minimize" else "higher is better"
    counts = ", ".join(f"{v} {k}" for k, v in board.counts.items() if v)
    out = console()
    # A narrow terminal (80 columns) lists each trial's hyperparameters under the table,
    # wrapped between "k=v" pairs: in a column they would be folded mid-number.
    beside = out.width >= WIDE_TABLE
    table = Table(title=f"{board.study_name}: {board.task}, {board.metric} ({arrow})",
                  caption=f"trials: {counts or 'none'}; ranked on meta-val, "
                          f"test = meta-test mean and {board.ci_text}; "
                          "same tie = cannot be told apart (paired Wilcoxon, Holm, α=0.05)")
    columns = [c for c in board.display_columns() if beside or c != "params"]
    for column in columns:
        if column == "params":
            table.add_column(column, overflow="fold", ratio=1)
        else:  # a number or a name is never split: elided (…) if it cannot fit
            table.add_column(column, overflow="ellipsis", no_wrap=True)
    rows = board.display_rows()
    for row in rows:
        table.add_row(*(plain(row[c]) for c in columns))
    out.print(table)
    if board.baseline_note:
        out.print(board.baseline_note, markup=False, highlight=False)
    if not beside and rows:
        out.print("hyperparameters (algorithm | source):", markup=False, highlight=False)
        for row in rows:
            out.print(plain(f"{row['rank']:>4}. trial {row['trial']}: {row['params']}"))
    for caveat in board.caveats:  # what the numbers rest on too little to tell
        out.print(plain(f"warning: {caveat}"), style="yellow")
    for key, frame in board.comparisons():
        if key == "source" and len(frame) < 2:
            continue  # one source: its row is the leaderboard's first
        best_of = Table(title=f"{board.study_name}: {compare.TITLES[key].lower()}",
                        caption="its best fully trained trial (rank in the leaderboard; "
                                "(completion): a pruned configuration re-run in full)")
        for column in compare.display_columns(key):
            best_of.add_column(column, overflow="fold" if column == "trials" else "ellipsis",
                               no_wrap=column != "trials")
        for row in compare.display_rows(frame, key, board.metric):
            best_of.add_row(*(plain(v) for v in row.values()))
        out.print(best_of)
    header, domains = board.domain_rows()
    if header:  # a multi-domain task: meta-test on each domain, the scored trials as columns
        per_domain = Table(title=f"{board.study_name}: meta-test {board.metric} per domain",
                           caption="mean ± 95% CI over the domain's episodes")
        for column in header:
            per_domain.add_column(column, overflow="ellipsis", no_wrap=True)
        for cells in domains:
            per_domain.add_row(*(plain(c) for c in cells))
        out.print(per_domain)
    stopped, lost = _queued_retries(board)
    if stopped or lost:  # a search stopped (Ctrl-C, SIGTERM) or a machine lost: unfinished
        which = " and ".join(part for part in (
            f"{stopped} interrupted trial(s)" if stopped else "",
            f"{lost} trial(s) whose process was lost" if lost else "") if part)
        out.print(f"{which} queued to run again: re-run the search, or start `autometa "
                  "worker`, to finish it", markup=False, highlight=False)
    if board.counts.get("running"):
        out.print(f"{board.counts['running']} trial(s) still running in other processes: "
                  "this is a snapshot, and the last process to finish writes the reports",
                  markup=False, highlight=False)
        return
    if not board.writes_reports:
        out.print(f"the reports of these trials were already written, by the process "
                  "that finished the search, into its --out folder on its machine; "
                  f"`autometa leaderboard {board.study_name}` writes them here",
                  markup=False, highlight=False)
        return
    paths = board.write(directory)
    out.print("wrote " + ", ".join(str(p) for p in paths), markup=False, highlight=False)


def _queued_retries(board: Leaderboard) -> tuple[int, int]:
    """Queued copies of failed trials (Optuna's retries: ``failed_trial`` set): of those
    interrupted (Ctrl-C, a signal), and of those whose process was lost."""
    if board.study is None:
        return 0, 0
    from optuna.trial import TrialState

    copies = [t for t in board.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
              if "failed_trial" in t.system_attrs]
    # A copy carries its failed trial's user attributes, the reason ("crash") among them.
    stopped = sum(str(t.user_attrs.get("crash") or "").startswith("interrupted")
                  for t in copies)
    return stopped, len(copies) - stopped


#: Terminal columns from which the leaderboard shows hyperparameters in the table.
WIDE_TABLE = 120


