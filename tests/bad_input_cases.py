"""Bad inputs for tests/test_bad_input.py: one :class:`Case` per way a user can get it wrong.

Each case is a command line (the tiny sinusoid search of :func:`run_argv` with some flags
added or replaced, or a whole command of its own) and, where it needs one, a file made in the
case's directory first. Every case must be refused the same way: exit code 2, one stderr line
``autometa: error: ...`` naming the problem (one of ``words``), nothing stored or written.

``"{d}"`` in an argument stands for the case's directory (a copy of the base storage lives
there as ``s.db``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Study made once per module by the fixture; the cases' runs name the new study "fresh".
BASE_STUDY = "base"
#: File that the malicious checkpoint's pickle payload creates when it runs.
MARKER = "payload-ran"


def run_argv(d: Path, *, study: str = "fresh", omit: tuple[str, ...] = ()) -> list[str]:
    """The tiny search (one trial of two meta-steps) with storage, reports and artifacts in
    ``d``; reports and artifacts sit two levels down so that a study name ``../../x``
    still lands inside ``d``. Flags in ``omit`` are left out (a config file sets them)."""
    flags = {
        "--task": "sinusoid", "--algorithms": "maml", "--sources": "mlp", "--trials": "1",
        "--meta-steps": "2", "--eval-every": "2", "--seed": "0", "--study": study,
        "--storage": f"sqlite:///{d}/s.db", "--artifacts": f"{d}/a/b/art",
        "--out": f"{d}/a/b/out", "--threads": "1",
    }
    argv = ["run"]
    for flag, value in flags.items():
        if flag not in omit:
            argv += [flag, value]
    return argv + ["--no-progress", "--task-param", "val_episodes=5",
                   "--task-param", "test_episodes=5"]


@dataclass(frozen=True)
class Case:
    """One bad input and what its one-line error must name."""

    id: str
    args: tuple[str, ...]  # added to run_argv (later flags win), or the whole argv if raw
    words: tuple[str, ...]  # the error line names at least one (case-insensitive)
    setup: Callable[[Path], object] | None = None  # makes the files the case reads
    raw: bool = False  # args are the whole command line, not additions to run_argv
    omit: tuple[str, ...] = ()  # run_argv flags left out (set by the case's config file)
    forbidden: tuple[str, ...] = ()  # must not appear anywhere in stderr (secrets, ...)
    subprocess: bool = False  # run the real console script, not main() in-process
    storage: bool = True  # copy the base storage into the case's directory first

    def argv(self, d: Path) -> list[str]:
        args = [a.replace("{d}", str(d)) for a in self.args]
        return args if self.raw else run_argv(d, omit=self.omit) + args


# -- files the cases read ----------------------------------------------------------------
class Payload:
    """Pickles as a call of ``os.system(command)``: unpickling the file runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


def malicious_checkpoint(d: Path) -> Path:
    import torch

    path = d / "evil.pt"
    torch.save({"model": Payload(f"touch {shlex.quote(str(d / MARKER))}")}, path)
    return path


def poisoned_checkpoint(name: str, value: float) -> Callable[[Path], Path]:
    """A real MLP state_dict for sinusoid (hidden 40, 2 layers) with one weight = value."""

    def make(d: Path) -> Path:
        import torch

        from autometa import TaskSpec, create_host

        model = create_host().get("source", "mlp").load()().build(
            TaskSpec("regression", (1,), 1))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[next(iter(state))].view(-1)[0] = value
        torch.save(state, d / name)
        return d / name

    return make


def write(name: str, content: str | bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{d}", str(d)))
        return path

    return make


def make_dir(name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).mkdir(parents=True)
        return d / name

    return make


def png_bomb(name: str, width: int, height: int) -> Callable[[Path], Path]:
    """A PNG of ``width`` x ``height`` 1-bit pixels, all black, in a class folder beside a
    few ordinary images: a decompression bomb (a few hundred bytes that decode to
    ``width * height`` bytes in Pillow), written chunk by chunk with zlib."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    def make(d: Path) -> Path:
        row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
        z = zlib.compressobj(9)
        data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                 1, 0, 0, 0, 0))
               + chunk(b"IDAT", data) + chunk(b"IEND", b""))
        for cls in ("a", "b", "c"):
            for i in range(12):
                write(f"photos/{cls}/{i}.pgm", b"P5 2 2 255\n" + bytes([20 * i, 90, 10, 200]))(d)
        return write(f"photos/a/{name}", png)(d)

    return make


def alias_bomb() -> str:
    """Billion laughs: 9 nested anchors of 10 aliases each, 10**9 strings once expanded,
    inside one value (a top-level key would be refused as unknown before anything expands)."""
    levels = ["&l0 [" + ", ".join(['"x"'] * 10) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "task: sinusoid\nalgorithms: [" + ", ".join(levels) + "]\n"


CSV_ROWS = "".join(f"{i % 7}.5,{i % 2},{(i + 1) % 2}\n" for i in range(40))

CHECKPOINT = ("--sources", "checkpoint", "--param", "checkpoint.path={d}/evil.pt",
              "--param", "checkpoint.arch=mlp")
STORAGE = "sqlite:///{d}/s.db"


def _pickle(spelling: str | None, *, subprocess: bool = False) -> Case:
    flag = () if spelling is None else ("--param", f"checkpoint.trust_pickle={spelling}")
    return Case(f"pickle-trust_pickle={spelling or 'unset'}", CHECKPOINT + flag,
                ("trust_pickle",), setup=malicious_checkpoint, subprocess=subprocess)


def _checkpoint_file(case_id: str, name: str, setup: Callable[[Path], object] | None,
                     words: tuple[str, ...]) -> Case:
    return Case(case_id, ("--sources", "checkpoint", "--param", f"checkpoint.path={{d}}/{name}",
                          "--param", "checkpoint.arch=mlp"), words, setup=setup)


# -- 1. code execution and types -----------------------------------------------------------
EXECUTION = [
    _pickle("False", subprocess=True),
    _pickle("false"),
    _pickle("FALSE"),
    _pickle("no"),
    _pickle("0"),
    _pickle(None),
    _pickle("maybe"),
    Case("pickle-yaml-trust_pickle-quoted-no", ("--sources", "checkpoint", "--config",
                                                "{d}/trust.yaml"),
         ("trust_pickle",), setup=lambda d: (malicious_checkpoint(d), write(
             "trust.yaml", "task: sinusoid\nsource_params:\n  checkpoint:\n"
             "    path: {d}/evil.pt\n    arch: mlp\n    trust_pickle: \"no\"\n")(d))),
    Case("pickle-toml-trust_pickle-quoted-false", ("--sources", "checkpoint", "--config",
                                                   "{d}/trust.toml"),
         ("trust_pickle",), setup=lambda d: (malicious_checkpoint(d), write(
             "trust.toml", "task = \"sinusoid\"\n[source_params.checkpoint]\n"
             "path = \"{d}/evil.pt\"\narch = \"mlp\"\ntrust_pickle = \"false\"\n")(d))),
    Case("maml-strategy-bogus", ("--param", "maml.strategy=bogus"), ("strategy",)),
    Case("maml-first_order-maybe", ("--param", "maml.first_order=maybe"), ("first_order",)),
    Case("maml-inner_steps-1.5", ("--param", "maml.inner_steps=1.5"), ("inner_steps",)),
    Case("maml-inner_lr-5-out-of-range", ("--param", "maml.inner_lr=5"), ("inner_lr",)),
    Case("maml-unknown-hyperparameter", ("--param", "maml.bogus=1"), ("bogus",)),
]

# -- 2. validate before storing ------------------------------------------------------------
BEFORE_STORING = [
    _checkpoint_file("checkpoint-missing-file", "missing.pt", None, ("missing.pt",)),
    _checkpoint_file("checkpoint-random-bytes", "random.pt",
                     write("random.pt", bytes(range(256)) * 4), ("random.pt",)),
    _checkpoint_file("checkpoint-nan-weight", "nan-weights.pt",
                     poisoned_checkpoint("nan-weights.pt", float("nan")), ("nan",)),
    _checkpoint_file("checkpoint-inf-weight", "inf-weights.pt",
                     poisoned_checkpoint("inf-weights.pt", float("inf")), ("inf",)),
    Case("out-on-a-filesystem-that-refuses-files", ("--out", "/proc/autometa-reports"),
         ("--out", "writable")),
    Case("out-is-a-regular-file", ("--out", "{d}/report.txt"), ("report.txt",),
         setup=write("report.txt", "not a folder\n")),
    Case("artifacts-under-a-regular-file", ("--artifacts", "{d}/file.txt/sub"), ("file.txt",),
         setup=write("file.txt", "not a folder\n")),
    Case("device-cuda:9", ("--device", "cuda:9"), ("device", "cuda:9"), subprocess=True),
    Case("device-meta", ("--device", "meta"), ("device", "meta")),
    Case("device-tpu", ("--device", "tpu"), ("device", "tpu")),
    Case("device-bogus", ("--device", "bogus"), ("device", "bogus")),
    Case("leaderboard-empty-directory", ("leaderboard", "nosuchstudy"),
         ("nosuchstudy", "autometa.db"), raw=True, storage=False),
    Case("leaderboard-unknown-study", ("leaderboard", "nosuchstudy", "--storage", STORAGE,
                                       "--out", "{d}/out"), ("nosuchstudy",), raw=True),
]

# -- 3. bounds -------------------------------------------------------------------------------
STUDY_NAMES = {
    "dotdot": "../../x", "absolute": "{d}/abs/x", "slash": "a/b", "nul": "a\x00b",
    "300-chars": "s" * 300, "empty": "",
}
BOUNDS = [
    Case("seed-2**32", ("--seed", "4294967296"), ("seed",)),
    Case("seed-negative", ("--seed", "-1"), ("seed",)),
    Case("threads-huge", ("--threads", "99999999999"), ("threads",)),
    Case("threads-0", ("--threads", "0"), ("threads",)),
    Case("timeout-nan", ("--timeout", "nan"), ("timeout",)),
    Case("timeout-inf", ("--timeout", "inf"), ("timeout",)),
    Case("timeout-negative", ("--timeout", "-5"), ("timeout",)),
    Case("trial-timeout-0", ("--trial-timeout", "0"), ("trial_timeout",)),
    Case("trial-timeout-nan", ("--trial-timeout", "nan"), ("trial_timeout",)),
    Case("trial-timeout-inf", ("--trial-timeout", "inf"), ("trial_timeout",)),
    Case("trial-timeout-negative", ("--trial-timeout", "-5"), ("trial_timeout",)),
    Case("trial-timeout-not-a-number", ("--trial-timeout", "5m"), ("--trial-timeout",),
         subprocess=True),
    Case("config-trial-timeout-text", ("--config", "{d}/t.yaml"), ("trial_timeout",),
         setup=write("t.yaml", "task: sinusoid\ntrial_timeout: 5m\n")),
    Case("pruner-resource-seconds-without-trial-timeout", ("--pruner-resource", "seconds"),
         ("trial_timeout",)),
    Case("pruner-resource-seconds-with-median", ("--pruner-resource", "seconds",
                                                 "--trial-timeout", "5", "--pruner", "median"),
         ("hyperband",)),
    Case("pruner-resource-unknown", ("--pruner-resource", "steps"), ("--pruner-resource",),
         subprocess=True),
    Case("config-pruner-resource-typo", ("--config", "{d}/r.yaml"), ("did you mean 'seconds'",),
         setup=write("r.yaml", "task: sinusoid\npruner_resource: secs\n")),
    Case("trials-0", ("--trials", "0"), ("trials",)),
    Case("meta-steps-0", ("--meta-steps", "0"), ("meta_steps", "meta-steps")),
    Case("eval-every-negative", ("--eval-every", "-1"), ("eval_every", "eval-every")),
    Case("leaderboard-top-k-negative", ("leaderboard", BASE_STUDY, "--storage", STORAGE,
                                        "--top-k", "-1", "--out", "{d}/out"),
         ("top_k", "top-k"), raw=True),
    Case("leaderboard-top-k-0", ("leaderboard", BASE_STUDY, "--storage", STORAGE,
                                 "--top-k", "0", "--out", "{d}/out"), ("top_k", "top-k"), raw=True),
    Case("range-low-is-text", ("--param", 'maml.inner_lr={low="a"}'), ("inner_lr",)),
    Case("range-low-above-high", ("--param", "maml.inner_lr={low=0.3, high=0.01}"),
         ("inner_lr",)),
    Case("range-low-nan", ("--param", "maml.inner_lr={low=nan}"), ("inner_lr",)),
    Case("choices-empty-list", ("--param", "maml.inner_lr=[]"), ("inner_lr",)),
    Case("task-param-shots-0", ("--task-param", "shots=0"), ("shots",)),
    Case("task-param-shots-text", ("--task-param", "shots=abc"), ("shots",)),
    Case("task-param-unknown", ("--task-param", "bogus=1"), ("bogus",)),
    Case("csv-path-is-a-number", ("--task", "csv", "--task-param", "path=123",
                                  "--task-param", "target=label"), ("123",)),
    *(Case(f"study-name-{key}", ("--study", name), ("study",))
      for key, name in STUDY_NAMES.items()),
]

# -- 4. one line ------------------------------------------------------------------------------
MYSQL_URL = "mysql://user:secret@127.0.0.1:1/db"
ONE_LINE = [
    Case("config-yaml-syntax-error", ("--config", "{d}/bad.yaml"), ("bad.yaml",),
         setup=write("bad.yaml", "task: [sinusoid\nseed: 0\n")),
    Case("config-toml-syntax-error", ("--config", "{d}/bad.toml"), ("bad.toml",),
         setup=write("bad.toml", 'task = "sinusoid\n')),
    Case("config-not-utf8", ("--config", "{d}/latin.toml"), ("latin.toml",),
         setup=write("latin.toml", b"\xff\xfe task = 'sinusoid'\n")),
    Case("config-is-a-directory", ("--config", "{d}/settings.toml"), ("settings.toml",),
         setup=make_dir("settings.toml"), forbidden=("does not exist",)),
    Case("config-missing-file", ("--config", "{d}/missing.toml"), ("missing.toml",)),
    Case("config-a-device", ("--config", "/dev/zero"), ("not a regular file",),
         forbidden=("does not exist",)),
    Case("config-larger-than-1-mib", ("--config", "{d}/huge.toml"), ("larger than 1 MiB",),
         setup=write("huge.toml", "# " + "x" * (1 << 20) + "\n")),
    Case("config-toml-nested-5000-deep", ("--config", "{d}/deep.toml"), ("too deeply",),
         setup=write("deep.toml", "a = " + "[" * 5000 + "1" + "]" * 5000 + "\n"),
         forbidden=("RecursionError", "internal error")),
    Case("config-yaml-nested-5000-deep", ("--config", "{d}/deep.yaml"), ("too deeply",),
         setup=write("deep.yaml", "a: " + "[" * 5000 + "1" + "]" * 5000 + "\n"),
         forbidden=("RecursionError", "internal error")),
    Case("config-json-extension", ("--config", "{d}/config.json"), ("config.json", ".json"),
         setup=write("config.json", '{"task": "sinusoid"}\n')),
    Case("config-top-level-list", ("--config", "{d}/list.yaml"), ("list.yaml",),
         setup=write("list.yaml", "- task\n- sinusoid\n")),
    Case("config-unknown-key", ("--config", "{d}/typo.toml"), ("n_trails",),
         setup=write("typo.toml", 'task = "sinusoid"\nn_trails = 1\n')),
    Case("config-n_trials-string", ("--config", "{d}/trials.yaml"), ("n_trials",),
         setup=write("trials.yaml", 'task: sinusoid\nn_trials: "5"\n'), omit=("--trials",)),
    Case("config-seed-bool", ("--config", "{d}/seed.yaml"), ("seed",),
         setup=write("seed.yaml", "task: sinusoid\nseed: true\n"), omit=("--seed",)),
    Case("storage-mysql-password-hidden", ("--storage", MYSQL_URL), ("storage", "mysql"),
         forbidden=("secret",)),
    Case("storage-postgresql-password-hidden", ("--storage", "postgresql://u:pw9@127.0.0.1:1/x"),
         ("storage", "postgresql"), forbidden=("pw9",)),
    Case("storage-unknown-scheme", ("--storage", "bogus://x"), ("storage", "bogus")),
    Case("storage-empty", ("--storage", ""), ("storage",)),
    Case("storage-sqlite-folder-missing", ("--storage", "sqlite:///{d}/nofolder/x.db"),
         ("storage", "nofolder")),
    Case("argparse-trials-not-int", ("--trials", "abc"), ("--trials", "trials"),
         subprocess=True),
    Case("argparse-unknown-flag", ("--bogus-flag",), ("--bogus-flag",), subprocess=True),
    # Names a plugin may register: refused by prepare, naming the built-in ones.
    Case("unknown-pruner", ("--pruner", "asha"), ("pruner 'asha'", "hyperband")),
    Case("unknown-sampler", ("--sampler", "cmaes"), ("sampler 'cmaes'", "tpe")),
    Case("pruner-typo", ("--pruner", "hyperbnd"), ("did you mean 'hyperband'",)),
    Case("source-in-capitals", ("--sources", "MLP"), ("did you mean 'mlp'",)),
    Case("image-folder-of-empty-nested-folders",
         ("--task", "image-folder", "--task-param", "path={d}/photos", "--sources", "raw",
          "--algorithms", "nearest-centroid"), ("holds no images",),
         setup=lambda d: [make_dir(p)(d) for p in ("photos/a/b/c", "photos/d/e")],
         forbidden=("WARNING", "ignoring")),
    Case("algorithm-in-capitals", ("--algorithms", "MAML"), ("did you mean 'maml'",)),
    Case("plugin-options-unknown-plugin", ("--plugin-option", "nosuch.path=x"),
         ("plugins.nosuch", "not installed")),
    Case("in-memory-storage", ("--storage", "sqlite:///:memory:"), ("in-memory", "file")),
    Case("plugin-options-by-registered-name", ("--plugin-option", "iris.path=x"),
         ("plugins.iris", "sklearn-datasets", "sklearn-datasets.KEY=VALUE")),
    Case("plugin-option-malformed", ("--plugin-option", "nodot=x"), ("PLUGIN.KEY=VALUE",)),
    Case("wilcoxon-one-val-episode", ("--task", "iris", "--algorithms", "protonet",
                                      "--pruner", "wilcoxon"), ("wilcoxon", "episodes")),
    Case("warm-start-unknown-study", ("--warm-start", "nosuch"), ("nosuch", "warm_start")),
    Case("warm-start-not-a-study-name", ("--warm-start", "../x"), ("study name",)),
    Case("warm-start-missing-storage", ("--warm-start", "base@sqlite:///{d}/none.db"),
         ("none.db",)),
    Case("argparse-no-command", (), ("command",), raw=True, subprocess=True),
    Case("unknown-task-suggests", ("--task", "sinusiod"), ("sinusoid",)),
    Case("unknown-algorithm", ("--algorithms", "mamll"), ("mamll",)),
    Case("resume-with-other-settings", ("--study", BASE_STUDY, "--meta-steps", "3"),
         ("meta_steps", "meta-steps")),
    Case("resume-with-a-trial-timeout", ("--study", BASE_STUDY, "--trial-timeout", "5"),
         ("trial_timeout: None -> 5.0",)),
    Case("resume-with-another-warm-start", ("--study", BASE_STUDY, "--warm-start", "other"),
         ("warm_start",)),
    Case("storage-not-a-database", ("--storage", "sqlite:///{d}/t.txt"), ("not a database",),
         setup=write("t.txt", "hello")),
    Case("warm-start-not-a-database", ("--warm-start", "base@sqlite:///{d}/t.txt"),
         ("not a database",), setup=write("t.txt", "hello")),
    Case("warm-start-no-url", ("--warm-start", "base@"), ("no storage URL",)),
    Case("warm-start-misspelt-study", ("--warm-start", "bsae"), ("did you mean 'base'",)),
]

# -- 5. hostile files -------------------------------------------------------------------------
HOSTILE = [
    Case("yaml-alias-bomb", ("--config", "{d}/bomb.yaml"), ("algorithms", "alias", "bomb.yaml"),
         setup=write("bomb.yaml", alias_bomb()), omit=("--algorithms",), subprocess=True),
    Case("csv-duplicate-target-column", ("--task", "csv", "--task-param", "path={d}/f.csv",
                                         "--task-param", "target=label"), ("label",),
         setup=write("f.csv", "a,label,label\n" + CSV_ROWS)),
    Case("csv-header-of-1000000-columns", ("--task", "csv", "--task-param", "path={d}/w.csv",
                                           "--task-param", "target=c0"), ("header",),
         setup=write("w.csv", ",".join(f"c{i}" for i in range(1_000_000)) + "\n"
                     + ",".join("1" * 1_000_000) + "\n")),
    Case("csv-header-of-200000-short-columns", ("--task", "csv", "--task-param",
                                                "path={d}/n.csv", "--task-param", "target=c"),
         ("200,000 columns",),
         setup=write("n.csv", ",".join("c" for _ in range(200_000)) + "\n")),
]

# Pillow warns from 89,478,485 pixels and refuses from twice that; both are one line here.
IMAGE_BOMBS = [
    Case(f"image-folder-png-of-{w}x{h}-pixels",
         ("--task", "image-folder", "--task-param", "path={d}/photos", "--sources", "raw",
          "--algorithms", "nearest-centroid", "--task-param", "episodes=split"),
         ("bomb.png", "decompression bomb"),
         setup=png_bomb("bomb.png", w, h), subprocess=True,
         forbidden=("DecompressionBombWarning", "Traceback"))
    for w, h in ((10_000, 9_000), (20_000, 20_000))
]

CASES = [*EXECUTION, *BEFORE_STORING, *BOUNDS, *ONE_LINE, *HOSTILE, *IMAGE_BOMBS]
