"""A user's own labelled table as --data (scratch.pipeline.tables): the four formats read alike,
label names kept to predict, the three ways to get a test set, and bad tables as one-line
errors (exit 2), on tables and a tiny encoder the tests make."""
import json

import numpy as np
import pandas as pd
import pytest

from reference.pipeline import features as rfeatures
from reference.pipeline import predict as rpredict
from reference.pipeline import train as rtrain
from scratch.pipeline import predict as spredict
from scratch.pipeline import train as strain
from scratch.pipeline.data import train_valid_split
from scratch.pipeline.tables import TableError, load_table, read_table
from tests.imdb_fixtures import review, save_tiny_encoder

N = 30
TEXTS = [review(i, i % 2 == 0) for i in range(N)]
NAMES = ["good" if i % 2 == 0 else "bad" for i in range(N)]


def frame(n=N, **extra) -> pd.DataFrame:
    return pd.DataFrame({"review": TEXTS[:n], "sentiment": NAMES[:n], **extra})


def write(df: pd.DataFrame, path):
    fmt = path.suffix
    if fmt == ".csv":
        df.to_csv(path, index=False)
    elif fmt == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tables") / "tiny-bert")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_reads_the_same_reviews(tmp_path, suffix):
    df = frame()
    df.loc[3, "review"] = 'Quotes "inside", a comma,\ta tab and\na newline: é ✓'
    t = read_table(write(df, tmp_path / f"r{suffix}"), "review", "sentiment")
    assert t.texts == df["review"].tolist()
    assert t.labels == NAMES and t.rows == list(range(1, N + 1))


def test_labels_sorted_names_or_zero_one(tmp_path):
    data, notes, warnings = load_table(write(frame(), tmp_path / "r.csv"), "review", "sentiment")
    assert data["train"].label_names == ("bad", "good") and not warnings
    assert "'bad' -> 0, 'good' -> 1 (sorted)" in notes[0]
    for split in ("train", "test"):
        r = data[split]
        assert [("bad", "good")[y] for y in r.labels] == [NAMES[int(n.split()[-1]) - 1]
                                                          for n in r.names]
    df = pd.DataFrame({"text": TEXTS, "label": [i % 2 for i in range(N)]})
    for suffix in (".csv", ".jsonl", ".parquet"):      # numbers, "0"/"1" strings alike
        data, _, _ = load_table(write(df, tmp_path / f"z{suffix}"))
        assert data["train"].label_names is None
        assert sorted(data["train"].labels.tolist() + data["test"].labels.tolist()) == \
            sorted(df["label"].tolist())
    df["label"] = df["label"].astype(bool)
    assert load_table(write(df, tmp_path / "b.parquet"))[0]["train"].label_names is None


def test_seeded_test_split_is_train_valid_split(tmp_path):
    data, notes, _ = load_table(write(frame(), tmp_path / "r.csv"), "review", "sentiment",
                                seed=11)
    tr, te = train_valid_split(N, round(N * 0.2), 11)
    assert data["train"].texts == [TEXTS[i] for i in tr]
    assert data["test"].texts == [TEXTS[i] for i in te]
    assert "seeded 20% test split (seed 11): 24 train, 6 test" in notes[-1]


def test_split_column_and_test_data(tmp_path):
    split = ["test" if i % 5 == 0 else "train" for i in range(N)]
    data, notes, _ = load_table(write(frame(part=split), tmp_path / "r.jsonl"), "review",
                                "sentiment", "part")
    assert data["test"].texts == [TEXTS[i] for i in range(N) if i % 5 == 0]
    assert data["train"].texts == [TEXTS[i] for i in range(N) if i % 5]
    assert "split column 'part': 24 train, 6 test" in notes[-1]
    other = pd.DataFrame({"review": ["A new one.", "Another."], "sentiment": ["good", "bad"]})
    data, notes, warnings = load_table(write(frame(), tmp_path / "a.csv"), "review", "sentiment",
                                       test_data=write(other, tmp_path / "b.parquet"))
    assert data["train"].texts == TEXTS and data["test"].texts == ["A new one.", "Another."]
    assert data["test"].labels.tolist() == [1, 0] and not warnings


def test_duplicates_across_train_and_test_are_a_warning(tmp_path):
    other = pd.DataFrame({"review": [TEXTS[0], TEXTS[1], "new"], "sentiment": ["good"] * 3})
    _, _, warnings = load_table(write(frame(), tmp_path / "a.csv"), "review", "sentiment",
                                test_data=write(other, tmp_path / "b.csv"))
    assert warnings == ["2 of the 3 test reviews are also among the train reviews "
                        "(identical text): the test accuracy is not a held-out one"]


BAD = [
    ("missing column", lambda df: df.drop(columns="sentiment"), "no column 'sentiment'"),
    ("three labels", lambda df: df.assign(sentiment=["a", "b", "c"] * 10),
     "more than two labels ('a', 'b', 'c')"),
    ("one class", lambda df: df.assign(sentiment="good"), "one class only"),
    ("empty text", lambda df: df.assign(review=["x"] * 6 + [""] + ["x"] * 23),
     "row 7: empty text in column 'review'"),
    ("empty label", lambda df: df.assign(sentiment=NAMES[:4] + [None] + NAMES[5:]),
     "row 5: empty label"),
    ("bad split", lambda df: df.assign(part=["train"] * 29 + ["dev"]),
     "row 30: split 'dev' in column 'part' is neither 'train' nor 'test'"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_bad_tables_are_one_line_errors_of_every_command(tmp_path, encoder, capsys, name,
                                                         change, message, suffix):
    path = write(change(frame()), tmp_path / f"bad{suffix}")
    common = ["--data", str(path), "--encoder", str(encoder), "--max-length", "32",
              "--text-column", "review", "--label-column", "sentiment", "--no-progress",
              "--cache", str(tmp_path / "cache")] + (["--split-column", "part"]
                                                     if name == "bad split" else [])
    for main, extra in ((strain.main, ["--out", str(tmp_path / "s")]),
                        (rtrain.main, ["--out", str(tmp_path / "r"), "--device", "cpu"]),
                        (rfeatures.main, ["--device", "cpu"])):
        with pytest.raises(SystemExit) as e:
            main(common + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_non_text_cell_names_its_row(tmp_path):
    path = tmp_path / "n.jsonl"
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    rows[4]["text"] = 42
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TableError, match=r"row 5: the text in column 'text' is a int \(42\)"):
        read_table(path)
    (tmp_path / "u.csv").write_bytes(b"text,label\n\xff\xfe bad,1\n")
    with pytest.raises(TableError, match="not valid UTF-8"):
        read_table(tmp_path / "u.csv")


def test_table_options_need_a_table(tmp_path, encoder, capsys):
    (tmp_path / "aclImdb").mkdir()
    with pytest.raises(SystemExit) as e:
        strain.main(["--data", str(tmp_path / "aclImdb"), "--encoder", str(encoder),
                     "--out", str(tmp_path / "o"), "--text-column", "review"])
    assert e.value.code == 2 and "only for a table --data" in capsys.readouterr().err


def test_train_on_a_table_both_sides_and_predict_prints_the_names(tmp_path, encoder, capsys):
    """Both train commands on a user's CSV: the names go into config.json, both predicts print
    them; the scratch run's split is the seeded one the notes state."""
    path = write(frame(), tmp_path / "mine.csv")
    common = ["--data", str(path), "--encoder", str(encoder), "--max-length", "32",
              "--text-column", "review", "--label-column", "sentiment", "--no-progress",
              "--cache", str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "4"]
    assert strain.main(common + ["--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "seeded 20% test split (seed 3407): 24 train, 6 test" in out
    assert "data " in out and "24 train / 6 test reviews" in out
    assert rtrain.main(common + ["--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    capsys.readouterr()
    for run in ("s", "r"):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["labels"] == ["bad", "good"]
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (17, 7, 6)
        for predict in (spredict.main, rpredict.main):
            assert predict(["--checkpoint", str(tmp_path / run), "great film", "awful"]) == 0
            words = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
            assert len(words) == 2 and set(words) <= {"good", "bad"}
    np.testing.assert_array_equal(*[json.loads((tmp_path / r / "metrics.json").read_text())
                                    ["n_test"] for r in ("s", "r")])
