"""A small, in-memory Hugging Face Hub on 127.0.0.1 for tests: the real `huggingface_hub` client talks to it.

Start it with `FakeHub().start()`, point the client at `hub.endpoint` (`HF_ENDPOINT`, and `HF_HUB_DISABLE_XET=1`
so uploads go through preupload + commit with base64 content, never LFS or xet storage). It implements what
`HfApi.create_repo`, `HfApi.upload_folder` / `create_commit`, `model_info`, `list_repo_tree`, `get_paths_info`,
`whoami` and `hf_hub_download` (hence `from_pretrained` and `ModelCard.load`) call:

    POST /api/repos/create                        POST /api/validate-yaml
    POST /api/models/{repo}/preupload/{rev}       POST /api/models/{repo}/commit/{rev}   (NDJSON)
    GET  /api/models/{repo}[/revision/{rev}]      GET  /api/models/{repo}/tree/{rev}[/{path}]
    POST /api/models/{repo}/paths-info/{rev}      GET  /api/whoami-v2
    HEAD/GET /{repo}/resolve/{rev}/{path}         (ETag, X-Repo-Commit, Content-Length, Range)

Errors carry the Hub's `X-Error-Code` headers (RepoNotFound, RevisionNotFound, EntryNotFound) so the client
raises its usual exceptions. Every request is recorded in `hub.requests`; anything it does not know is
answered 404 and recorded in `hub.unknown`, so a test can assert the client used nothing unexpected.
`hub.fail_commits = n` makes the next n commit calls answer 500 (nothing is committed). Repositories are
public unless created private; a private one answers 401 RepoNotFound to requests without a token.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"  # the namespace of repos created without one, and whoami's name
EMPTY_SHA = "0" * 40


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id of `data` (what the Hub reports as `oid` / ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclasses.dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit]

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.sha == revision or (len(revision) >= 7 and
                                                                       c.sha.startswith(revision))), None)


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: str
    authorization: str | None  # the Authorization header as sent (tests check the token was used)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """In-memory Hub state plus the HTTP server thread that serves it."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unknown: list[str] = []
        self.fail_commits = 0
        self.lock = threading.RLock()
        self.connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close kept-alive connections (a pooled client connection must not reach a
        stopped hub's handler thread, which would keep answering from the old state)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self.lock:
                for conn in self.connections:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._thread.join(timeout=5)
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files at the head of `repo_id`."""
        return dict(self.repos[repo_id].head.files)

    # ----------------------------------------------------------------------------------------- repos
    def _repo(self, repo_id: str, auth: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not auth):
            raise HubError(401 if repo is None or repo.private else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, body: dict, auth: str | None) -> dict:
        if not auth:
            raise HubError(401, "Invalid username or password.")
        if body.get("type", "model") != "model":
            raise HubError(400, "The fake hub only hosts model repos")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, json.dumps({"error": "You already created this model repo", "url": url}))
        private = body.get("visibility") == "private" or bool(body.get("private"))
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self.repos[repo_id] = Repo(repo_id, private, [Commit(self._sha("init", repo_id), "initial commit", initial)])
        return {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    @staticmethod
    def _sha(*parts: Any) -> str:
        return hashlib.sha1(json.dumps([*map(str, parts), time.time_ns()]).encode()).hexdigest()

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        head = self._commit(repo, revision)
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_sha1(head.files[f["path"]]) if f["path"] in head.files else None}
                          for f in body["files"]]}

    def commit(self, repo: Repo, revision: str, raw: bytes) -> dict:
        if revision != "main":
            raise HubError(400, "The fake hub commits to main only")
        if self.fail_commits > 0:
            self.fail_commits -= 1
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        files = dict(repo.head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile / copies: never announced by this hub's preupload answers
                raise HubError(400, f"The fake hub does not support {key!r} commit lines")
        header = lines[0]["value"]
        sha = self._sha(repo.repo_id, header.get("summary"), sorted(files))
        repo.commits.append(Commit(sha, header.get("summary", ""), files))
        return {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "success": True,
                "pullRequestUrl": None}

    def model_info(self, repo: Repo, commit: Commit) -> dict:
        return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "sha": commit.sha, "private": repo.private, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(commit.files)]}

    @staticmethod
    def tree(commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(FakeHub.path_info(commit, name))
        if path.strip("/") and not entries and not folders:
            raise HubError(404, f"{path} does not exist on main", "EntryNotFound")
        return [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                for f in sorted(folders)] + entries

    @staticmethod
    def path_info(commit: Commit, name: str) -> dict:
        data = commit.files[name]
        return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake.lock:
            self.fake.connections.add(self.connection)

    def finish(self) -> None:
        with self.fake.lock:
            self.fake.connections.discard(self.connection)
        super().finish()

    # ------------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        with fake.lock:
            fake.requests.append(Request(self.command, url.path, url.query, auth))
            try:
                result = self._route(url.path, parse_qs(url.query), body, auth)
            except HubError as err:
                try:  # a JSON message passes through (409 with the repo url)
                    payload = json.loads(err.message)
                except ValueError:
                    payload = {"error": err.message}
                headers = {"X-Error-Message": payload["error"]}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, payload, headers)
                return
            except (KeyError, ValueError, TypeError) as err:
                self._send(400, {"error": f"Bad request: {err!r}"})
                return
        if result is None:
            with fake.lock:
                fake.unknown.append(f"{self.command} {self.path}")
            self._send(404, {"error": "Not found (fake hub)"})
        elif isinstance(result, tuple):
            self._send(*result)
        else:
            self._send(200, result)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # --------------------------------------------------------------------------------------- routes
    def _route(self, path: str, query: dict, body: bytes, auth: str | None) -> Any:
        fake, method = self.fake, self.command
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/api/whoami-v2" and method == "GET":
            if not auth:
                raise HubError(401, "Invalid credentials in Authorization header")
            return {"type": "user", "name": USER, "fullname": "Fake User", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}}
        if path == "/api/repos/create" and method == "POST":
            return fake.create_repo(json.loads(body), auth)
        if path == "/api/validate-yaml" and method == "POST":
            return {"errors": [], "warnings": []}
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = fake._repo(f"{parts[2]}/{parts[3]}", auth)
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else (None, [])
            if action is None and method == "GET":
                return fake.model_info(repo, repo.head)
            if action == "revision" and method == "GET" and rest:
                return fake.model_info(repo, fake._commit(repo, rest[0]))
            if action == "tree" and method == "GET" and rest:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return fake.tree(fake._commit(repo, rest[0]), "/".join(rest[1:]), recursive)
            if action == "paths-info" and method == "POST" and rest:
                commit = fake._commit(repo, rest[0])
                form = json.loads(body) if body.startswith(b"{") else parse_qs(body.decode())
                paths = form.get("paths", [])
                return [fake.path_info(commit, p) for p in paths if p in commit.files]
            if action in ("preupload", "commit") and method == "POST" and rest:
                if not auth:
                    raise HubError(401, "Invalid credentials in Authorization header")
                if action == "preupload":
                    return fake.preupload(repo, rest[0], json.loads(body))
                return fake.commit(repo, rest[0], body)
            return None
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = fake._repo(f"{parts[0]}/{parts[1]}", auth)
            commit = fake._commit(repo, parts[3])
            name = "/".join(parts[4:])
            if name not in commit.files:
                raise HubError(404, "Entry not found", "EntryNotFound")
            return self._file(commit, commit.files[name])
        return None

    def _file(self, commit: Commit, data: bytes) -> tuple:
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.sha,
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        spec = self.headers.get("Range")
        if spec and spec.startswith("bytes=") and self.command == "GET":
            start_s, _, end_s = spec[len("bytes="):].partition("-")
            start, end = int(start_s or 0), int(end_s) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, None, headers, data[start:end + 1]
        return 200, None, headers, data
