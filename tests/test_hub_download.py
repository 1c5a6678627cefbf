"""The real hub download path, against a local server that speaks the hub's file protocol.

``resolve(hub id)`` and ``TorchStage`` fetch files through ``huggingface_hub.hf_hub_download``.
There is no internet in tests, so a tiny model is served from 127.0.0.1 by two small
stdlib HTTP servers that answer the way huggingface.co does, and the client (always a
subprocess: huggingface_hub reads its environment at import) is pointed at them with
``HF_ENDPOINT``:

* the *hub*, ``{endpoint}/{repo_id}/resolve/{revision}/{filename}`` for HEAD and GET.
  A regular (git) file answers 200 with ``X-Repo-Commit``, ``ETag`` (its git blob sha1)
  and ``Content-Length``. An LFS file (the safetensors shards) answers 302 to the CDN
  with ``X-Repo-Commit``, ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and
  ``Location``. Misses answer 404 with ``X-Error-Code``: ``RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound`` (the last with ``X-Repo-Commit``, as the hub
  does, so the client caches the miss under ``.no_exist``). No xet headers are sent, so
  the client never tries the xet protocol.
* the *CDN*, on another port (another origin, so the client does not follow the
  redirect during its HEAD and downloads straight from ``Location``, as with real LFS
  files): ``/blobs/{sha256}``.

Every request is logged; any path outside these routes is logged as unexpected and
fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.weights import INDEX_FILE, SMALL_FILES, span_tensor_names

LAYERS = 6
REPO = "tinyorg/tiny-llama"
MISSING_REPO = "tinyorg/nope"
COMMIT = "5eed5eed0123456789abcdef0123456789abcdef"
REVISIONS = ("main", COMMIT)
SUBPROCESS_TIMEOUT = 300


# --------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Hit:
    """One request as the servers saw it."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    status: int
    repo: str | None = None
    revision: str | None = None
    filename: str | None = None


@dataclass
class FakeHub:
    """A model repo on the hub (``files``) and the log of what clients asked for."""

    files: dict[str, bytes]
    hits: list[Hit] = field(default_factory=list)
    endpoint: str = ""
    cdn: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.git_sha1 = {n: hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest() for n, d in self.files.items()}
        self.sha256 = {n: hashlib.sha256(d).hexdigest() for n, d in self.files.items()}
        self.by_sha256 = {h: n for n, h in self.sha256.items()}

    @staticmethod
    def is_lfs(filename: str) -> bool:
        return filename.endswith(".safetensors")

    def record(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)

    def clear(self) -> None:
        with self.lock:
            self.hits.clear()

    # What a test asserts on.

    def heads(self, repo: str = REPO) -> list[str]:
        return [h.filename for h in self.hits if h.method == "HEAD" and h.repo == repo]

    def served(self) -> list[str]:
        """Files whose bytes were sent (from the hub for git files, the CDN for LFS ones)."""
        return [h.filename for h in self.hits if h.method == "GET" and h.status == 200]

    def unexpected(self) -> list[Hit]:
        return [h for h in self.hits if h.filename is None and h.repo is None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length
    server_version = "fake-hub"

    server: "_Server"

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_GET(self) -> None:
        self._answer("GET")

    def log_message(self, format, *args) -> None:  # noqa: A002 - keep pytest output clean
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes, method: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)

    def _error(self, method: str, status: int, code: str | None, message: str, extra: dict[str, str] | None = None):
        headers = {"Content-Type": "application/json", **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._send(status, headers, json.dumps({"error": message}).encode(), method)

    def _answer(self, method: str) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        if self.server.role == "cdn":
            self._cdn(hub, method, path)
        else:
            self._resolve(hub, method, path)

    def _resolve(self, hub: FakeHub, method: str, path: str) -> None:
        parts = path.lstrip("/").split("/", 4)
        if len(parts) != 5 or parts[2] != "resolve":
            hub.record(Hit("hub", method, path, 404))
            self._error(method, 404, None, "no such route on this fake hub")
            return
        repo, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], parts[4]

        def record(status: int) -> None:
            hub.record(Hit("hub", method, path, status, repo, revision, filename))

        if repo != REPO:
            record(404)
            self._error(method, 404, "RepoNotFound", "Repository not found")
        elif revision not in REVISIONS:
            record(404)
            self._error(method, 404, "RevisionNotFound", "Invalid rev id: " + revision)
        elif filename not in hub.files:
            record(404)
            self._error(
                method, 404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", {"X-Repo-Commit": COMMIT}
            )
        elif hub.is_lfs(filename):
            # huggingface.co answers LFS files with a redirect to a signed CDN URL; the
            # metadata the client needs rides on the redirect itself.
            record(302)
            body = f"Found. Redirecting to {hub.cdn}/blobs/{hub.sha256[filename]}".encode()
            self._send(
                302,
                {
                    "Location": f"{hub.cdn}/blobs/{hub.sha256[filename]}",
                    "X-Repo-Commit": COMMIT,
                    "X-Linked-Etag": f'"{hub.sha256[filename]}"',
                    "X-Linked-Size": str(len(hub.files[filename])),
                    "ETag": f'"{hub.git_sha1[filename]}"',
                    "Content-Type": "text/plain; charset=utf-8",
                },
                body,
                method,
            )
        else:
            record(200)
            self._send(
                200,
                {
                    "X-Repo-Commit": COMMIT,
                    "ETag": f'"{hub.git_sha1[filename]}"',
                    "Content-Type": "application/octet-stream",
                    "Accept-Ranges": "bytes",
                },
                hub.files[filename],
                method,
            )

    def _cdn(self, hub: FakeHub, method: str, path: str) -> None:
        parts = path.lstrip("/").split("/")
        filename = hub.by_sha256.get(parts[1]) if len(parts) == 2 and parts[0] == "blobs" else None
        if filename is None:
            hub.record(Hit("cdn", method, path, 404))
            self._send(404, {"Content-Type": "text/plain"}, b"NoSuchKey", method)
            return
        hub.record(Hit("cdn", method, path, 200, REPO, None, filename))
        self._send(
            200,
            {"ETag": f'"{hub.sha256[filename]}"', "Content-Type": "binary/octet-stream", "Accept-Ranges": "bytes"},
            hub.files[filename],
            method,
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, role: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def model() -> Path:
    return cached_tiny_model("llama", layers=LAYERS, hidden=64)


@pytest.fixture(scope="module")
def hub_server(model):
    hub = FakeHub({f.name: f.read_bytes() for f in sorted(model.iterdir()) if f.is_file()})
    servers = [_Server(hub, "hub"), _Server(hub, "cdn")]
    hub.endpoint, hub.cdn = servers[0].url, servers[1].url
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield hub
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(timeout=5)


@pytest.fixture
def hub(hub_server):
    hub_server.clear()
    yield hub_server
    assert not hub_server.unexpected(), f"requests outside the hub protocol: {hub_server.unexpected()}"


# --------------------------------------------------------------------------- the client


def client_env(hub: FakeHub, cache: Path, *, offline: bool = False) -> dict[str, str]:
    """The environment of a client process: this hub, this cache, nothing else reachable."""
    env = dict(os.environ)
    # The suite runs offline; tokens and proxies from the machine must not leak in either.
    for key in list(env):
        if key.upper() in {
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        }:
            del env[key]
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf-home"),  # no stored token, no xet cache outside tmp
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",  # huggingface_hub >= 0.32 (hf_xet is installed here)
        NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


STAGE_SCRIPT = """
import json, sys
from shardmesh.backends.weights import resolve
from shardmesh.backends.torch.stage import TorchStage
files = resolve(sys.argv[1])
stage = TorchStage(files, int(sys.argv[2]), int(sys.argv[3]), dtype="float32", device="cpu")
print("RESULT " + json.dumps({
    "hub": list(files.hub),
    "root": str(files.root),
    "span": [stage.info.start, stage.info.end],
    "shards_read": sorted({files.weight_map[n] for n in files.reads}),
    "reads": files.reads,
}))
"""


def build_stage(hub: FakeHub, cache: Path, start: int, end: int, *, offline: bool = False) -> dict:
    """``TorchStage(resolve(REPO), start, end)`` in a fresh process; what it loaded."""
    result = subprocess.run(
        [sys.executable, "-c", STAGE_SCRIPT, REPO, str(start), str(end)],
        env=client_env(hub, cache, offline=offline),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, f"stage {start}..{end} failed:\n{result.stderr[-4000:]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def expected_shards(model: Path, start: int, end: int) -> set[str]:
    weight_map = json.loads((model / INDEX_FILE).read_text())["weight_map"]
    return {weight_map[n] for n in span_tensor_names(weight_map, start, end, LAYERS, tied_embeddings=False)}


def all_shards(model: Path) -> set[str]:
    return set(json.loads((model / INDEX_FILE).read_text())["weight_map"].values())


def small_files_present(model: Path) -> set[str]:
    return {name for name in SMALL_FILES if (model / name).exists()}


def assert_fetched_exactly(hub: FakeHub, model: Path, shards: set[str]) -> None:
    served = hub.served()
    assert len(served) == len(set(served)), f"a file was downloaded twice: {served}"
    assert set(served) == small_files_present(model) | {INDEX_FILE} | shards
    assert {f for f in hub.heads() if f.endswith(".safetensors")} == shards


# --------------------------------------------------------------------------- tests


def test_first_span_downloads_only_its_shards_then_runs_offline(hub, model, tmp_path):
    shards = expected_shards(model, 0, 2)
    weight_map = json.loads((model / INDEX_FILE).read_text())["weight_map"]
    holding = {weight_map["model.embed_tokens.weight"]} | {
        f for n, f in weight_map.items() if n.startswith(("model.layers.0.", "model.layers.1."))
    }
    assert shards == holding
    assert shards != all_shards(model), "the span must leave some shards out for this test to mean anything"
    cache = tmp_path / "hub-cache"

    got = build_stage(hub, cache, 0, 2)

    assert got["hub"] == [REPO, COMMIT]
    assert Path(got["root"]) == cache / "models--tinyorg--tiny-llama" / "snapshots" / COMMIT
    assert got["span"] == [0, 2]
    assert set(got["shards_read"]) == shards
    served = hub.served()
    assert {"config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json"} <= set(served)
    assert_fetched_exactly(hub, model, shards)
    assert not set(served) & (all_shards(model) - shards)
    # Every small file the node knows of was asked for; the missing ones were real hub
    # misses (EntryNotFound), which the client remembers under .no_exist/<commit>/.
    assert set(hub.heads()) == set(SMALL_FILES) | {INDEX_FILE} | shards
    no_exist = cache / "models--tinyorg--tiny-llama" / ".no_exist" / COMMIT
    assert {p.name for p in no_exist.iterdir()} == set(SMALL_FILES) - small_files_present(model)
    # The branch is resolved once, by config.json; everything after it is pinned to the commit.
    revisions = {(h.filename, h.revision) for h in hub.hits if h.server == "hub"}
    assert revisions == {("config.json", "main")} | {(f, COMMIT) for f, _ in revisions if f != "config.json"}
    assert (cache / "models--tinyorg--tiny-llama" / "refs" / "main").read_text() == COMMIT
    # The shards arrived intact through the cache.
    for name in shards:
        assert (Path(got["root"]) / name).read_bytes() == (model / name).read_bytes()

    # A second start, offline: everything comes from the cache, nothing from the hub.
    hub.clear()
    again = build_stage(hub, cache, 0, 2, offline=True)
    assert hub.hits == []
    assert again == got


def test_last_span_downloads_only_its_shards(hub, model, tmp_path):
    shards = expected_shards(model, 4, LAYERS)
    weight_map = json.loads((model / INDEX_FILE).read_text())["weight_map"]
    holding = {weight_map["lm_head.weight"], weight_map["model.norm.weight"]} | {
        f for n, f in weight_map.items() if n.startswith(("model.layers.4.", "model.layers.5."))
    }
    assert shards == holding
    assert weight_map["model.embed_tokens.weight"] not in shards, "the test needs a span that skips the first shard"

    got = build_stage(hub, tmp_path / "hub-cache", 4, LAYERS)

    assert got["hub"] == [REPO, COMMIT]
    assert got["span"] == [4, LAYERS]
    assert set(got["shards_read"]) == shards
    assert_fetched_exactly(hub, model, shards)
    assert not set(hub.served()) & (all_shards(model) - shards)


RESOLVE_MISSING = """
import sys
from shardmesh.backends.weights import ModelSourceError, resolve
try:
    resolve(sys.argv[1])
except ModelSourceError as exc:
    print("REFUSED", exc)
"""


def test_unknown_repo_is_a_clear_error(hub, tmp_path):
    cache = tmp_path / "hub-cache"
    env = client_env(hub, cache)
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE_MISSING, MISSING_REPO],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"REFUSED {MISSING_REPO!r} is not a model on the Hugging Face hub" in result.stdout, (
        result.stdout + result.stderr[-4000:]
    )
    # It asked the hub (it is not an offline miss), once, and went no further.
    assert [(h.method, h.filename, h.status) for h in hub.hits if h.repo == MISSING_REPO] == [
        ("HEAD", "config.json", 404)
    ]

    hub.clear()
    result = subprocess.run(
        [sys.executable, "-m", "shardmesh", "run", "--model", MISSING_REPO, "--api", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shardmesh: ") and "is not a model on the Hugging Face hub" in lines[0]
    assert MISSING_REPO in lines[0]
    assert ("HEAD", "config.json") in [(h.method, h.filename) for h in hub.hits if h.repo == MISSING_REPO]
