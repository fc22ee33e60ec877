"""Spot termination notices: poll the cloud's metadata endpoint, stop training in time.

A spot instance gets a short warning before it is taken (AWS two minutes, GCP and
Azure about 30 seconds). SIGTERM often comes too late or not at all, so the trainer
polls the endpoint itself and, on a notice, does what SIGTERM does: checkpoint at
the step in flight, publish `training.preempted` with that checkpoint, and exit.

Endpoints (the defaults of each `provider=URL` setting; any URL can be given, e.g. a
test server):

- aws: `http://169.254.169.254/latest/meta-data/spot/instance-action`: 404 until a
  notice, then 200 with `{"action": "terminate"|"stop"|"hibernate", "time": ...}`.
  (With IMDSv2 enforced a session token is needed: PUT /latest/api/token first; the
  watcher does that when a GET is refused with 401.)
- gcp: `http://metadata.google.internal/computeMetadata/v1/instance/preempted`
  with `Metadata-Flavor: Google`: the body is `FALSE` until preemption, then `TRUE`.
- azure: `http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01`
  with `Metadata: true`: a JSON document whose `Events` list holds one with
  `EventType` `Preempt` when the VM is about to be evicted.

An endpoint that cannot be reached is not a notice: the watcher logs it once (and
again when it comes back), so a trainer polling a URL that does not exist on this
machine says so instead of pretending to watch.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("lmforge.trainer.spot")

DEFAULT_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "azure": "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
}
_HEADERS = {"aws": {}, "gcp": {"Metadata-Flavor": "Google"}, "azure": {"Metadata": "true"}}


@dataclass(frozen=True, slots=True)
class NoticeSource:
    provider: str
    """"aws", "gcp" or "azure": how the answer is read."""
    url: str

    @classmethod
    def parse(cls, spec: str) -> NoticeSource:
        """`aws`, `gcp`, `azure` (their standard endpoints) or `provider=URL`."""
        provider, _, url = spec.partition("=")
        provider = provider.strip().lower()
        if provider not in DEFAULT_URLS:
            raise ValueError(f"spot notice source {spec!r}: the provider must be one of "
                             f"{', '.join(DEFAULT_URLS)} (optionally =URL)")
        return cls(provider, url.strip() or DEFAULT_URLS[provider])


@dataclass(frozen=True, slots=True)
class Notice:
    provider: str
    detail: str
    """What the endpoint said (the action and time, or the event), for the event's reason."""

    def reason(self) -> str:
        return f"spot notice from {self.provider}: {self.detail}"


def read_notice(source: NoticeSource, status: int, body: bytes) -> Notice | None:
    """The notice in one answer of `source`'s endpoint, or None if there is none."""
    text = body.decode("utf-8", "replace").strip()
    if source.provider == "aws":
        if status != 200:
            return None
        try:
            action = json.loads(text)
        except json.JSONDecodeError:
            return Notice("aws", text[:200] or "instance-action answered")
        return Notice("aws", f"{action.get('action', '?')} at {action.get('time', '?')}")
    if source.provider == "gcp":
        return Notice("gcp", "preempted=TRUE") if status == 200 and text == "TRUE" else None
    if status != 200:
        return None
    try:
        events = json.loads(text).get("Events", [])
    except (json.JSONDecodeError, AttributeError):
        return None
    for event in events:
        if event.get("EventType") == "Preempt":
            return Notice("azure", f"Preempt {event.get('EventId', '')} not before "
                                   f"{event.get('NotBefore', '?')}".strip())
    return None


class NoticeWatcher:
    """A daemon thread polling every source each `interval_s`; calls `on_notice` once."""

    def __init__(self, sources: list[NoticeSource], interval_s: float,
                 on_notice: Callable[[Notice], None], *, timeout_s: float = 1.0) -> None:
        self.sources = sources
        self.interval_s = interval_s
        self.on_notice = on_notice
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._unreachable: set[str] = set()
        self._aws_token = ""
        self._thread = threading.Thread(target=self._run, name="spot-notices", daemon=True)

    def start(self) -> None:
        if self.sources:
            log.info("watching spot notices: %s every %.1f s",
                     ", ".join(f"{s.provider}={s.url}" for s in self.sources), self.interval_s)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            for source in self.sources:
                notice = self.poll(source)
                if notice is not None:
                    log.warning("%s: checkpointing and handing the job back", notice.reason())
                    self.on_notice(notice)
                    return
            self._stop.wait(self.interval_s)

    def poll(self, source: NoticeSource) -> Notice | None:
        headers = dict(_HEADERS[source.provider])
        if source.provider == "aws" and self._aws_token:
            headers["X-aws-ec2-metadata-token"] = self._aws_token
        try:
            status, body = self._get(source.url, headers)
            if status == 401 and source.provider == "aws":
                self._aws_token = self._imds_token(source.url)
                headers["X-aws-ec2-metadata-token"] = self._aws_token
                status, body = self._get(source.url, headers)
        except OSError as exc:
            if source.url not in self._unreachable:
                self._unreachable.add(source.url)
                log.warning("spot notice endpoint %s unreachable (%s): no notice can be seen "
                            "there until it answers", source.url, exc)
            return None
        if source.url in self._unreachable:
            self._unreachable.discard(source.url)
            log.info("spot notice endpoint %s answers again", source.url)
        return read_notice(source, status, body)

    def _get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:  # 404 and friends: an answer, not a failure
            return exc.code, exc.read()

    def _imds_token(self, url: str) -> str:
        base = url.split("/latest/", 1)[0]
        request = urllib.request.Request(
            f"{base}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return response.read().decode().strip()
