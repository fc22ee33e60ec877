"""A stand-in for the Kubernetes API server, on 127.0.0.1, for what cannot run here.

No cluster runs on the development machines or in CI, so this speaks just the
slice of the API that lmforge calls through the official `kubernetes` client:

- the `scale` subresource (autoscaling/v1 Scale) of apps/v1 Deployments and
  StatefulSets: GET and PATCH (merge or strategic-merge patch of spec.replicas);
- KEDA `ScaledObject`s (keda.sh/v1alpha1): GET and merge-PATCH of annotations
  (a JSON null removes one, as on a real server);
- batch/v1 Jobs and Services (POST to create, GET one; 409 AlreadyExists on a
  second create) for the trainer's multi-node launcher.

Unknown objects answer 404 with a `Status` body, as the real server does. Every
request is recorded (method, path, content type, body) for the tests to read.
It is not Kubernetes: no controllers run, nothing is validated beyond the paths.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SCALE = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/(deployments|statefulsets)/([^/]+)/scale$")
_SCALED_OBJECT = re.compile(r"^/apis/keda\.sh/v1alpha1/namespaces/([^/]+)/scaledobjects/([^/]+)$")
_COLLECTION = re.compile(
    r"^/(apis/batch/v1|api/v1)/namespaces/([^/]+)/(jobs|services)(?:/([^/]+))?$")


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str
    body: Any


@dataclass
class StandInCluster:
    """The objects the stand-in holds, keyed by (namespace, name)."""

    replicas: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(kind plural, namespace, name) -> spec.replicas of a Deployment or StatefulSet."""
    scaled_objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    created: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    """(jobs|services, namespace, name) -> the object as posted."""
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]


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


def _handler(cluster: StandInCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with cluster.lock:
                cluster.requests.append(Recorded(self.command, self.path.split("?")[0],
                                                 self.headers.get("Content-Type", ""), body))
            return body

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
            body = self._body()
            path = self.path.split("?")[0]
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
                if m := _COLLECTION.match(path):
                    plural, ns, name = m.group(3), m.group(2), m.group(4)
                    if self.command == "POST" and name is None:
                        name = body["metadata"]["name"]
                        if (plural, ns, name) in cluster.created:
                            return self._reply(409, _status(
                                409, "AlreadyExists", f'{plural} "{name}" already exists'))
                        cluster.created[(plural, ns, name)] = body
                        return self._reply(201, body)
                    if self.command == "GET" and (plural, ns, name) in cluster.created:
                        return self._reply(200, cluster.created[(plural, ns, name)])
                    return self._reply(404, _status(404, "NotFound",
                                                    f'{plural} "{name}" not found'))
            return self._reply(404, _status(404, "NotFound", f"no route for {path}"))

        do_GET = do_PATCH = do_POST = _route

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def start_kube_api(cluster: StandInCluster) -> tuple[ThreadingHTTPServer, str]:
    """Serve `cluster` on a free loopback port; returns the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(cluster))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
