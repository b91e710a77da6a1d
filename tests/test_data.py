"""rome_fast.data: the bundled files, downloads (a local HTTP server and file:// URLs stand in for
rome.baulab.info), checksums, and what the CLI says offline; no package code reads ../shared."""
import hashlib
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest

import rome_fast.data as D
from rome_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
CF = [{"case_id": i, "requested_rewrite": {"prompt": "{} is in", "subject": f"S{i}",
                                             "target_new": {"str": " A"}, "target_true": {"str": " B"}},
       "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"]} for i in range(3)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` ({name: bytes}); a name in `truncate` announces its full length but sends
    half and closes, as a dropped connection does."""
    files, truncate, hits = {}, set(), []

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        type(self).hits.append(name)
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if name in self.truncate else body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server; DATA_URLS point at it. Yields the handler class (files, hits)."""
    handler = type("Handler", (_Handler,), {"files": {}, "truncate": set(), "hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{httpd.server_address[1]}/data/dsets/"
    monkeypatch.setattr(D, "DATA_URLS", {n: root + n for n in D.DATA_URLS})
    yield handler
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.glob(".tmp-*")) if folder.is_dir() else []


def test_bundled_files(cache):
    known = D.bundled("known_1000.json")
    assert known == cache / "known_1000.json"
    facts = json.loads(known.read_text())
    assert len(facts) == 1209 and facts[0]["subject"] == "Vinson Massif"
    wiki = D.bundled("wikitext-2-raw-test.txt")
    assert D.sha256_file(wiki) == D.BUNDLED["wikitext-2-raw-test.txt"]
    from rome_fast.edit.corpus import read_text_file
    docs = read_text_file(wiki)
    assert len(docs) == 62 and docs[0].startswith("= Robert Boulter =")
    # a damaged copy in the cache is replaced, an intact one is kept as it is
    wiki.write_text("garbage")
    assert D.sha256_file(D.bundled("wikitext-2-raw-test.txt")) == D.BUNDLED["wikitext-2-raw-test.txt"]
    mtime = wiki.stat().st_mtime_ns
    assert D.bundled("wikitext-2-raw-test.txt").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="no bundled data file"):
        D.bundled("counterfact.json")


def test_bundled_files_are_package_data():
    """The .gz files and their licences are in the wheel (pyproject's package-data)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert '"data/*.gz"' in text and '"data/*.md"' in text
    for name in D.BUNDLED:
        assert (ROOT / "rome_fast" / "data" / f"{name}.gz").is_file()
        assert name in (ROOT / "rome_fast" / "data" / "SOURCES.md").read_text()


def test_fetch_downloads_once_and_pins_the_hash(cache, server, capsys):
    body = json.dumps(CF).encode()
    server.files["counterfact.json"] = body
    path = D.fetch("counterfact.json")  # with the progress bar
    assert path == cache / "counterfact.json" and path.read_bytes() == body
    digest = hashlib.sha256(body).hexdigest()
    assert f"counterfact.json: sha256 {digest} -> {path}" in capsys.readouterr().err
    assert (cache / "counterfact.json.sha256").read_text().split()[0] == digest
    assert D.fetch("counterfact.json", progress=False) == path
    assert server.hits == ["counterfact.json"]  # the second call did not download
    from rome_fast.eval import load_counterfact
    assert [r.case_id for r in load_counterfact(path)] == [0, 1, 2]
    # a cached file that changed since is refused, with what to do
    path.write_bytes(body.replace(b"S1", b"S9"))
    with pytest.raises(ValueError, match="delete .*counterfact.json.* to download it again"):
        D.fetch("counterfact.json", progress=False)


def test_fetch_checksum_mismatch_leaves_nothing(cache, server, monkeypatch):
    server.files["zsre_mend_eval.json"] = b'[{"subject": "X", "src": "X?", "answers": ["a"]}]'
    monkeypatch.setitem(D.SHA256, "zsre_mend_eval.json", "0" * 64)
    with pytest.raises(ValueError, match="expected 0000"):
        D.fetch("zsre_mend_eval.json", progress=False)
    assert not (cache / "zsre_mend_eval.json").exists() and _leftovers(cache) == []
    # the right hash passes, and no pin file is needed for it
    monkeypatch.setitem(D.SHA256, "zsre_mend_eval.json",
                        hashlib.sha256(server.files["zsre_mend_eval.json"]).hexdigest())
    assert D.fetch("zsre_mend_eval.json", progress=False).is_file()
    assert not (cache / "zsre_mend_eval.json.sha256").exists()


def test_truncated_download_leaves_nothing(cache, server):
    server.files["known_1000.json"] = json.dumps([{"known_id": i, "subject": "s", "prompt": "s is"}
                                                  for i in range(200)]).encode()
    server.truncate.add("known_1000.json")
    with pytest.raises(FileNotFoundError, match=r"stopped after \d+ of \d+ bytes; nothing was kept"):
        D.fetch("known_1000.json", progress=False)
    assert list(cache.iterdir()) == []


def test_truncated_file_url_and_wrong_content_leave_nothing(cache, tmp_path, monkeypatch):
    """No Content-Length to compare with: the content check catches the cut-off JSON."""
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "counterfact.json").write_text(json.dumps(CF)[:-20])
    (src / "multi_counterfact.json").write_text(json.dumps([{"case_id": 1}]))
    monkeypatch.setattr(D, "DATA_URLS", {n: (src / n).as_uri() for n in D.DATA_URLS})
    with pytest.raises(ValueError, match="not valid JSON"):
        D.fetch("counterfact.json", progress=False)
    with pytest.raises(ValueError, match="record 0 lacks one of the keys"):
        D.fetch("multi_counterfact.json", progress=False)
    assert list(cache.iterdir()) == []
    (src / "counterfact.json").write_text(json.dumps(CF))
    assert json.loads(D.fetch("counterfact.json", progress=False).read_text()) == CF


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_message_names_the_url_and_the_path(cache, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/data/dsets/zsre_mend_eval.json"
    monkeypatch.setitem(D.DATA_URLS, "zsre_mend_eval.json", url)
    with pytest.raises(FileNotFoundError) as err:
        D.fetch("zsre_mend_eval.json", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and url in msg and str(cache / "zsre_mend_eval.json") in msg
    assert list(cache.iterdir()) == []
    # put there by hand, as the message says: checked for content, then pinned
    (cache / "zsre_mend_eval.json").write_text('[{"subject": "X", "src": "X?", "answers": ["a"]}]')
    assert D.fetch("zsre_mend_eval.json", progress=False).is_file()
    assert (cache / "zsre_mend_eval.json.sha256").is_file()
    (cache / "counterfact.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        D.fetch("counterfact.json", progress=False)


def test_eval_cli_offline_is_one_line(cache, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/data/dsets/counterfact.json"
    monkeypatch.setitem(D.DATA_URLS, "counterfact.json", url)
    assert main(["eval", "--out", str(cache.parent / "out"), "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert url in err and str(cache / "counterfact.json") in err


def test_eval_data_names_an_official_file(cache, server):
    from rome_fast.eval.commands import data_file
    server.files["multi_counterfact.json"] = json.dumps(CF).encode()
    path = data_file("counterfact", "multi_counterfact.json")
    assert path == cache / "multi_counterfact.json" and path.is_file()
    assert data_file("counterfact", str(path)) == path
    assert D.DATA_URLS["multi_counterfact.json"].endswith("/data/dsets/multi_counterfact.json")


def test_official_addresses():
    import rome_fast.eval as E
    assert E.DATA_URLS is D.DATA_URLS
    for name in ("known_1000.json", "counterfact.json", "zsre_mend_eval.json"):
        assert D.DATA_URLS[name] == f"https://rome.baulab.info/data/dsets/{name}"
    assert D.DATA_URLS["multi_counterfact.json"] == "https://memit.baulab.info/data/dsets/multi_counterfact.json"


def test_package_reads_no_shared_folder():
    """The shared data folder is for this repository's tests only: no module names it as a path."""
    found = []
    for path in (ROOT / "rome_fast").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["'/]shared["'/]|SHARED_|parents\[\d\]\s*/""", line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []


def test_default_corpus(cache, tmp_path, monkeypatch):
    from rome_fast.edit.corpus import default_corpus
    monkeypatch.delenv("ROME_FAST_CORPUS", raising=False)
    assert default_corpus() == cache / "wikitext-2-raw-test.txt"
    mine = tmp_path / "mine.txt"
    mine.write_text("some text")
    monkeypatch.setenv("ROME_FAST_CORPUS", str(mine))
    assert default_corpus() == mine
    monkeypatch.setenv("ROME_FAST_CORPUS", str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="ROME_FAST_CORPUS=.*missing.txt is not a file"):
        default_corpus()
