"""``autometa run`` (a search from flags and a config file) and ``autometa worker``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autometa.cli.common import (
    cache_dir_flag,
    data_root_flag,
    keep_states,
    plugin_option_flag,
    plugin_options,
    quiet_optuna,
    report_flags,
)
from autometa.cli.results import show_leaderboard
from autometa.config import (
    DEFAULT_STORAGE,
    INITIALS,
    PRUNERS,
    RESOURCES,
    SAMPLERS,
    SearchConfig,
    check_plugin_options,
    check_writable_dir,
    tomllib,
)
from autometa.errors import ConfigError, redact
from autometa.launch import STORAGE_ENV
from autometa.params import CliText

if TYPE_CHECKING:
    from autometa.plugins import PluginHost

#: ``autometa run`` flag -> SearchConfig field, for the flags given on the command line.
RUN_FLAGS = {
    "task": "task", "algorithms": "algorithms", "sources": "sources", "trials": "n_trials",
    "timeout": "timeout", "meta_steps": "meta_steps", "eval_every": "eval_every",
    "trial_timeout": "trial_timeout", "pruner_resource": "pruner_resource",
    "seed": "seed", "study": "study_name", "storage": "storage", "artifacts": "artifacts",
    "device": "device", "top_k": "top_k", "pruner": "pruner", "threads": "threads",
    "devices": "devices", "workers": "workers", "keep": "keep", "data_root": "data_root",
    "cache_dir": "cache_dir",
    "sampler": "sampler", "initial": "initial", "warm_start": "warm_start",
    "baselines": "baselines", "precision": "precision",
}


def add_parsers(sub: Any) -> None:
    """``run`` and ``worker``."""
    run = sub.add_parser("run", help="run or resume a search",
                         description="Run a search from flags and/or a TOML/YAML config file "
                                     "(flags win). Re-running with the same study name resumes.")
    search_flags(run)
    report_flags(run)
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars: one plain line per finished trial")
    _worker_parsers(sub)


def search_flags(run: argparse.ArgumentParser, workers: str = "trials at once, each in its "
                 "own process (default: one per device; e.g. 2 on a CPU)") -> None:
    """The flags that describe a search (``run``'s, also ``launch``'s, whose ``--workers``
    means something else: ``workers`` is its help): see :func:`config_from_args`."""
    run.add_argument("--config", type=Path, help="TOML or YAML file of SearchConfig keys")
    run.add_argument("--task", help="task plugin name (see `autometa plugins`)")
    run.add_argument("--algorithms", help="comma-separated algorithm names (default: all "
                     "but nearest-centroid and linear-svm, which the baselines run, and "
                     "pmf, which runs only when named)")
    run.add_argument("--sources", help="comma-separated source model names (default: all "
                     "but raw, which the baselines run)")
    run.add_argument("--trials", type=int, help="trials to finish in the study (default 20)")
    run.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    run.add_argument("--meta-steps", type=int, help="meta-training steps per trial (500)")
    run.add_argument("--eval-every", type=int, help="meta-val interval in steps (100)")
    run.add_argument("--trial-timeout", type=float, metavar="SECONDS",
                     help="seconds of meta-training per trial (meta-val evaluations "
                          "excluded): a trial that reaches it stops there and is scored on "
                          "what it has (default: none)")
    run.add_argument("--seed", type=int, help="seed of the whole search (0)")
    run.add_argument("--study", help="study name (default: <task>-seed<seed>)")
    run.add_argument("--storage", help=f"Optuna storage URL (default: ${STORAGE_ENV}, else "
                                       f"the config's, else {DEFAULT_STORAGE})")
    run.add_argument("--artifacts", help="where trained trial states go: a directory (one "
                                         "every machine mounts, for many) or s3://BUCKET "
                                         "(default autometa-artifacts)")
    run.add_argument("--keep", type=keep_states, metavar="all|K",
                     help="trial states kept: all (default), or those of the best K on meta-val")
    data_root_flag(run)
    cache_dir_flag(run)
    run.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    run.add_argument("--devices", help="comma-separated devices, one trial per device at a "
                                       "time, e.g. cuda:0,cuda:1; 'cuda' = every visible GPU")
    run.add_argument("--workers", type=int, help=workers)
    run.add_argument("--top-k", type=int, help="best trials scored on meta-test (3)")
    run.add_argument("--threads", type=int,
                     help="torch CPU threads (default: torch's; 1 is fastest for small models)")
    run.add_argument("--precision", metavar="float32|bf16|float32,bf16",
                     help="arithmetic of each trial's meta-training and scoring: float32 "
                          "(default), bf16 (torch.autocast to bfloat16; parameters stay "
                          "float32), or both comma-separated to search it per trial")
    run.add_argument("--pruner", metavar="{" + ",".join(PRUNERS) + ",PLUGIN'S}",
                     help="stops unpromising trials: hyperband (over meta-steps), median "
                          "(meta-val at each evaluation), wilcoxon (paired over meta-val "
                          "episodes), none, or a pruner a plugin registers (default: "
                          "hyperband)")
    run.add_argument("--pruner-resource", choices=RESOURCES,
                     help="what hyperband's budget counts: meta_steps (from --eval-every to "
                          "--meta-steps; default) or seconds of meta-training (up to "
                          "--trial-timeout)")
    run.add_argument("--sampler", metavar="{" + ",".join(SAMPLERS) + ",PLUGIN'S}",
                     help="proposes configurations: tpe, random, or a sampler a plugin "
                          "registers (default: tpe)")
    run.add_argument("--initial", choices=INITIALS,
                     help="portfolio: every (algorithm, source) pair first, at its plugins' "
                          "defaults; none: the sampler from the start (default: portfolio)")
    run.add_argument("--warm-start", metavar="STUDY[@URL],...",
                     help="earlier studies (in --storage, or at URL) whose best 3 "
                          "configurations that fit this search run first (before the "
                          "portfolio)")
    run.add_argument("--no-baselines", dest="baselines", action="store_const", const=False,
                     help="no baseline trials (by default nearest centroid, linear probe "
                          "and linear SVM on the raw inputs and on pre-trained sources run "
                          "first, outside the --trials budget)")
    run.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                     help="task parameter, e.g. shots=5; a per-trial setting (the task's "
                          "trial_params) is fixed, restricted or searched like --param, "
                          "e.g. flip=[true,false] or 'crop_scale={low=0.08,high=1}' "
                          "(repeatable)")
    run.add_argument("--param", action="append", default=[], metavar="PLUGIN.KEY=VALUE",
                     help="fix or restrict a hyperparameter, e.g. maml.inner_steps=1 or "
                          "maml.first_order=[true,false] (repeatable)")
    plugin_option_flag(run)


def _worker_parsers(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="join a stored study from this machine and run its trials",
        description="Join study STUDY in the storage at --storage (e.g. a PostgreSQL server "
                    "that every machine reaches) and run its trials until its budget is "
                    "spent. The search's settings come from the storage; input files must "
                    "match the study's (by content hash), and this machine's autometa and "
                    "plugins the versions and spaces the study was made with (see "
                    "`autometa requirements STUDY --storage URL --check`).")
    worker.add_argument("study", help="study name (as `autometa run` created it)")
    worker.add_argument("--storage",
                        help="the study's storage URL, e.g. postgresql://user@host/db "
                             f"(default: the environment's {STORAGE_ENV}, which launched "
                             "workers get: a password stays out of command lines)")
    worker.add_argument("--artifacts", help="the artifact store as this machine reaches it "
                                            "(default: the study's)")
    data_root_flag(worker)
    cache_dir_flag(worker)
    worker.add_argument("--devices", help="comma-separated devices of this machine (default: "
                                          "the study's), e.g. cuda:0,cuda:1 or cuda")
    worker.add_argument("--workers", type=int, help="trials at once on this machine "
                                                    "(default: one per device)")
    worker.add_argument("--threads", type=int, help="torch CPU threads per worker")
    worker.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    plugin_option_flag(worker)
    report_flags(worker)
    worker.add_argument("--no-progress", action="store_true",
                        help="no progress bars: one plain line per finished trial")

    pins = sub.add_parser(
        "requirements", help="the packages a stored study was made with (pip requirements); "
                             "--check: whether this machine agrees",
        description="Print the pip requirements of study STUDY: autometa-ml and the "
                    "distribution of every plugin it used, at the versions that made it "
                    "(`pip install -r FILE` builds a worker's image). With --check, check "
                    "instead that this machine's autometa and plugins agree with the study, "
                    "as every worker does before its first trial: exit 0 if they do (a "
                    "patch-level difference, same major.minor, is one warning), 2 with one "
                    "line naming the difference if not (another major or minor version, a "
                    "pre-release on one side, a hyperparameter or choice the installed "
                    "plugin does not accept). Nothing runs and nothing is written.")
    pins.add_argument("study", help="study name (as `autometa run` created it)")
    pins.add_argument("--storage",
                      help="the study's storage URL, e.g. postgresql://user@host/db "
                           f"(default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})")
    pins.set_defaults(storage_default=DEFAULT_STORAGE)
    pins.add_argument("--check", action="store_true",
                      help="check this machine's installed packages against the study")


def config_from_args(args: argparse.Namespace, sources: Sequence[str] = ()) -> SearchConfig:
    """Merge the config file (if any) with the flags given; flags win.

    ``--param`` values go to ``source_params`` for the names in ``sources`` (the installed
    source models) or given with ``--sources``, else to ``algorithm_params``. Values stay
    text (:class:`~autometa.params.CliText`) until the engine parses them as their declared
    types, except ``[...]`` lists and ``{...}`` ranges, read as TOML.
    """
    settings: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in RUN_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.task_param:
        settings["task_params"] = dict(_key_value(p, "--task-param") for p in args.task_param)
    for name, key, value in (_plugin_param(p) for p in args.param):
        settings.setdefault("_params", []).append((name, key, value))
    extra = settings.pop("_params", [])
    flagged = plugin_options(args.plugin_option)
    if args.config:
        config = SearchConfig.from_file(args.config, **settings)
    else:
        if "task" not in settings:
            raise ConfigError("give --task NAME or --config FILE (see `autometa run --help`)")
        config = SearchConfig.from_dict(settings, where="command line")
    for name, key, value in extra:  # a plugin is an algorithm or a source; checked later
        is_source = name in config.sources or (name in sources and name not in config.algorithms)
        target = config.source_params if is_source else config.algorithm_params
        target.setdefault(name, {})[key] = value
    for name, table in flagged.items():  # flags win over the file's [plugins.NAME] keys
        config.plugins.setdefault(name, {}).update(table)
    check_plugin_options(config.plugins)
    return config


def _key_value(text: str, flag: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUE")
    return key.strip(), _parse_value(raw.strip())


def _plugin_param(text: str) -> tuple[str, str, Any]:
    key, value = _key_value(text, "--param")
    name, dot, param = key.partition(".")
    if not dot or not name or not param:
        raise ConfigError(f"--param {text!r}: expected PLUGIN.KEY=VALUE, e.g. maml.inner_steps=1")
    return name, param, value


def _parse_value(raw: str) -> Any:
    """``[a, b]`` a list and ``{low = .., high = ..}`` a table (TOML), else the text.

    The engine parses text as the parameter's declared type (``yes`` is true for a bool).
    A list that is not valid TOML (``[yes,no]``) is split on commas into texts.
    """
    if raw.startswith("{"):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{raw!r} is not a valid range table such as "
                              f"{{low = 0.01, high = 0.1}}: {exc}") from None
    if raw.startswith("[") and raw.endswith("]"):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            return [CliText(v.strip()) for v in raw[1:-1].split(",") if v.strip()]
    return CliText(raw)


def checked_config(args: argparse.Namespace) -> tuple[PluginHost, SearchConfig]:
    """The plugin host and the search ``args`` describe, its plugin names checked before
    torch, Optuna and pandas are imported (seconds under load): a misspelt plugin is one
    line at once.

    Raises:
        ConfigError, PluginError: a bad setting or an unknown name ("did you mean").
    """
    from autometa.plugins import Kind, create_host

    host = create_host()
    config = config_from_args(args, sources=host.names("source"))
    named: tuple[tuple[Kind, list[str]], ...] = (
        ("task", [config.task] if config.task else []), ("algorithm", config.algorithms),
        ("source", config.sources))
    for kind, names in named:
        for name in names:
            host.get(kind, name)  # PluginError: unknown, with "did you mean"
    return host, config


def cmd_run(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    host, config = checked_config(args)
    check_writable_dir(args.out, "--out")
    first_line(f"study {config.study!r} in {config.storage}")
    from autometa.engine.run import run_search
    from autometa.progress import LineProgress, RichProgress

    quiet_optuna()
    progress = LineProgress() if args.no_progress else RichProgress()
    board = run_search(config, host=host, progress=progress, ready=ready, out=args.out)
    show_leaderboard(board, args.out)
    return 0


def first_line(text: str) -> None:
    """Say at once, before the seconds torch takes to import, what the command works on
    (on stdout: stderr stays for the one line of an error). Credentials never show."""
    print(redact(text), flush=True)


def cmd_requirements(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.study.agreement import check_agreement, requirements
    from autometa.study.settings import stored_search, stored_settings

    _, _, study = stored_search(args.study, args.storage)
    stored = stored_settings(study)
    pins = requirements(stored)
    if not args.check:
        print(f"# study {args.study!r}: the packages it was made with "
              "(pip install -r this-file)")
        print("\n".join(pins))
        return 0
    from autometa.plugins import create_host

    check_agreement(stored, create_host(), args.study)  # a patch-level difference: logged
    print(f"this machine agrees with study {args.study!r} "
          f"({', '.join(p for p in pins if not p.startswith('#'))})")
    return 0


def cmd_worker(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    from autometa.plugins import create_host

    check_writable_dir(args.out, "--out")
    storage = args.storage or os.environ.get(STORAGE_ENV)
    if not storage:
        raise ConfigError(f"give the study's storage: --storage URL, or set {STORAGE_ENV}")
    first_line(f"joining study {args.study!r} in {storage}")
    from autometa.engine.run import join_search
    from autometa.progress import LineProgress, RichProgress

    quiet_optuna()
    progress = LineProgress() if args.no_progress else RichProgress()
    board = join_search(args.study, storage, host=create_host(), progress=progress,
                        ready=ready, artifacts=args.artifacts, data_root=args.data_root,
                        cache_dir=args.cache_dir, devices=args.devices,
                        workers=args.workers, threads=args.threads,
                        timeout=args.timeout, out=args.out,
                        plugins=plugin_options(args.plugin_option) or None)
    show_leaderboard(board, args.out)
    return 0
