"""A small Hugging Face Hub on loopback that records every request: enough of the Hub's HTTP API for
huggingface_hub (0.36 and 1.x) to create a repository and commit files to it (``create_repo``,
``create_branch``, ``create_commit`` / ``upload_folder``: a README's front matter validated, preupload, then
the NDJSON commit with files inline), and the Hub's
answer for anything else: 404 "Repository not found" (``X-Error-Code: RepoNotFound``), as huggingface.co
answers for a repository that does not exist; and 401 for the token ``REFUSED_TOKEN``.

    with HubServer() as hub:                  # hub.endpoint: http://127.0.0.1:<port>
        ...                                   # HF_ENDPOINT=hub.endpoint (or huggingface_hub.constants.ENDPOINT)
        hub.requests                          # [Request(method, path, headers, body), ...]
        hub.repos["me/lang-sw"]               # Repo(private, files={path: bytes}, commits=[(revision, message)],
                                              #      branches)
"""
from __future__ import annotations

import base64
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: bytes = b""


@dataclass
class Repo:
    private: bool = False
    files: dict = field(default_factory=dict)
    commits: list = field(default_factory=list)
    branches: list = field(default_factory=list)


REFUSED_TOKEN = "hf_refused"  # a request with this token is answered 401, as the Hub answers a bad token


class HubServer:
    def __init__(self):
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # a connection silent this long is closed (a stuck client never holds a thread for good)

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in
                                                                         self.headers.items()}, body))
                if self.headers.get("Authorization") == f"Bearer {REFUSED_TOKEN}":
                    status, headers, payload = _json(401, {"error": "Invalid credentials in Authorization header"})
                else:
                    status, headers, payload = server.answer(self.command, self.path.split("?")[0], body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------------------
    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
        parts = path.strip("/").split("/")
        if path == "/":
            return _json(200, {})
        if method == "POST" and path == "/api/validate-yaml":  # huggingface_hub checks a README's front matter
            return _json(200, {"errors": [], "warnings": []})
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body or b"{}")
            repo_id = f"{request.get('organization') or 'me'}/{request['name']}"
            private = bool(request.get("private")) or request.get("visibility") == "private"  # (1.x: visibility)
            self.repos.setdefault(repo_id, Repo(private=private))
            return _json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
        if method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload",
                                                                                                     "commit",
                                                                                                     "branch"):
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.repos:
                return _not_found()
            if parts[4] == "branch":
                self.repos[repo_id].branches.append(parts[5])
                return _json(200, {})
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return _json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                              "oid": None} for f in files]})
            return self._commit(repo_id, parts[5], body)
        return _not_found()

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict, bytes]:
        repo = self.repos[repo_id]
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                repo.commits.append((revision, item["value"]["summary"]))
            elif item["key"] == "file":
                value = item["value"]
                content = value["content"]
                repo.files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" \
                    else content.encode()
            elif item["key"] == "deletedFile":
                repo.files.pop(item["value"]["path"], None)
        oid = f"{len(repo.commits):040x}"
        return _json(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                           "pullRequestUrl": None})


def _json(status: int, obj) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _not_found() -> tuple[int, dict, bytes]:
    status, headers, payload = _json(404, {"error": "Repository not found"})
    return status, dict(headers, **{"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}), payload


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Point huggingface_hub at ``endpoint`` in this process (what ``HF_ENDPOINT`` does at import time)."""
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):  # huggingface_hub 0.x reads its own copy
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
