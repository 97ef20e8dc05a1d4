"""The client: one HTTP/1.1 request per call over the agent's Unix socket, or over HTTPS with a
bearer token (the agent's ``[api] listen``), JSON in and out."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

DEFAULT_SOCKET = "/run/agentd/agentd.sock"
FINISHED_STATES = frozenset({"Succeeded", "Failed", "Cancelled"})

JSON = Dict[str, Any]
Manifest = Union[str, bytes, os.PathLike, Mapping[str, Any]]


class Unreachable(Exception):
    """Nothing answers: the agent is not running, the path or URL is wrong, or TLS failed."""


class ApiError(Exception):
    """The agent refused the request. ``code`` is stable (``not_found``, ``forbidden``,
    ``invalid_spec``, ...), ``message`` is for people, ``field`` names the offending field where
    there is one, ``rule`` the authorization rule for ``forbidden``, ``status`` the HTTP status."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None,
                 rule: Optional[str] = None, details: Optional[List[JSON]] = None) -> None:
        super().__init__(f"{field}: {message}" if field and not message.startswith(field) else message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.rule = rule
        self.details = details or []


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("agentd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError as e:
            sock.close()
            raise Unreachable(f"cannot reach the agent at {self._path}: {e}") from e
        self.sock = sock


class Client:
    """A client of one agent.

    Over its Unix socket (``socket``, else ``AGENTD_SOCKET``, else ``/run/agentd/agentd.sock``),
    the caller's identity is its uid: jobs it submits are its own.

    Over HTTPS (``server="https://host:port"``, else ``AGENTD_SERVER``), the caller is the user
    of the bearer ``token`` (else the contents of ``token_file`` or ``AGENTD_TOKEN_FILE``); the
    server's certificate is checked against ``ca_file`` (else ``AGENTD_CA_FILE``, else the
    system's roots). An agent that takes client certificates (``api.client_ca``) also knows the
    caller by ``cert_file`` and ``key_file`` (else ``AGENTD_CERT_FILE``, ``AGENTD_KEY_FILE``):
    the certificate's common name is the user. TLS 1.2 is the oldest version spoken."""

    def __init__(self, socket: Optional[str] = None, timeout: Optional[float] = 30.0, *,
                 server: Optional[str] = None, token: Optional[str] = None,
                 token_file: Optional[str] = None, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None) -> None:
        self.timeout = timeout
        self.server = server or (None if socket else os.environ.get("AGENTD_SERVER")) or None
        self.socket = socket or os.environ.get("AGENTD_SOCKET") or DEFAULT_SOCKET
        self._https: Optional[urllib.parse.SplitResult] = None
        self._token: Optional[str] = None
        self._tls: Optional[ssl.SSLContext] = None
        if self.server:
            url = urllib.parse.urlsplit(self.server)
            if url.scheme != "https" or not url.hostname or url.path not in ("", "/"):
                raise ValueError(f"server {self.server!r} is not https://HOST[:PORT]")
            self._https = url
            token_file = token_file or os.environ.get("AGENTD_TOKEN_FILE")
            if token is None and token_file:
                token = Path(token_file).read_text().strip()
            self._token = token
            self._tls = ssl.create_default_context(cafile=ca_file or os.environ.get("AGENTD_CA_FILE"))
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
            cert_file = cert_file or os.environ.get("AGENTD_CERT_FILE")
            key_file = key_file or os.environ.get("AGENTD_KEY_FILE")
            if cert_file:
                self._tls.load_cert_chain(cert_file, key_file)

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._https is not None:
            return http.client.HTTPSConnection(self._https.hostname or "", self._https.port or 443,
                                               timeout=timeout, context=self._tls)
        return _UnixConnection(self.socket, timeout)

    def _where(self) -> str:
        return self.server or self.socket

    # Requests ---------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: Optional[bytes] = None,
              content_type: Optional[str] = None,
              timeout: Optional[float] = None) -> http.client.HTTPResponse:
        conn = self._connection(timeout if timeout is not None else self.timeout)
        headers = {} if self._https else {"Host": "agentd"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
        except Unreachable:
            raise
        except OSError as e:
            conn.close()
            raise Unreachable(f"the agent at {self._where()} did not answer: {e}") from e
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise _error(response.status, raw)
        return response

    def _json(self, method: str, path: str, body: Optional[bytes] = None,
              content_type: Optional[str] = None) -> JSON:
        response = self._send(method, path, body, content_type)
        try:
            return json.loads(response.read())
        finally:
            response.close()

    # The API ----------------------------------------------------------------------------------

    def status(self) -> JSON:
        return self._json("GET", "/v1/status")

    def nodes(self) -> List[JSON]:
        """The nodes this agent knows (in standalone mode, its own)."""
        return [self._json("GET", "/v1/node")]

    def queues(self) -> List[JSON]:
        return self._json("GET", "/v1/queues")["queues"]

    def queue_list(self) -> JSON:
        """The whole answer: `queues` (each with `removed` in cluster mode while a queue taken
        out of the cluster's ConfigMap still serves jobs), and in cluster mode `source` (where
        the queues in force come from, when not the agent's configuration) and `problem` (why
        the cluster's queue ConfigMap is not in force)."""
        return self._json("GET", "/v1/queues")

    def jobs(self, queue: Optional[str] = None, state: Optional[str] = None,
             user: Optional[str] = None) -> List[JSON]:
        query = {k: v for k, v in (("queue", queue), ("state", state), ("user", user)) if v}
        path = "/v1/jobs" + ("?" + urllib.parse.urlencode(query) if query else "")
        return self._json("GET", path)["jobs"]

    def job(self, name: str) -> JSON:
        return self._json("GET", f"/v1/jobs/{_quote(name)}")

    def submit(self, manifest: Manifest) -> JSON:
        """Submits a TrainingJob or TFJob: a path to a YAML or JSON file, the manifest's text,
        or a dict. Returns the new job's status."""
        body, kind = _manifest_body(manifest)
        return self._json("POST", "/v1/jobs", body, kind)

    def templates(self) -> List[JSON]:
        """Every job template on the agent, by name (without their manifests)."""
        return self._json("GET", "/v1/templates")["templates"]

    def template(self, name: str) -> JSON:
        """One template: its name, owner, times and the manifest as saved."""
        return self._json("GET", f"/v1/templates/{_quote(name)}")

    def save_template(self, name: str, manifest: Manifest) -> JSON:
        """Saves a manifest (as ``submit`` takes it) as template ``name``, or replaces your
        template of that name. It is checked as a submitted manifest is."""
        body, kind = _manifest_body(manifest)
        return self._json("PUT", f"/v1/templates/{_quote(name)}", body, kind)

    def delete_template(self, name: str) -> JSON:
        return self._json("DELETE", f"/v1/templates/{_quote(name)}")

    def submit_template(self, template: str, name: str,
                        values: Optional[Mapping[str, object]] = None) -> JSON:
        """Submits job ``name`` made from ``template`` with ``values`` put at their field paths
        (``{"spec.tfReplicaSpecs.Worker.replicas": 8}``), each keeping its Python type (a str
        stays text). Returns the new job's status."""
        sets = [f"{path}={json.dumps(value)}" for path, value in (values or {}).items()]
        body = json.dumps({"name": name, "set": sets}).encode()
        return self._json("POST", f"/v1/templates/{_quote(template)}/jobs", body,
                          "application/json")

    def cancel(self, name: str) -> JSON:
        """Cancels an active job; removes a finished one."""
        return self._json("DELETE", f"/v1/jobs/{_quote(name)}")

    def logs(self, name: str, replica: Optional[str] = None,
             follow: bool = False) -> Union[str, Iterator[str]]:
        """A replica's log as text; with ``follow``, an iterator of chunks as the replica writes
        them, ending when the job has ended."""
        query = {"replica": replica} if replica else {}
        if follow:
            query["follow"] = "true"
        path = f"/v1/jobs/{_quote(name)}/logs" + ("?" + urllib.parse.urlencode(query) if query else "")
        if not follow:
            response = self._send("GET", path)
            try:
                return response.read().decode("utf-8", "replace")
            finally:
                response.close()
        return self._follow(path)

    def _follow(self, path: str) -> Iterator[str]:
        response = self._send("GET", path, timeout=None)
        try:
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    return
                yield chunk.decode("utf-8", "replace")
        finally:
            response.close()

    def wait(self, name: str, timeout: Optional[float] = None, poll: float = 0.5) -> JSON:
        """Waits until the job has finished and returns its status; raises ``TimeoutError`` if
        ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(name)
            if job["state"] in FINISHED_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {name} is still {job['state']} after {timeout} s")
            time.sleep(poll)


def _manifest_body(manifest: Manifest) -> Tuple[bytes, str]:
    """A manifest's bytes and content type: from a path to a YAML or JSON file, the manifest's
    text, bytes or a dict."""
    if isinstance(manifest, Mapping):
        return json.dumps(manifest).encode(), "application/json"
    if isinstance(manifest, bytes):
        return manifest, "application/yaml"
    if isinstance(manifest, os.PathLike) or (
            isinstance(manifest, str) and "\n" not in manifest and Path(manifest).is_file()):
        path = Path(manifest)
        kind = "application/json" if path.suffix == ".json" else "application/yaml"
        return path.read_bytes(), kind
    if isinstance(manifest, str):
        return manifest.encode(), "application/yaml"
    raise TypeError(f"a manifest is a path, text, bytes or a dict, not {type(manifest).__name__}")


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _error(status: int, raw: bytes) -> ApiError:
    try:
        detail = json.loads(raw)["error"]
        return ApiError(status, detail["code"], detail["message"], detail.get("field"),
                        detail.get("rule"), detail.get("details"))
    except (ValueError, KeyError, TypeError):
        return ApiError(status, "internal", f"HTTP {status}: {raw.decode('utf-8', 'replace').strip()}")
