"""A small in-memory Hugging Face Hub for tests, on 127.0.0.1.

It answers only what ``HfApi.create_repo``, ``create_branch``, ``upload_folder``, ``repo_info`` /
``model_info``, ``list_repo_files`` and ``hf_hub_download`` call in huggingface_hub 2.x:

    POST /api/repos/create                          create a repo (409 + url if it exists)
    POST /api/validate-yaml                         README front matter check (yaml.safe_load)
    POST /api/models/{repo}/branch/{branch}         create a branch from main
    POST /api/models/{repo}/preupload/{rev}         every file "regular" (no LFS, no Xet) + its current git oid
    POST /api/models/{repo}/commit/{rev}            ndjson: header, then files as base64 content
    GET  /api/models/{repo}[/revision/{rev}]        repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing with git oids
    HEAD|GET /{repo}/resolve/{rev}/{path}           ETag, X-Repo-Commit, Content-Length (+ body for GET)

The preupload answer carries each file's git blob sha1 on the revision, which is what lets the client skip
unchanged files and empty commits (the same no-op detection the real Hub enables).

Bounded: the server runs in a daemon thread and stops on ``stop()`` / context exit, after ``max_requests``
requests, or after ``lifetime`` seconds, whichever comes first.

Use ``point_huggingface_hub_at(hub, monkeypatch)`` to aim an already imported huggingface_hub at it
(``HF_ENDPOINT`` is read at import time, so the module constants are patched too) and to disable Xet.
"""
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import yaml

_GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'


def git_oid(data: bytes) -> str:
    """git blob sha1 of ``data``; the Hub's oid and ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class FakeCommit:
    oid: str
    parent: Optional[str]
    summary: str
    files: Dict[str, bytes]


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    commits: Dict[str, FakeCommit] = field(default_factory=dict)
    branches: Dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, summary: str, files: Dict[str, bytes]) -> FakeCommit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f'{parent}\n{summary}\n{len(self.commits)}\n'.encode())
        for path in sorted(files):
            digest.update(f'{path}\0{git_oid(files[path])}\n'.encode())
        new = FakeCommit(digest.hexdigest(), parent, summary, dict(files))
        self.commits[new.oid] = new
        self.branches[branch] = new.oid
        return new

    def resolve(self, revision: str) -> Optional[FakeCommit]:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class FakeHub:
    """In-memory Hub on a free port of 127.0.0.1. ``token``: if set, writes need ``Bearer <token>``."""

    def __init__(self, token: Optional[str] = None, max_requests: int = 1000, lifetime: float = 120.0):
        self.token = token
        self.max_requests = max_requests
        self.repos: Dict[str, FakeRepo] = {}
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05})
        self._thread.daemon = True
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> 'FakeHub':
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving; safe to call more than once and from any thread but the serving one."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> 'FakeHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._thread.join(timeout=5)

    def history(self, repo_id: str, revision: str = 'main') -> List[FakeCommit]:
        """Commits reachable from ``revision``, newest first."""
        repo = self.repos[repo_id]
        commit, out = repo.resolve(revision), []
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def count_request(self, method: str, path: str) -> bool:
        """Log one request; False (and a shutdown) once ``max_requests`` is exceeded."""
        with self._lock:
            over = len(self.requests) >= self.max_requests
            if not over:
                self.requests.append((method, path))
        if over:
            threading.Thread(target=self.stop, daemon=True).start()
        return not over


def point_huggingface_hub_at(hub: FakeHub, monkeypatch) -> None:
    """Aim huggingface_hub (already imported or not, this process and subprocesses) at ``hub``; no Xet."""
    from huggingface_hub import constants

    monkeypatch.setenv('HF_ENDPOINT', hub.url)
    monkeypatch.setenv('HF_HUB_DISABLE_XET', '1')
    monkeypatch.setattr(constants, 'ENDPOINT', hub.url)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', hub.url + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True)


_REPO = r'(?P<repo>[^/]+/[^/]+)'
_ROUTES = [
    ('POST', re.compile(r'^/api/repos/create$'), '_create_repo'),
    ('POST', re.compile(r'^/api/validate-yaml$'), '_validate_yaml'),
    ('POST', re.compile(rf'^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$'), '_create_branch'),
    ('POST', re.compile(rf'^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$'), '_preupload'),
    ('POST', re.compile(rf'^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$'), '_commit'),
    ('GET', re.compile(rf'^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$'), '_tree'),
    ('GET', re.compile(rf'^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$'), '_model_info'),
    ('GET', re.compile(rf'^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$'), '_resolve'),
    ('HEAD', re.compile(rf'^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$'), '_resolve'),
]


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, commit: Optional[str] = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


def _make_handler(hub: FakeHub):
    class Handler(_FakeHubHandler):
        pass
    Handler.hub = hub
    return Handler


class _FakeHubHandler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format, *args):
        pass  # keep test output quiet

    def do_GET(self):
        self._dispatch('GET')

    def do_HEAD(self):
        self._dispatch('HEAD')

    def do_POST(self):
        self._dispatch('POST')

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        body = self._read_body()
        if not self.hub.count_request(method, path):
            return self._send(503, b'fake hub: request limit reached', {})
        for route_method, pattern, handler in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    with self.hub._lock:
                        return getattr(self, handler)(body=body, **args)
                except _HubError as e:
                    headers = {'X-Error-Message': str(e)}
                    if e.code:
                        headers['X-Error-Code'] = e.code
                    if e.commit:
                        headers['X-Repo-Commit'] = e.commit
                    return self._send_json(e.status, {'error': str(e)}, headers)
                except Exception as e:  # a bug in the fake: answer 500 rather than drop the connection
                    return self._send_json(500, {'error': f'fake hub: {type(e).__name__}: {e}'}, {})
        self._send_json(404, {'error': f'fake hub: no route for {method} {path}'}, {})

    # ---- endpoints

    def _create_repo(self, body: bytes) -> None:
        self._require_token()
        payload = json.loads(body)
        repo_id = f'{payload["organization"]}/{payload["name"]}' if payload.get('organization') else payload['name']
        url = f'{self.hub.url}/{repo_id}'
        if repo_id in self.hub.repos:
            return self._send_json(409, {'error': 'You already created this model repo', 'url': url}, {})
        repo = FakeRepo(repo_id, private=payload.get('visibility') == 'private')
        repo.commit('main', 'initial commit', {'.gitattributes': _GITATTRIBUTES})
        self.hub.repos[repo_id] = repo
        self._send_json(200, {'url': url, 'name': repo_id, 'id': repo_id}, {})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)['content']
        match = re.match(r'^---\n(.*?)\n---\n', content, flags=re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
            assert isinstance(meta, dict)
        except (yaml.YAMLError, AssertionError) as e:
            return self._send_json(400, {'errors': [{'message': f'invalid YAML front matter: {e}'}]}, {})
        self._send_json(200, {'errors': [], 'warnings': []}, {})

    def _create_branch(self, body: bytes, repo: str, rev: str) -> None:
        self._require_token()
        fake = self._repo(repo)
        if rev in fake.branches:
            raise _HubError(409, f'branch {rev} already exists')
        start = json.loads(body or b'{}').get('startingPoint') or 'main'
        fake.branches[rev] = self._commit_of(fake, start).oid
        self._send_json(200, {}, {})

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        self._require_token()
        files = self._commit_of(self._repo(repo), rev).files
        answer = [
            {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
             'oid': git_oid(files[f['path']]) if f['path'] in files else None}
            for f in json.loads(body)['files']]
        self._send_json(200, {'files': answer, 'commitOid': self._commit_of(self._repo(repo), rev).oid}, {})

    def _commit(self, body: bytes, repo: str, rev: str) -> None:
        self._require_token()
        fake = self._repo(repo)
        files = dict(self._commit_of(fake, rev).files)
        summary = ''
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item['key'], item['value']
            if key == 'header':
                summary = value['summary']
            elif key == 'file' and value.get('encoding') == 'base64':
                files[value['path']] = base64.b64decode(value['content'])
            elif key == 'deletedFile':
                files.pop(value['path'], None)
            else:
                raise _HubError(400, f'fake hub: unsupported commit item {key!r} (LFS / Xet are not emulated)')
        new = fake.commit(rev, summary, files)
        self._send_json(200, {
            'success': True, 'commitOid': new.oid, 'commitUrl': f'{self.hub.url}/{repo}/commit/{new.oid}',
            'hookOutput': ''}, {})

    def _model_info(self, body: bytes, repo: str, rev: str = 'main') -> None:
        fake = self._repo(repo)
        commit = self._commit_of(fake, rev)
        self._send_json(200, {
            'id': repo, 'modelId': repo, 'sha': commit.oid, 'private': fake.private,
            'siblings': [{'rfilename': p} for p in sorted(commit.files)]}, {})

    def _tree(self, body: bytes, repo: str, rev: str, path: str = '') -> None:
        files = self._commit_of(self._repo(repo), rev).files
        prefix = path.strip('/') + '/' if path.strip('/') else ''
        self._send_json(200, [
            {'type': 'file', 'path': p, 'size': len(data), 'oid': git_oid(data)}
            for p, data in sorted(files.items()) if p.startswith(prefix)], {})

    def _resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        commit = self._commit_of(self._repo(repo), rev)
        if path not in commit.files:
            raise _HubError(404, f'{path} not found', code='EntryNotFound', commit=commit.oid)
        data = commit.files[path]
        headers = {'ETag': f'"{git_oid(data)}"', 'X-Repo-Commit': commit.oid}
        self._send(200, data, headers, content_type='application/octet-stream')

    # ---- helpers

    def _require_token(self) -> None:
        if self.hub.token and self.headers.get('Authorization') != f'Bearer {self.hub.token}':
            raise _HubError(401, 'Invalid credentials in Authorization header')

    def _repo(self, repo_id: str) -> FakeRepo:
        fake = self.hub.repos.get(repo_id)
        authorized = self.headers.get('Authorization') == f'Bearer {self.hub.token}' or not self.hub.token
        if fake is None or (fake.private and not authorized):
            raise _HubError(404, f'Repository {repo_id} not found', code='RepoNotFound')
        return fake

    def _commit_of(self, repo: FakeRepo, revision: str) -> FakeCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f'Revision {revision} not found', code='RevisionNotFound')
        return commit

    def _read_body(self) -> bytes:
        if 'chunked' in self.headers.get('Transfer-Encoding', ''):
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b'0', 16)
                if size == 0:
                    self.rfile.readline()
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _send_json(self, status: int, payload, headers: Dict[str, str]) -> None:
        self._send(status, json.dumps(payload).encode(), headers, content_type='application/json')

    def _send(self, status: int, data: bytes, headers: Dict[str, str], content_type: str = 'text/plain') -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)
