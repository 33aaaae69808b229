"""``python -m reference.pipeline.demo`` on a fresh machine (issue 22): no ``--data``, no
``IMDB_PATH``, no copy yet -> it downloads the archive (verified, into the user cache folder it
names) and goes on; offline -> one line saying how to get the data, exit status 1;
``--no-download`` -> how to get it, exit status 0, nothing fetched.  The archive is a tiny one
served from 127.0.0.1; the training that follows is replaced by a recorder."""
import hashlib
import http.server
import socket
import threading

import pytest

from reference.pipeline import demo
from scratch.pipeline import data as imdb
from tests.imdb_fixtures import make_archive, tree_files


class Handler(http.server.BaseHTTPRequestHandler):
    payload, requests = b"", []

    def do_GET(self):
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *a):
        pass


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A machine with no data: no IMDB_PATH, an empty user cache, the training recorded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMDB_PATH", raising=False)
    monkeypatch.setattr(imdb, "DEFAULT_CACHE", tmp_path / "user-cache" / "imdb")
    trained = []
    monkeypatch.setattr(demo, "imdb_part", lambda a, path: trained.append(path) or 0)
    return trained


@pytest.fixture
def served(tmp_path, monkeypatch):
    payload = make_archive(tmp_path / "served.tar.gz", tree_files(2)).read_bytes()
    Handler.payload, Handler.requests = payload, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(imdb, "IMDB_URL",
                        f"http://127.0.0.1:{httpd.server_address[1]}/aclImdb_v1.tar.gz")
    monkeypatch.setattr(imdb, "IMDB_SHA256", hashlib.sha256(payload).hexdigest())
    yield payload
    httpd.shutdown()


def test_no_data_downloads_into_the_user_cache_says_where_and_goes_on(fresh, served, capsys):
    assert demo.main(["--no-progress"]) == 0
    archive = imdb.DEFAULT_CACHE / "aclImdb_v1.tar.gz"
    assert archive.read_bytes() == served and fresh == [archive]
    assert not list(imdb.DEFAULT_CACHE.glob("*.part"))
    out = capsys.readouterr().out
    assert f"downloading {imdb.IMDB_URL}" in out and f"into {imdb.DEFAULT_CACHE}" in out
    assert "--no-download" in out
    assert len(imdb.load_imdb(archive)["train"]) == 4           # the served reviews, readable
    assert demo.main(["--no-progress"]) == 0                   # the second time: the copy
    assert fresh == [archive, archive] and Handler.requests == ["/aclImdb_v1.tar.gz"]
    assert "downloading" not in capsys.readouterr().out


def test_the_download_shows_a_progress_bar_on_stderr(fresh, served, capsys):
    assert demo.main([]) == 0
    assert "download aclImdb_v1.tar.gz" in capsys.readouterr().err


def test_offline_is_one_line_saying_how_to_get_the_data(fresh, monkeypatch, capsys):
    with socket.socket() as s:                                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(imdb, "IMDB_URL", f"http://127.0.0.1:{port}/aclImdb_v1.tar.gz")
    assert demo.main(["--no-progress"]) == demo.DOWNLOAD_FAILED == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("python -m reference.pipeline.demo: download of http://127.0.0.1")
    assert "--data PATH" in err[0] and "IMDB_PATH" in err[0]
    assert fresh == [] and not list(imdb.DEFAULT_CACHE.glob("aclImdb_v1.tar.gz"))


def test_a_corrupt_download_is_one_line_and_leaves_nothing(fresh, served, monkeypatch, capsys):
    monkeypatch.setattr(imdb, "IMDB_SHA256", "0" * 64)
    assert demo.main(["--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256 mismatch" in err[0] and "IMDB_PATH" in err[0]
    assert list(imdb.DEFAULT_CACHE.iterdir()) == [] and fresh == []


def test_no_download_says_how_and_fetches_nothing(fresh, served, capsys):
    assert demo.main(["--no-download"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("IMDB demo skipped (--no-download): pass --data PATH")
    assert "python -m reference.pipeline.data --download" in out.out and out.err == ""
    assert Handler.requests == [] and fresh == [] and not imdb.DEFAULT_CACHE.exists()


def test_given_data_is_used_as_is(fresh, served, tmp_path, monkeypatch):
    archive = make_archive(tmp_path / "mine.tar.gz", tree_files(2))
    assert demo.main(["--data", str(archive)]) == 0
    monkeypatch.setenv("IMDB_PATH", str(archive))
    assert demo.main([]) == 0
    assert fresh == [archive, archive] and Handler.requests == []
