"""Every command's argparse usage errors are one line (issue 22): ``PROG: error: MESSAGE`` on
stderr, exit status 2, no usage block, no traceback.  Each module's ``main`` is called in this
process with a bad option; nothing slow runs first (options are parsed before anything is
loaded)."""
import importlib
import re

import pytest

# argparse names missing required arguments before unrecognized ones
BOGUS = r"unrecognized arguments: --bogus|the following arguments are required"

CASES = [
    ("reference.compare", ["--bogus"], r"unrecognized arguments: --bogus"),
    ("reference.compare", ["--only", "nosuch"], r"argument --only: unknown suite 'nosuch'"),
    ("reference.compare", ["--threads", "0"], r"argument --threads: must be > 0, got 0"),
    ("reference.pipeline.data", ["--bogus"], r"unrecognized arguments: --bogus"),
    ("reference.pipeline.encoders", ["--bogus"], BOGUS),
    ("reference.pipeline.encoders", [], r"the following arguments are required: cmd"),
    ("reference.pipeline.encoders", ["install", "bert"],
     r"encoders install: error: argument name: invalid choice: 'bert'"),
    ("reference.pipeline.encoders", ["install", "mpnet", "--wheels", "{tmp}/nowhere"],
     r"encoders install: error: --wheels .*nowhere: no such directory"),
    ("reference.pipeline.encoders", ["install", "mpnet", "--wheels", "{tmp}/a-file"],
     r"encoders install: error: --wheels .*a-file: not a directory"),
    ("reference.pipeline.encoders", ["nosuch"], r"argument cmd: invalid choice: 'nosuch'"),
    ("reference.pipeline.features", ["--bogus"], r"unrecognized arguments: --bogus"),
    ("reference.pipeline.train", ["--bogus"], BOGUS),
    ("reference.pipeline.train", ["--epochs", "x"], r"argument --epochs: "),
    ("reference.pipeline.predict", ["--bogus"], BOGUS),
    ("reference.pipeline.predict", ["x"], r"the following arguments are required: --checkpoint"),
    ("reference.pipeline.checkpoint", [], r"the following arguments are required: cmd"),
    ("reference.pipeline.checkpoint", ["stamp"], r"stamp: error: the following arguments are "),
    ("reference.pipeline.demo", ["--bogus"], r"unrecognized arguments: --bogus"),
    ("reference.pipeline.attention_swap", ["--bogus"], r"unrecognized arguments: --bogus"),
    ("scratch.pipeline.features", [], r"the following arguments are required: cmd"),
    ("scratch.pipeline.features", ["verify"], r"verify: error: the following arguments are "),
    ("scratch.pipeline.train", ["--bogus"], BOGUS),
    ("scratch.pipeline.predict", ["--bogus"], BOGUS),
    ("scratch.pipeline.predict", ["--dtype", "float16"], r"argument --dtype: invalid choice"),
]


@pytest.mark.parametrize("module, argv, pattern", CASES,
                         ids=[f"{m} {' '.join(a)}" for m, a, _ in CASES])
def test_usage_errors_are_one_line(module, argv, pattern, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMDB_PATH", raising=False)
    (tmp_path / "a-file").write_text("x")
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    assert re.match(r"python -m \S+( \w+)?: error: ", lines[0]), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]      # nothing written


def test_every_command_module_is_covered():
    """A new command module (one with a ``main``) must join the table above."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    commands = {f"{d}.{f.stem}" for d in ("reference", "reference.pipeline", "scratch.pipeline")
                for f in (root / d.replace(".", "/")).glob("*.py")
                if re.search(r"^def main\(", f.read_text(), re.M)}
    assert commands == {m for m, _, _ in CASES}
