"""Every bad input of every command ends the same way (issue 10): exactly one line on stderr
that names the problem, the exact exit status, no traceback, nothing written, and nothing slow
loaded first (the encoder's weights never, the data only where the check needs it).

Each table row: (argv, exit status, regex of the one stderr line, whether the data may be
read).  ``{data}``, ``{enc}``, ``{file}``, ``{empty}``, ``{tmp}`` are filled in per test.
"""
import re

import pytest

from reference.pipeline import cli, demo, encoders, features, predict, train
from scratch.pipeline import data, encoder_names  # data loading and encoder names live there
from tests.imdb_fixtures import make_archive, make_tree, save_tiny_checkpoint, save_tiny_encoder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 reviews per split (6 per class), a tiny encoder folder, a file, an empty folder."""
    root = tmp_path_factory.mktemp("world")
    make_tree(root)
    save_tiny_encoder(root / "tiny-bert")
    (root / "a-file").write_text("not a folder")
    (root / "empty").mkdir()
    make_archive(root / "bad.tar.gz", {"aclImdb/README": b"x"})
    return root


@pytest.fixture
def guarded(world, tmp_path, monkeypatch):
    """Run in an empty working folder; loading encoder weights fails the test; returns a
    function telling whether the data was read."""
    monkeypatch.chdir(tmp_path)

    class NoWeights:
        @staticmethod
        def from_pretrained(*a, **k):
            pytest.fail("encoder weights were loaded before the bad input was reported")

    monkeypatch.setattr(encoders, "AutoModel", NoWeights)
    reads = []
    real = data.load_imdb
    monkeypatch.setattr(data, "load_imdb", lambda *a, **k: (reads.append(a), real(*a, **k))[1])
    return lambda: bool(reads)


def fill(argv, world, tmp_path):
    return [a.format(data=world / "aclImdb", enc=world / "tiny-bert", file=world / "a-file",
                     empty=world / "empty", tmp=tmp_path, bad=world / "bad.tar.gz")
            for a in argv]


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def assert_one_line_failure(main, argv, code, pattern, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert e.value.code == code, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


NO_CUDA = "--device cuda: no CUDA device is available"

FEATURES = [
    (["--encoder", "nope"], 2, r"unknown encoder 'nope'", False),
    (["--encoder", "{empty}"], 2, r"empty: no readable config.json", False),
    (["--max-length", "1"], 2,
     r"--max-length must be in 2\.\.512 \(tiny-bert's positions\), got 1", False),
    (["--max-length", "513"], 2, r"--max-length must be in 2\.\.512 .*got 513", False),
    (["--max-length", "ten"], 2, r"argument --max-length: invalid int value: 'ten'", False),
    (["--limit-train", "0"], 2, r"argument --limit-train: must be > 0, got 0", False),
    (["--limit-test", "-3"], 2, r"argument --limit-test: must be > 0, got -3", False),
    (["--limit-train", "13"], 2, r"--limit-train 13 is larger than the split \(12 reviews\)", True),
    (["--limit-test", "99"], 2, r"--limit-test 99 is larger than the split \(12 reviews\)", True),
    (["--batch-tokens", "100"], 2,
     r"--batch-tokens must be >= --max-length \(512\).*got 100", False),
    (["--batch-tokens", "0"], 2, r"argument --batch-tokens: must be > 0, got 0", False),
    (["--shard-size", "0"], 2, r"argument --shard-size: must be > 0, got 0", False),
    (["--seed", "-1"], 2, r"argument --seed: must be >= 0, got -1", False),
    (["--device", "cuda"], 2, NO_CUDA, False),
    (["--device", "tpu"], 2, r"argument --device: invalid choice: 'tpu'", False),
    (["--cache", "{file}"], 2, r"--cache .*a-file: exists and is not a directory", False),
    (["--cache", "{file}/sub"], 2, r"--cache .*a-file/sub: .*a-file is not a directory", False),
    (["--data", "/no/such/imdb.tar.gz"], 2,
     r"/no/such/imdb.tar.gz: no such file or directory", False),
    (["--data", "{bad}"], 2, r"bad.tar.gz: no reviews under aclImdb/train/neg/", True),
    (["--bogus"], 2, r"unrecognized arguments: --bogus", False),
]


@pytest.mark.parametrize("argv, code, pattern, reads_data", FEATURES,
                         ids=[" ".join(r[0]) for r in FEATURES])
def test_features_bad_input(world, tmp_path, guarded, monkeypatch, capsys, argv, code, pattern,
                            reads_data):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    before = files_under(tmp_path)
    base = ["--data", "{data}", "--encoder", "{enc}", "--cache", "{tmp}/cache", "--no-progress"]
    assert_one_line_failure(features.main, fill(base + argv, world, tmp_path), code, pattern,
                            capsys)
    assert guarded() == reads_data
    assert files_under(tmp_path) == before                  # no cache entry, no folder


TRAIN = [
    (["--encoder", "nope"], 2, r"unknown encoder 'nope'", False),
    (["--encoder", "{empty}"], 2, r"no readable config.json", False),
    (["--max-length", "600"], 2, r"--max-length must be in 2\.\.512 .*got 600", False),
    (["--limit-train", "0"], 2, r"argument --limit-train: must be > 0, got 0", False),
    (["--limit-train", "13"], 2, r"--limit-train 13 is larger than the split \(12 reviews\)", True),
    (["--limit-test", "13"], 2, r"--limit-test 13 is larger than the split \(12 reviews\)", True),
    (["--lr", "inf"], 2, r"argument --lr: must be > 0, got inf", False),
    (["--dropout", "nan"], 2, r"--dropout must be in \[0, 1\), got nan", False),
    (["--seed", "-5"], 2, r"argument --seed: must be >= 0", False),
    (["--device", "cuda"], 2, NO_CUDA, False),
    (["--cache", "{file}"], 2, r"--cache .*a-file: exists and is not a directory", False),
    (["--out", "{file}"], 2, r"--out .*a-file: exists and is not a directory", False),
    (["--resume"], 2, r"--resume: .*last.pt does not exist \(nothing to resume\)", False),
    (["--data", "/no/such"], 2, r"/no/such: no such file or directory", False),
]


@pytest.mark.parametrize("argv, code, pattern, reads_data", TRAIN,
                         ids=[" ".join(r[0]) for r in TRAIN])
def test_train_bad_input(world, tmp_path, guarded, monkeypatch, capsys, argv, code, pattern,
                         reads_data):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    before = files_under(tmp_path)
    base = ["--data", "{data}", "--encoder", "{enc}", "--cache", "{tmp}/cache",
            "--out", "{tmp}/run", "--no-progress"]
    assert_one_line_failure(train.main, fill(base + argv, world, tmp_path), code, pattern, capsys)
    assert guarded() == reads_data
    assert files_under(tmp_path) == before


def test_train_resume_of_a_damaged_state_is_one_line(world, tmp_path, monkeypatch, capsys):
    """--resume with a truncated last.pt: refused in one line, and the run folder untouched."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    argv = fill(["--data", "{data}", "--encoder", "{enc}", "--cache", "{tmp}/cache", "--out",
                 "{tmp}/run", "--no-progress", "--resume", "--max-length", "16"], world, tmp_path)
    before = files_under(run)
    assert_one_line_failure(train.main, argv, 2, r"--resume: .*last.pt: unreadable resume state",
                            capsys)
    assert files_under(run) == before


PREDICT = [
    ([], 2, r"no review to score: give TEXT arguments or --file PATH"),
    ([""], 2, r"review argument 1 is empty: nothing to score"),
    (["fine", " \t\n "], 2, r"review argument 2 is whitespace only: nothing to score"),
    (["bad \udcff byte"], 2, r"review argument 1 is not valid UTF-8 \(byte 0xff at position 5\)"),
    (["--file", "{tmp}/nope.txt"], 2, r"--file .*nope.txt: No such file or directory"),
    (["--file", "{tmp}/latin1.txt"], 2,
     r"--file .*latin1.txt: line 2 is not valid UTF-8 \(byte 0xe9 at position 7\)"),
    (["--file", "{tmp}/blank.txt"], 2, r"--file .*blank.txt: line 2 is empty"),
    (["--file", "{tmp}/empty.txt"], 2, r"no review to score"),
    (["--device", "cuda", "fine"], 2, NO_CUDA),
    (["--batch-size", "0", "fine"], 2, r"argument --batch-size: must be > 0, got 0"),
    (["--checkpoint", "{tmp}/none", "fine"], 2, r"none: no such checkpoint directory"),
    (["--checkpoint", "{empty}", "fine"], 2, r"empty: no config.json \(not a finished"),
]


@pytest.mark.parametrize("argv, code, pattern", PREDICT, ids=[" ".join(r[0]) for r in PREDICT])
def test_predict_bad_input(world, tmp_path, guarded, monkeypatch, capsys, argv, code, pattern):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    save_tiny_checkpoint(tmp_path / "ckpt", world / "tiny-bert")
    (tmp_path / "latin1.txt").write_bytes("a fine film\nun caf\xe9 noir\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_bytes(b"a fine film\n\nanother\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    before = files_under(tmp_path)
    argv = fill(["--checkpoint", "{tmp}/ckpt"] + argv, world, tmp_path)
    assert_one_line_failure(predict.main, argv, code, pattern, capsys)
    assert files_under(tmp_path) == before


DEMO = [
    (["--data", "/no/such/imdb.tar.gz"], {}, r"/no/such/imdb.tar.gz: no such file or directory"),
    ([], {"IMDB_PATH": "/no/such/dir"}, r"/no/such/dir: no such file or directory"),
    (["--data", "{bad}"], {}, r"bad.tar.gz: no reviews under aclImdb/train/neg/"),
    (["--data", "{data}", "--out", "{file}"], {}, r"--out .*a-file: exists and is not a directory"),
]


@pytest.mark.parametrize("argv, env, pattern", DEMO,
                         ids=[" ".join(r[0]) or str(r[1]) for r in DEMO])
def test_demo_bad_input(world, tmp_path, guarded, monkeypatch, capsys, argv, env, pattern):
    monkeypatch.delenv("IMDB_PATH", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = files_under(tmp_path)
    assert_one_line_failure(demo.main, fill(argv, world, tmp_path), 2, pattern, capsys)
    assert files_under(tmp_path) == before


def test_parser_errors_are_one_line_without_usage(capsys):
    p = cli.Parser(prog="prog")
    p.add_argument("--n", type=cli.positive(int), required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "prog: error: argument --n: 'x' is not a number\n"


def test_run_ends_on_sigterm_like_ctrl_c_with_one_line(capsys, caplog):
    """cli.run: SIGTERM raises KeyboardInterrupt in the command, so its clean-up runs (a cache
    entry without shards is removed); one line, exit status 130; INFO lines reach stderr."""
    import logging
    import os
    import signal
    import time

    cleaned = []

    def main():
        logging.getLogger("reference.pipeline.features").info("resuming: 1 of 2 shards done")
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    assert cli.run(main, "prog") == 130
    assert cleaned == [True]
    assert capsys.readouterr().err == "resuming: 1 of 2 shards done\nprog: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is before
    assert logging.getLogger("reference").propagate


def test_encoder_auto_explains_its_choice_only_when_the_checks_pass(tmp_path, monkeypatch, capsys,
                                                                   caplog):
    """--encoder auto without bert-base-uncased logs that it uses MiniLM; a failing check
    prints its one line alone, a passing one lets the note through."""
    monkeypatch.setattr(encoder_names, "local_bert_base", lambda: None)
    p = cli.Parser(prog="prog")
    with pytest.raises(SystemExit):
        cli.check_encoder(p, "auto", 600)
    assert capsys.readouterr().err == ("prog: error: --max-length must be in 2..512 "
                                       "(minilm's positions), got 600\n")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="scratch.pipeline.encoder_names"):
        assert cli.check_encoder(p, "auto", 128).name == "minilm"
    assert any("using the packaged all-MiniLM-L6-v2" in m for m in caplog.messages)
