"""IMDB loading, download, split, tokenization and bucketing: on archives the tests make, and on
the real archive (IMDB_PATH)."""
import hashlib
import http.server
import threading

import numpy as np
import pytest

from reference.pipeline import data as D
from tests.imdb_fixtures import make_archive, make_tree, tokenizer, tree_files


def test_directory_and_archive_give_the_same_reviews(tmp_path):
    make_tree(tmp_path / "dir", n_per_class=5)
    arc = make_archive(tmp_path / "a.tar.gz", dict(reversed(list(tree_files(5).items()))))
    a, b = D.load_imdb(tmp_path / "dir"), D.load_imdb(arc)
    for split in ("train", "test"):
        assert a[split].texts == b[split].texts and a[split].names == b[split].names
        np.testing.assert_array_equal(a[split].labels, b[split].labels)
        assert len(a[split]) == 10 and a[split].labels.sum() == 5
    assert b["train"].names[:2] == ["aclImdb/train/neg/0_2.txt", "aclImdb/train/neg/1_2.txt"]
    assert b["train"].labels.tolist() == [0] * 5 + [1] * 5


def test_ignores_unsup_and_other_members(tmp_path):
    files = tree_files(3) | {"aclImdb/train/unsup/0_0.txt": b"x", "aclImdb/imdb.vocab": b"a\nb",
                             "aclImdb/train/labeledBow.feat": b"0 0:1"}
    d = D.load_imdb(make_archive(tmp_path / "a.tar.gz", files))
    assert len(d["train"]) == 6 and len(d["test"]) == 6


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("layout", r"no reviews under aclImdb/test/neg"),
    ("empty", r"aclImdb/train/pos/1_8.txt: empty review"),
    ("utf8", r"aclImdb/train/pos/1_8.txt: not valid UTF-8"),
    ("corrupt", "corrupt or unreadable archive"),
    ("nodir", "no aclImdb/ folder"),
])
def test_bad_input_is_a_clear_error_naming_the_file(tmp_path, case, match):
    files = tree_files(3)
    path = tmp_path / "a.tar.gz"
    if case == "missing":
        path = tmp_path / "nope.tar.gz"
    elif case == "layout":
        make_archive(path, {k: v for k, v in files.items() if "test/neg" not in k})
    elif case in ("empty", "utf8"):
        files["aclImdb/train/pos/1_8.txt"] = b"  \n" if case == "empty" else b"caf\xe9"
        make_archive(path, files)
    elif case == "corrupt":
        raw = (make_archive(tmp_path / "ok.tar.gz", files)).read_bytes()
        path.write_bytes(raw[: len(raw) // 2] + b"\x00" * 64)
    elif case == "nodir":
        path = tmp_path / "empty_dir"
        path.mkdir()
    with pytest.raises(D.ImdbError, match=match):
        D.load_imdb(path)


def test_real_archive_counts_and_exact_bytes(imdb_path):
    """The loaded text is the original bytes: the README's content-level sha256 matches."""
    d = D.load_imdb(imdb_path)
    lines = []
    for split in ("train", "test"):
        r = d[split]
        assert len(r) == 25_000 and int(r.labels.sum()) == 12_500
        lines += [f"{hashlib.sha256(t.encode('utf-8')).hexdigest()}  {n}\n"
                  for t, n in zip(r.texts, r.names, strict=True)]
    lines.sort(key=lambda s: s.split("  ", 1)[1])
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert digest == "b155ae18c4016500d64b7ea091f3f04c4ea9e702ab3bdb2b4aa0effbd4da11c6"


def test_split_sizes_determinism_and_seed():
    tr, va = D.train_valid_split()
    assert len(tr) == 17_500 and len(va) == 7_500
    assert len(np.union1d(tr, va)) == 25_000 and len(np.intersect1d(tr, va)) == 0
    tr2, va2 = D.train_valid_split()
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, D.train_valid_split(seed=1)[1])
    with pytest.raises(ValueError):
        D.train_valid_split(10, 10)


def test_stratified_subset_keeps_proportions():
    labels = np.array([0] * 300 + [1] * 100)
    idx = D.stratified_subset(labels, 40, seed=1)
    assert len(idx) == 40 and len(set(idx)) == 40 and (labels[idx] == 1).sum() == 10
    np.testing.assert_array_equal(idx, D.stratified_subset(labels, 40, seed=1))
    assert len(D.stratified_subset(labels, 7)) == 7


def test_tokenize_truncates_to_max_length_with_cls_and_sep():
    tok = tokenizer()
    long_text = "word " * 2000 + "unbelievably"
    ids = D.tokenize(tok, ["Hello WORLD how ARE yoU?", long_text], max_length=512)
    assert ids[0].tolist() == [101, 7592, 2088, 2129, 2024, 2017, 1029, 102]
    expected = [101] + tok.convert_tokens_to_ids(tok.tokenize(long_text))[:510] + [102]
    assert ids[1].tolist() == expected and len(ids[1]) == 512
    assert len(D.tokenize(tok, [long_text], max_length=20)[0]) == 20


def test_bucket_batches_cover_everything_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 512, size=1000)
    for shuffle in (False, True):
        batches = D.bucket_batches(lengths, 32, shuffle=shuffle, seed=3)
        allidx = np.concatenate(batches)
        assert sorted(allidx.tolist()) == list(range(1000))
        assert all(1 <= len(b) <= 32 for b in batches)
    pad = lambda bs: sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)  # noqa: E731
    random_batches = np.array_split(rng.permutation(1000), 32)
    assert pad(D.bucket_batches(lengths, 32, seed=3)) < 0.1 * pad(random_batches)
    a = D.bucket_batches(lengths, 32, seed=3)
    assert all(np.array_equal(x, y)
               for x, y in zip(a, D.bucket_batches(lengths, 32, seed=3), strict=True))
    assert not all(np.array_equal(x, y)
                   for x, y in zip(a, D.bucket_batches(lengths, 32, seed=4), strict=True))


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload; honours Range unless ``honour_range`` is off; records requests."""
    payload, honour_range, seen = b"", True, []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).seen.append(rng)
        body, status = self.payload, 200
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            body, status = body[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server(tmp_path):
    payload = make_archive(tmp_path / "served.tar.gz", tree_files(4)).read_bytes()
    RangeHandler.payload, RangeHandler.honour_range, RangeHandler.seen = payload, True, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/aclImdb_v1.tar.gz"
    yield url, payload, hashlib.sha256(payload).hexdigest()
    httpd.shutdown()


def test_download_verifies_and_leaves_no_part(server, tmp_path):
    url, payload, sha = server
    path = D.download_imdb(tmp_path / "c", url=url, sha256=sha, progress=False)
    assert path.read_bytes() == payload and not list((tmp_path / "c").glob("*.part"))
    assert len(D.load_imdb(path)["train"]) == 8
    RangeHandler.seen.clear()
    assert D.download_imdb(tmp_path / "c", url=url, sha256=sha, progress=False) == path
    assert RangeHandler.seen == []                      # verified copy: no request at all


@pytest.mark.parametrize("honour_range", [True, False])
def test_interrupted_download_resumes_or_restarts(server, tmp_path, honour_range):
    url, payload, sha = server
    RangeHandler.honour_range = honour_range
    cache = tmp_path / "c"
    cache.mkdir()
    half = len(payload) // 2
    (cache / "aclImdb_v1.tar.gz.part").write_bytes(payload[:half])    # an interrupted run
    path = D.download_imdb(cache, url=url, sha256=sha, progress=False)
    assert path.read_bytes() == payload
    assert RangeHandler.seen == [f"bytes={half}-"]


def test_bad_checksum_never_leaves_a_file_under_the_final_name(server, tmp_path):
    url, payload, sha = server
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "aclImdb_v1.tar.gz.part").write_bytes(b"garbage!" * 10)   # a corrupt partial file
    with pytest.raises(D.ImdbError, match="sha256 mismatch"):
        D.download_imdb(cache, url=url, sha256=sha, progress=False)
    assert list(cache.iterdir()) == []
    assert D.download_imdb(cache, url=url, sha256=sha, progress=False).read_bytes() == payload


def test_find_imdb_env_and_how_to_get(tmp_path, monkeypatch):
    monkeypatch.delenv("IMDB_PATH", raising=False)
    with pytest.raises(D.ImdbError, match="IMDB_PATH"):
        D.find_imdb(None, cache_dir=tmp_path)
    monkeypatch.setenv("IMDB_PATH", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(D.ImdbError, match="missing.tar.gz: no such file"):
        D.find_imdb(None, cache_dir=tmp_path)
    arc = make_archive(tmp_path / "x.tar.gz", tree_files(2))
    monkeypatch.setenv("IMDB_PATH", str(arc))
    assert D.find_imdb(None) == arc


def test_cli_reports_counts_and_errors(tmp_path, capsys):
    arc = make_archive(tmp_path / "x.tar.gz", tree_files(2))
    assert D.main(["--data", str(arc)]) == 0
    assert "train: 4 reviews, 2 positive" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        D.main(["--data", str(tmp_path / "nope")])
    assert e.value.code == 2
