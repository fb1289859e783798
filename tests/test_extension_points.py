"""Extension points beyond the three plugin kinds, through a real installed distribution
(a dist-info directory on sys.path): a pruner, a sampler, a report format and a command
registered by a plugin and used by name; typed lifecycle events with each plugin's own
options; the older hook arguments still served."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from conftest import Install

import autometa
from autometa import PluginError
from autometa.cli import main

RECORDER = """
    import json
    from pathlib import Path

    import autometa

    EVENTS = []  # (hook, event)

    @autometa.hookimpl
    def register_pruners(register):
        register("always", "recorder_engine:always", description="prunes at every check")
        register("not-a-pruner", "recorder_engine:not_a_pruner")

    @autometa.hookimpl
    def register_samplers(register):
        register("counted", "recorder_engine:counted")

    @autometa.hookimpl
    def register_meta_algorithms(register):
        register("explodes", "recorder_engine:Explodes")
        register("broadcasts", "recorder_engine:Broadcasts")

    @autometa.hookimpl
    def register_report_formats(register):
        register("events-json", "recorder_engine:write_json")

    @autometa.hookimpl
    def register_commands(register):
        register("hello", "recorder_command:command", description="say hello")
        register("run", "recorder_command:command", description="would shadow autometa run")

    def _record(hook, event):
        EVENTS.append((hook, event))

    @autometa.hookimpl
    def search_started(event):
        _record("search_started", event)

    @autometa.hookimpl
    def trial_started(event):
        _record("trial_started", event)
        if event.options.get("interrupt"):
            raise KeyboardInterrupt

    @autometa.hookimpl
    def trial_pruned(event):
        _record("trial_pruned", event)

    @autometa.hookimpl
    def trial_failed(event):
        _record("trial_failed", event)

    @autometa.hookimpl
    def trial_finished(event):
        _record("trial_finished", event)

    @autometa.hookimpl
    def search_finished(event):
        _record("search_finished", event)

    @autometa.hookimpl
    def search_failed(event):
        _record("search_failed", event)
"""

ENGINE = """
    import json
    from pathlib import Path

    import optuna

    from autometa import MetaAlgorithm

    SAMPLED = []

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    def always(*, meta_steps, eval_every, direction):
        assert direction in ("minimize", "maximize")
        return Always()

    def not_a_pruner(**kwargs):
        return "median"

    class Counted(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            SAMPLED.append(name)
            return super().sample_independent(study, trial, name, distribution)

    def counted(*, seed):
        return Counted(seed=seed)

    class Explodes(MetaAlgorithm):
        def meta_step(self, batch):
            raise RuntimeError("boom in meta_step")

        def adapt_and_predict(self, episodes):
            raise RuntimeError("unused")

    class Broadcasts(MetaAlgorithm):
        # One prediction per episode, (tasks, 1, out): it broadcasts against the targets.

        def meta_step(self, batch):
            return 0.0

        def adapt_and_predict(self, episodes):
            return self.model(episodes.query_x[:, :1].flatten(0, 1)).view(len(episodes), 1, -1)

    def write_json(leaderboards, out, *, options):
        path = Path(out) / "events.json"
        path.write_text(json.dumps({"studies": [b.study_name for b in leaderboards],
                                    "options": options}))
        return path
"""

COMMAND = """
    from pathlib import Path

    Path("command-module-imported").write_text("yes")

    def command(parser):
        parser.add_argument("--name", default="world")

        def handler(args):
            print(f"hello {args.name}")
            return 3

        return handler
"""

LEGACY = """
    import autometa

    SEEN = []

    @autometa.hookimpl
    def trial_finished(study_name, trial):
        SEEN.append((study_name, trial.number))

    @autometa.hookimpl
    def search_finished(study_name, leaderboard):
        SEEN.append((study_name, "finished"))
"""

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
TINY = dict(algorithms=["maml"], sources=["mlp"], meta_steps=4, eval_every=2,
            initial="none", task_params=SMALL, algorithm_params={"maml": {"inner_steps": 1}})


@pytest.fixture
def recorder(install: Install) -> object:
    install("recorder-dist", {"recorder": "recorder_hooks", "legacy": "legacy_hooks"},
            {"recorder_hooks": RECORDER, "recorder_engine": ENGINE,
             "recorder_command": COMMAND, "legacy_hooks": LEGACY})
    import recorder_hooks  # type: ignore[import-not-found]

    return recorder_hooks


def hooks(recorder: object) -> list[str]:
    return [hook for hook, _ in recorder.EVENTS]  # type: ignore[attr-defined]


def test_plugin_pruner_sampler_and_typed_events_with_own_options(
        recorder: object, tmp_path: Path) -> None:
    board = autometa.search("sinusoid", n_trials=3, pruner="always", sampler="counted",
                            plugins={"recorder": {"tag": "x"}}, out=tmp_path / "reports",
                            **TINY)
    import legacy_hooks  # type: ignore[import-not-found]
    import recorder_engine  # type: ignore[import-not-found]

    seen = hooks(recorder)
    assert seen.count("search_started") == 1 and seen.count("search_finished") == 1
    # "always" prunes at the first evaluation (step 2 of 4): every trial is pruned, and then
    # the algorithm, left with no fully trained trial, has its best one re-run in full.
    assert seen.count("trial_started") == seen.count("trial_finished") == 3 + 1
    assert seen.count("trial_pruned") == 3 and board.counts["pruned"] == 3
    assert board.counts["complete"] == 1 and len(board.frame) == 1
    events = dict(recorder.EVENTS)  # type: ignore[attr-defined]
    assert events["search_started"].options == {"tag": "x"}
    assert events["search_started"].out == tmp_path / "reports"
    assert events["search_started"].config.pruner == "always"
    started = events["trial_started"]
    assert (started.algorithm, started.source, started.device) == ("maml", "mlp", "cpu")
    assert "maml.inner_lr" in started.params
    pruned = events["trial_pruned"]
    assert pruned.step == 2 and pruned.reason.startswith("always: meta-val")
    assert pruned.trial.state.name == "PRUNED"
    assert events["search_finished"].leaderboard is board
    assert recorder_engine.SAMPLED, "the plugin's sampler proposed nothing"
    # A plugin written before `event` keeps its arguments, and gets no one else's options.
    assert [s for _, s in legacy_hooks.SEEN] == [0, 1, 2, 3, "finished"]  # 3: the completion


def test_a_failing_trial_and_a_failed_search_are_told(recorder: object) -> None:
    autometa.search("sinusoid", n_trials=1, pruner="none", **{
        **TINY, "algorithms": ["explodes"], "algorithm_params": {}})
    events = dict(recorder.EVENTS)  # type: ignore[attr-defined]
    assert "RuntimeError: boom in meta_step" in events["trial_failed"].error
    assert hooks(recorder)[-3:] == ["trial_failed", "trial_finished", "search_finished"]
    recorder.EVENTS.clear()  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        autometa.search("sinusoid", n_trials=1, study_name="interrupted",
                        plugins={"recorder": {"interrupt": True}}, **TINY)
    seen = hooks(recorder)
    assert seen[-1] == "search_failed" and "search_finished" not in seen
    assert isinstance(dict(recorder.EVENTS)["search_failed"].error,  # type: ignore[attr-defined]
                      KeyboardInterrupt)


def test_a_prediction_of_the_wrong_shape_fails_its_trial_by_name(recorder: object) -> None:
    """Broadcasting would score (and rank) it silently: the engine checks the shape."""
    board = autometa.search("sinusoid", n_trials=1, pruner="none", **{
        **TINY, "algorithms": ["broadcasts"], "algorithm_params": {}})
    assert board.counts["failed"] == 1 and len(board.frame) == 0
    error = dict(recorder.EVENTS)["trial_failed"].error  # type: ignore[attr-defined]
    assert "recorder_engine.Broadcasts.adapt_and_predict returned shape (4, 1, 1); " \
           "expected (4, 5, 1)" in error


def test_a_hook_function_without_hookimpl_makes_its_plugin_broken() -> None:
    def register_tasks(register):  # not decorated: pluggy alone would skip it silently
        register("never", "nowhere:Task")

    plugin = types.SimpleNamespace(register_tasks=register_tasks)
    host = autometa.create_host(entry_points=False, plugins={"forgetful": plugin})
    assert host.plugins["forgetful"].status == "broken"
    assert "register_tasks() is not marked as a hook: decorate it with @autometa.hookimpl" \
        in (host.plugins["forgetful"].error or "")


def test_bad_plugin_pruner_is_refused_before_anything_is_stored(
        recorder: object, tmp_path: Path) -> None:
    storage = tmp_path / "never.db"
    with pytest.raises(PluginError, match="pruner 'not-a-pruner' .* returned a str; expected "
                                          "an optuna.pruners.BasePruner"):
        autometa.search("sinusoid", n_trials=1, pruner="not-a-pruner",
                        storage=f"sqlite:///{storage}", **TINY)
    assert not storage.exists()


def test_cli_options_report_format_and_command(
        recorder: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "search.toml"
    config.write_text('task = "sinusoid"\nalgorithms = ["maml"]\nsources = ["mlp"]\n'
                      'initial = "none"\npruner = "none"\n'
                      'task_params = {val_episodes = 4, test_episodes = 4, eval_queries = 5}\n'
                      'algorithm_params = {maml = {inner_steps = 1}}\n'
                      '[plugins.recorder]\ntag = "file"\nkept = 1\n')
    assert main(["run", "--config", str(config), "--trials", "1", "--meta-steps", "2",
                 "--eval-every", "2", "--study", "cli", "--no-progress",
                 "--plugin-option", "recorder.tag=7"]) == 0
    started = dict(recorder.EVENTS)["search_started"]  # type: ignore[attr-defined]
    assert started.options == {"tag": 7, "kept": 1}  # the flag wins, read as TOML
    assert started.out == Path("autometa-reports")
    capsys.readouterr()

    assert main(["report", "cli", "--format", "events-json", "--out", "rep",
                 "--plugin-option", "recorder.indent=2"]) == 0
    written = json.loads((tmp_path / "rep" / "events.json").read_text())
    assert written == {"studies": ["cli"], "options": {"indent": 2}}
    assert main(["report", "cli", "--format", "events-jsn"]) == 2
    assert "did you mean 'events-json'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert "hello" in listed and "say hello (plugin recorder)" in listed
    assert not (tmp_path / "command-module-imported").exists(), "--help imported the command"
    assert main(["hello", "--name", "bob"]) == 3
    assert capsys.readouterr().out == "hello bob\n"
    with pytest.raises(SystemExit):  # `run` stays autometa's own
        main(["run", "--help"])
    assert "--plugin-option" in capsys.readouterr().out


def test_every_trial_attribute_the_engine_writes_is_documented() -> None:
    """`autometa.events.TRIAL_ATTRS` is the reporters' reference: the keys written with
    set_user_attr (literals and the engine's *_ATTR(S) constants) must all be in it."""
    import ast
    import dataclasses

    from autometa.events import TRIAL_ATTRS
    from autometa.study.trials import COST_ATTRS, TEST_ATTRS, TrialPlan

    root = Path(autometa.__file__).parent
    written: set[str] = set(COST_ATTRS) | set(TEST_ATTRS)
    written |= {f.name for f in dataclasses.fields(TrialPlan)}
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                    "set_user_attr", "set_trial_user_attr", "enqueue_trial"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        written.add(arg.value)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and any(isinstance(t, ast.Name) and t.id.endswith("_ATTR")
                            for t in node.targets):
                written.add(node.value.value)
    trial_keys = {k for k in written if not k.startswith("autometa.")}  # study attributes
    assert trial_keys - set(TRIAL_ATTRS) == set(), "document these in TRIAL_ATTRS"
    assert {"fit_time_s", "test_mean", "origin", "pruned", "val_curve"} <= trial_keys


@pytest.mark.slow  # two worker processes
def test_options_for_an_in_process_plugin_with_several_workers(tmp_path: Path) -> None:
    """Worker processes load the installed plugins only; the options of an in-process one
    are checked (and used) by the search's own process, not refused in each worker."""
    seen: list[object] = []
    reporter = types.SimpleNamespace(
        search_started=autometa.hookimpl(lambda event: seen.append(event.options)))
    host = autometa.create_host(plugins={"inproc": reporter})
    board = autometa.search("sinusoid", n_trials=2, workers=2, pruner="none", host=host,
                            storage=f"sqlite:///{tmp_path / 's.db'}",
                            artifacts=str(tmp_path / "artifacts"),
                            plugins={"inproc": {"level": 2}}, **TINY)
    assert board.counts["complete"] == 2 and seen == [{"level": 2}]
