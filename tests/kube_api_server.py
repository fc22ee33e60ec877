"""A stand-in for the Kubernetes API server, on 127.0.0.1, for what cannot run here.

No cluster runs on the development machines or in CI, so this speaks just the
slice of the API that lmforge calls through the official `kubernetes` client:

- the `scale` subresource (autoscaling/v1 Scale) of apps/v1 Deployments and
  StatefulSets: GET and PATCH (merge or strategic-merge patch of spec.replicas);
- KEDA `ScaledObject`s (keda.sh/v1alpha1): GET and merge-PATCH of annotations
  (a JSON null removes one, as on a real server);
- namespaced objects of any other kind the trainer's launchers use (batch/v1
  Jobs, v1 Services and Pods, kubeflow.org/v1 PyTorchJobs): POST to create
  (409 AlreadyExists on a second create; a uid and resourceVersion are filled
  in), GET one, list with `labelSelector` (k=v,...) and `fieldSelector`
  (metadata.name=...), `?watch=true` streams (ADDED for what exists, then
  MODIFIED/DELETED as they happen, each sent as a chunk as the API server does,
  ended after `timeoutSeconds`), DELETE
  (objects whose ownerReferences name the deleted uid go with it, as the
  garbage collector would), and `pods/NAME/log` (with `follow=true`: streamed
  until the pod has Succeeded or Failed, or is deleted; 400 while it is Pending).

Unknown objects answer 404 with a `Status` body, as the real server does. Every
request is recorded (method, path, content type, body) for the tests to read.
It is not Kubernetes: no controllers or kubelets run (a test plays them through
`put`, `update` and `append_log`), nothing is validated beyond the paths.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_SCALE = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/(deployments|statefulsets)/([^/]+)/scale$")
_SCALED_OBJECT = re.compile(r"^/apis/keda\.sh/v1alpha1/namespaces/([^/]+)/scaledobjects/([^/]+)$")
_NAMESPACED = re.compile(
    r"^/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?(?:/(log))?$")

Key = tuple[str, str, str]
"""(kind plural, namespace, name)."""


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str
    body: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class StandInCluster:
    """The objects the stand-in holds, keyed by (namespace, name)."""

    replicas: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(kind plural, namespace, name) -> spec.replicas of a Deployment or StatefulSet."""
    scaled_objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    """(jobs|services|pods|pytorchjobs, namespace, name) -> the object as stored."""
    logs: dict[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, pod name) -> the pod's log so far."""
    events: list[tuple[int, str, str, str, dict[str, Any]]] = field(default_factory=list)
    """(sequence, ADDED|MODIFIED|DELETED, plural, namespace, object) for watches."""
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    def requests_to(self, method: str, plural: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method
                and (m := _NAMESPACED.match(r.path)) and m.group(2) == plural]

    # -- what a test does in the controllers' and kubelets' place (lock not held) --

    def put(self, plural: str, namespace: str, obj: dict[str, Any]) -> None:
        with self.changed:
            self._store(plural, namespace, obj)

    def update(self, plural: str, namespace: str, name: str,
               change: Callable[[dict[str, Any]], None]) -> None:
        with self.changed:
            obj = self.objects[(plural, namespace, name)]
            change(obj)
            self._store(plural, namespace, obj)

    def append_log(self, namespace: str, pod: str, text: str) -> None:
        with self.changed:
            self.logs[(namespace, pod)] = self.logs.get((namespace, pod), "") + text
            self.changed.notify_all()

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def wait_for(self, plural: str, namespace: str, name: str | None = None,
                 timeout: float = 10.0) -> dict[str, Any]:
        """The first object of `plural` (named `name`, if given) to exist."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for (p, ns, n), obj in self.objects.items():
                    if p == plural and ns == namespace and name in (None, n):
                        return copy.deepcopy(obj)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {plural} {name or ''} in {namespace} "
                                       f"after {timeout} s")
                self.changed.wait(left)

    # -- internals, called with the lock held -------------------------------------

    def _store(self, plural: str, namespace: str, obj: dict[str, Any]) -> None:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        key = (plural, namespace, meta["name"])
        kind = "MODIFIED" if key in self.objects else "ADDED"
        seq = len(self.events) + 1
        meta["resourceVersion"] = str(seq)
        self.objects[key] = obj
        self.events.append((seq, kind, plural, namespace, copy.deepcopy(obj)))
        self.changed.notify_all()

    def _delete(self, key: Key) -> None:
        obj = self.objects.pop(key)
        self.events.append((len(self.events) + 1, "DELETED", key[0], key[1], obj))
        uid = obj["metadata"].get("uid")
        for other, dependant in list(self.objects.items()):
            owners = dependant.get("metadata", {}).get("ownerReferences") or []
            if other in self.objects and any(o.get("uid") == uid for o in owners):
                self._delete(other)
        self.changed.notify_all()


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    meta = obj.get("metadata", {})
    labels = meta.get("labels") or {}
    for term in filter(None, query.get("labelSelector", "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        key, _, value = term.partition("=")
        if key != "metadata.name":
            raise ValueError(f"the stand-in selects only on metadata.name, not {key}")
        if meta.get("name") != value:
            return False
    return True


def _handler(cluster: StandInCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streams; every other reply has a length

        def _body(self) -> tuple[Any, dict[str, str]]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            with cluster.lock:
                cluster.requests.append(Recorded(self.command, self.path.split("?")[0],
                                                 self.headers.get("Content-Type", ""), body,
                                                 query))
            return body, query

        def _reply(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _scale(self, kind: str, ns: str, name: str) -> dict[str, Any]:
            replicas = cluster.replicas[(kind, ns, name)]
            return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"replicas": replicas},
                    "status": {"replicas": replicas, "selector": f"app={name}"}}

        def _route(self) -> None:
            body, query = self._body()
            path = self.path.split("?")[0]
            if (m := _NAMESPACED.match(path)) and self.command == "GET" and (
                    query.get("watch", "").lower() == "true" or m.group(4)):
                try:
                    if m.group(4):
                        return self._log(m.group(1), m.group(3), query)
                    return self._watch(m.group(2), m.group(1), query)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                    self.close_connection = True
                    return None
            with cluster.lock:
                if m := _SCALE.match(path):
                    ns, kind, name = m.group(1), m.group(2), m.group(3)
                    if (kind, ns, name) not in cluster.replicas:
                        return self._reply(404, _status(
                            404, "NotFound", f'{kind}.apps "{name}" not found'))
                    if self.command == "PATCH":
                        cluster.replicas[(kind, ns, name)] = int(body["spec"]["replicas"])
                    return self._reply(200, self._scale(kind, ns, name))
                if m := _SCALED_OBJECT.match(path):
                    key = (m.group(1), m.group(2))
                    if key not in cluster.scaled_objects:
                        return self._reply(404, _status(
                            404, "NotFound", f'scaledobjects.keda.sh "{key[1]}" not found'))
                    if self.command == "PATCH":
                        _merge(cluster.scaled_objects[key], body)
                    return self._reply(200, cluster.scaled_objects[key])
                if m := _NAMESPACED.match(path):
                    return self._namespaced(m.group(2), m.group(1), m.group(3), body, query)
            return self._reply(404, _status(404, "NotFound", f"no route for {path}"))

        def _namespaced(self, plural: str, ns: str, name: str | None, body: Any,
                        query: dict[str, str]) -> None:
            if self.command == "POST" and name is None:
                name = body["metadata"]["name"]
                if (plural, ns, name) in cluster.objects:
                    return self._reply(409, _status(
                        409, "AlreadyExists", f'{plural} "{name}" already exists'))
                cluster._store(plural, ns, body)
                return self._reply(201, body)
            if self.command == "GET" and name is None:
                items = [o for (p, n, _), o in cluster.objects.items()
                         if p == plural and n == ns and _selected(o, query)]
                return self._reply(200, {"kind": "List", "apiVersion": "v1", "items": items,
                                         "metadata": {"resourceVersion": str(
                                             len(cluster.events))}})
            key = (plural, ns, name or "")
            if key not in cluster.objects:
                return self._reply(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
            if self.command == "GET":
                return self._reply(200, cluster.objects[key])
            if self.command == "DELETE":
                cluster._delete(key)
                return self._reply(200, {"kind": "Status", "apiVersion": "v1",
                                         "status": "Success", "details": {"name": name}})
            return self._reply(405, _status(405, "MethodNotAllowed", self.command))

        def _stream_start(self, content_type: str) -> None:
            # Chunked, as the API server streams: the client sees each event as it is
            # sent (a body that ends at the connection's close is read whole, at the end).
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            """One chunk of a stream; an empty one ends it."""
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, plural: str, ns: str, query: dict[str, str]) -> None:
            deadline = time.monotonic() + float(query.get("timeoutSeconds", "30"))
            with cluster.lock:
                pending = [("ADDED", o) for (p, n, _), o in cluster.objects.items()
                           if p == plural and n == ns and _selected(o, query)]
                seen = len(cluster.events)
                pending = [(kind, copy.deepcopy(o)) for kind, o in pending]
            self._stream_start("application/json")
            while True:
                for kind, obj in pending:
                    self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                with cluster.changed:
                    while len(cluster.events) == seen and time.monotonic() < deadline:
                        cluster.changed.wait(deadline - time.monotonic())
                    fresh, seen = cluster.events[seen:], len(cluster.events)
                pending = [(kind, obj) for _, kind, p, n, obj in fresh
                           if p == plural and n == ns and _selected(obj, query)]
                if not pending and time.monotonic() >= deadline:
                    return self._chunk(b"")

        def _log(self, ns: str, pod: str, query: dict[str, str]) -> None:
            with cluster.lock:
                obj = cluster.objects.get(("pods", ns, pod))
                if obj is None:
                    return self._reply(404, _status(404, "NotFound", f'pods "{pod}" not found'))
                if obj.get("status", {}).get("phase", "Pending") == "Pending":
                    return self._reply(400, _status(
                        400, "BadRequest", f'container in pod "{pod}" is waiting to start'))
            follow = query.get("follow", "").lower() == "true"
            self._stream_start("text/plain")
            sent = 0
            deadline = time.monotonic() + 30  # a stand-in must never hang a test forever
            while True:
                with cluster.changed:
                    text = cluster.logs.get((ns, pod), "")
                    obj = cluster.objects.get(("pods", ns, pod))
                    over = obj is None or obj.get("status", {}).get("phase") in (
                        "Succeeded", "Failed")
                    if len(text) == sent and not over and follow:
                        cluster.changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                        text = cluster.logs.get((ns, pod), "")
                if len(text) > sent:
                    self._chunk(text[sent:].encode())
                    sent = len(text)
                if not follow or over or time.monotonic() >= deadline:
                    return self._chunk(b"")

        do_GET = do_PATCH = do_POST = do_DELETE = _route

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def start_kube_api(cluster: StandInCluster) -> tuple[ThreadingHTTPServer, str]:
    """Serve `cluster` on a free loopback port; returns the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(cluster))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
