"""Multi-node training on Kubernetes: an indexed Job of torchrun pods, or a Kubeflow PyTorchJob.

`LMFORGE_TRAINER_LAUNCHER=kubernetes` turns a plan whose ranks do not fit on one
node (world_size > LMFORGE_TRAINER_GPUS_PER_NODE) into one batch/v1 Job, created
through the official client, with one pod per node running

    python -m torch.distributed.run --nnodes N --node_rank $(JOB_COMPLETION_INDEX)
        --rdzv_backend static --rdzv_endpoint JOB-0.JOB:29500 --nproc_per_node G
        -m services.trainer.worker /etc/lmforge/job/job.json

and a headless Service `JOB` that gives pod 0 its DNS name (the pods' `subdomain`;
`publishNotReadyAddresses`, so the name resolves before anything is ready). The
rendezvous is static on purpose: node rank = completion index, so global rank 0,
the one that reports, is always pod 0 (c10d hands out node ranks in arrival order).
`=kubeflow` creates a kubeflow.org/v1 PyTorchJob instead (a Master and N-1
Workers, same pods, same command with the operator's MASTER_ADDR and RANK); the
watch, the relay and the stop are shared.

What crosses from the pods to the trainer, and why this way:

- Durable facts go through the object store (LMFORGE_ARTIFACT_URL), which the
  trainer already needs to resume anywhere: the pods fetch the dataset by digest;
  each pod uploads its own ranks' checkpoint files under the checkpoint's address
  and sends rank 0 only their names and digests; rank 0 completes the checkpoint
  and its index as checkpoints.py always does, and on a resume each pod fetches the
  checkpoint by digest (node_checkpoints.py); rank 0 stores the model as an
  artifact and writes its result as the document `runs/<run>/result-<job>.json`;
  the trainer asks for a stop by writing `runs/<run>/stop-<job>.json`, which
  rank 0 polls. (An annotation on the Job would need API access from every pod,
  and a pod sees its own annotations only after the kubelet's sync, a minute
  late.)
- Progress and checkpoint events are rank 0's `LMFORGE_EVENT` lines, as with
  local torchrun, read by following pod 0's log through the API (pods/log, which
  the trainer's Role grants). The pods do not publish to NATS themselves: the
  handler stays the one publisher (its de-duplication ids, the in-progress
  heartbeats that keep the job, metrics, the calibration it stores), and the pods
  need no NATS credentials. A line read twice after the log stream is re-opened
  is skipped by (kind, step); a line lost (the pod deleted mid-stream) costs one
  progress report, never the outcome, which comes from the object store.

The job document (paths inside the pod, the document names, the config) rides in
an annotation of the pod template and is projected as a file by a downwardAPI
volume: no ConfigMap to create, grant or clean up, and `kubectl get job -o yaml`
shows what ran.

The Job is watched (a field-selected watch, in rounds of `WATCH_ROUND_S`); between
rounds the stop flag is checked and the pods are looked at, because an image that
cannot be pulled never fails a Job: the pod waits in ImagePullBackOff forever. That
is reported at once as `TrainingImageUnavailable` (bad input: no retry pulls it)
naming the image and the kubelet's message, and the Job is deleted. A failed Job
(`backoffLimit: 0`: torchrun's ranks live and die as a group; a retry is a new
delivery and a new Job that resumes from the last checkpoint) raises
`KubernetesJobFailed` naming each failed pod, its node rank, exit code, reason and
last log lines; that Job is kept for `kubectl logs` until `ttlSecondsAfterFinished`.
On a stop the ranks get `stop_grace_s` to checkpoint and write a preempted result;
then, and after a success, the Job is deleted (the Service is owned by it and goes
with it). A Job left by an earlier attempt of the same run (a trainer killed without
its grace) is deleted before the new one is created, so two never write one run's
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.artifacts import MANIFEST, ArtifactStore
from lmforge.failures import BadInput
from lmforge.object_store import RemoteArtifacts
from services.trainer.checkpoints import CheckpointRef
from services.trainer.config import TrainConfig, config_to_dict
from services.trainer.distributed import (
    DistributedTrainingError,
    parse_event_line,
    relay_event,
    result_from_dict,
)
from services.trainer.jobs import ClusterLauncher, TrainingJob
from services.trainer.training import Progress, TrainResult

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from services.trainer.settings import TrainerSettings

log = logging.getLogger("lmforge.trainer.kubernetes")

JOB_FILE = "/etc/lmforge/job/job.json"
"""Where the pods read the job document (a downwardAPI projection of JOB_ANNOTATION)."""
JOB_ANNOTATION = "lmforge.dev/training-job"
JOB_LABEL = "lmforge.dev/training-job"
"""Pod label naming the Job: what the Service and the trainer select pods by."""
RUN_LABEL = "lmforge.dev/run"
RENDEZVOUS_PORT = 29500
POD_HOME = "/var/lib/lmforge"
"""LMFORGE_HOME in a training pod: an emptyDir, a cache of the object store."""
CONTAINER = "trainer"
CONFIG_MAP = "lmforge-config"
OBJECT_STORE_SECRET = "lmforge-object-store"
POD_SERVICE_ACCOUNT = "lmforge"
"""deploy/k8s/base/rbac.yaml's token-less account: the ranks never call the API."""
FINISHED_TTL_S = 86400
WATCH_ROUND_S = 2
LOG_TAIL_LINES = 20
IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
CONTAINER_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError"})


class KubernetesJobFailed(DistributedTrainingError):
    """The cluster ran the job and it failed (named pods, exit codes, log tails)."""


class TrainingImageUnavailable(BadInput):
    """The training pods cannot start their image: no retry will pull it."""


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """Where and how the training pods run."""

    namespace: str
    """Namespace of the Jobs (the trainer pod's own by default)."""
    image: str
    """Image of the training pods."""
    gpus_per_node: int = 1
    """Ranks one pod runs (its nvidia.com/gpu request on a cuda plan)."""
    cpu: str = "8"
    """CPU request of a pod."""
    memory: str = "64Gi"
    """Memory request and limit of a pod."""
    stop_grace_s: float = 120.0
    """Seconds the ranks get to checkpoint after a stop before the Job is deleted."""

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("the training pods need an image: set LMFORGE_TRAINER_KUBERNETES_"
                             "IMAGE (the trainer's own image)")
        if not self.namespace:
            raise ValueError("no namespace for training Jobs: set "
                             "LMFORGE_TRAINER_KUBERNETES_NAMESPACE")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node {self.gpus_per_node} must be >= 1")


def nodes_for(world_size: int, per_node: int) -> int:
    """Nodes a plan of `world_size` ranks needs with `per_node` ranks a node."""
    if world_size <= per_node:
        return 1
    if world_size % per_node:
        raise BadInput(f"world_size {world_size} does not split into nodes of {per_node} "
                       f"ranks (LMFORGE_TRAINER_GPUS_PER_NODE={per_node}): torchrun runs "
                       f"the same number on every node; plan a multiple of {per_node}")
    return world_size // per_node


def label_value(text: str) -> str:
    """`text` as a label value (63 characters of [a-z0-9-.]); a long one keeps a hash."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")
    if len(slug) <= 63 and slug == text:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{slug[:54].strip('-.')}-{digest}"


def training_job_name(run_id: str) -> str:
    """A fresh DNS-1035 name: pods are `NAME-<index>`, so it stays well under 63."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:30].strip("-")
    return f"lmforge-train-{slug}-{uuid.uuid4().hex[:6]}" if slug else (
        f"lmforge-train-{uuid.uuid4().hex[:6]}")


def pod_job_document(job: TrainingJob, name: str) -> dict[str, Any]:
    """The worker's job document for a pod: its own paths, the object store's names."""
    remote = _remote(job.store)
    return {"config": config_to_dict(job.config),
            "dataset_dir": "", "dataset_digest": job.dataset_digest,
            "store_root": f"{POD_HOME}/artifacts",
            "checkpoint_root": f"{POD_HOME}/checkpoints",
            "run_id": job.run_id, "device": job.device, "peak_flops": job.peak_flops,
            "artifact_url": remote.url, "artifact_endpoint_url": remote.endpoint_url,
            "stop_file": "", "result_file": "",
            "stop_document": f"stop-{name}", "result_document": f"result-{name}"}


def torchrun_command(*, nodes: int, per_node: int, node_rank: str,
                     rendezvous: list[str]) -> list[str]:
    return ["python", "-m", "torch.distributed.run", f"--nnodes={nodes}",
            f"--node_rank={node_rank}", *rendezvous, f"--nproc_per_node={per_node}",
            "-m", "services.trainer.worker", JOB_FILE]


def pod_template(*, name: str, run_id: str, document: dict[str, Any], config: ClusterConfig,
                 per_node: int, command: list[str], container: str = CONTAINER,
                 subdomain: str = "") -> dict[str, Any]:
    """One training node: `per_node` ranks under torchrun, the job document as a file."""
    cuda = document["device"] == "cuda"
    requests: dict[str, str] = {"cpu": config.cpu, "memory": config.memory}
    limits: dict[str, str] = {"memory": config.memory}
    if cuda:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(per_node)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": POD_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": int(config.stop_grace_s) + 30,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": container, "image": config.image, "command": command,
            "env": [{"name": "LMFORGE_HOME", "value": POD_HOME},
                    {"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "OTEL_SERVICE_NAME", "value": "trainer"}],
            "envFrom": [{"configMapRef": {"name": CONFIG_MAP}},
                        {"secretRef": {"name": OBJECT_STORE_SECRET, "optional": True}}],
            "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
            "resources": {"requests": requests, "limits": limits},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "job", "mountPath": str(Path(JOB_FILE).parent),
                              "readOnly": True},
                             {"name": "home", "mountPath": POD_HOME},
                             {"name": "tmp", "mountPath": "/tmp"},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [
            {"name": "job", "downwardAPI": {"items": [{
                "path": Path(JOB_FILE).name,
                "fieldRef": {"fieldPath": f"metadata.annotations['{JOB_ANNOTATION}']"}}]}},
            {"name": "home", "emptyDir": {"sizeLimit": "200Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
            # NCCL and DataLoader workers need more than the 64 MiB default.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        ],
    }
    if subdomain:
        spec["subdomain"] = subdomain
    if cuda:
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
    return {"metadata": {"labels": _labels(name, run_id),
                         "annotations": {JOB_ANNOTATION: json.dumps(document)}},
            "spec": spec}


def job_body(*, name: str, job: TrainingJob, config: ClusterConfig, nodes: int,
             document: dict[str, Any]) -> dict[str, Any]:
    """The indexed batch/v1 Job: one pod per node, static rendezvous on pod 0."""
    per_node = job.config.world_size // nodes
    command = torchrun_command(
        nodes=nodes, per_node=per_node, node_rank="$(JOB_COMPLETION_INDEX)",
        rendezvous=["--rdzv_backend=static",
                    f"--rdzv_endpoint={name}-0.{name}:{RENDEZVOUS_PORT}"])
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": _labels(name, job.run_id)},
            "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                     "backoffLimit": 0, "ttlSecondsAfterFinished": FINISHED_TTL_S,
                     "template": pod_template(name=name, run_id=job.run_id,
                                              document=document, config=config,
                                              per_node=per_node, command=command,
                                              subdomain=name)}}


def service_body(*, name: str, run_id: str, owner_uid: str) -> dict[str, Any]:
    """Headless: DNS names for the pods (pod 0 hosts the rendezvous), owned by the Job."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": _labels(name, run_id),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": name, "uid": owner_uid}]},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {JOB_LABEL: name},
                     "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT,
                                "targetPort": RENDEZVOUS_PORT}]}}


def _labels(name: str, run_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "training-job", "app.kubernetes.io/part-of": "lmforge",
            JOB_LABEL: name, RUN_LABEL: label_value(run_id)}


def _remote(store: ArtifactStore) -> RemoteArtifacts:
    if store.remote is None:
        raise ValueError("training on a cluster needs an object store the pods can reach: "
                         "set LMFORGE_ARTIFACT_URL (s3://bucket/prefix, gs://...)")
    return store.remote


class KubernetesJobLauncher:
    """A `ClusterLauncher` creating an indexed Job and a headless Service."""

    kind = "Job"

    def __init__(self, api_client: ApiClient, config: ClusterConfig) -> None:
        from kubernetes import client

        self.config = config
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def nodes_for(self, config: TrainConfig) -> int:
        return nodes_for(config.world_size, self.config.gpus_per_node)

    # -- what differs between a Job and a PyTorchJob ------------------------------

    def create(self, name: str, job: TrainingJob, nodes: int, document: dict[str, Any]
               ) -> None:
        ns = self.config.namespace
        created = self.batch.create_namespaced_job(ns, job_body(
            name=name, job=job, config=self.config, nodes=nodes, document=document))
        self.core.create_namespaced_service(ns, service_body(
            name=name, run_id=job.run_id, owner_uid=created.metadata.uid))

    def list_for_run(self, run_id: str) -> list[str]:
        jobs = self.batch.list_namespaced_job(
            self.config.namespace, label_selector=f"{RUN_LABEL}={label_value(run_id)}")
        return [j.metadata.name for j in jobs.items]

    def watched(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The list call a watch of this kind follows, and its leading arguments."""
        return self.batch.list_namespaced_job, (self.config.namespace,)

    success_condition = "Complete"
    """The condition type that says the workload succeeded (a batch Job's)."""

    @classmethod
    def outcome(cls, obj: dict[str, Any]) -> tuple[str, str] | None:
        """("succeeded" | "failed", why) once the workload is over, else None."""
        for condition in (obj.get("status") or {}).get("conditions") or []:
            if condition.get("status") != "True":
                continue
            why = ": ".join(filter(None, [condition.get("reason"), condition.get("message")]))
            if condition.get("type") == cls.success_condition:
                return "succeeded", why
            if condition.get("type") == "Failed":
                return "failed", why
        return None

    def delete(self, name: str) -> None:
        from kubernetes.client import V1DeleteOptions

        self.batch.delete_namespaced_job(
            name, self.config.namespace,
            body=V1DeleteOptions(propagation_policy="Background"))

    def pod_selector(self, name: str) -> str:
        return f"{JOB_LABEL}={name}"

    def rank0_selector(self, name: str) -> str:
        return f"{JOB_LABEL}={name},batch.kubernetes.io/job-completion-index=0"

    @staticmethod
    def node_rank(pod: dict[str, Any]) -> str:
        labels = pod["metadata"].get("labels") or {}
        return labels.get("batch.kubernetes.io/job-completion-index", "?")

    # -- shared: create, watch, relay, stop, result --------------------------------

    def watch_round(self, name: str) -> list[dict[str, Any]]:
        """The workload as it is and as it changes, for up to WATCH_ROUND_S, or until it
        is over: the run's outcome is taken the moment the watch reports it, not at the
        end of the round."""
        from kubernetes import watch

        stream = watch.Watch()
        call, args = self.watched()
        seen: list[dict[str, Any]] = []
        for event in stream.stream(call, *args, field_selector=f"metadata.name={name}",
                                   timeout_seconds=WATCH_ROUND_S, deserialize=False):
            seen.append(event["object"])
            if self.outcome(event["object"]):
                stream.stop()
                break
        return seen

    def run(self, job: TrainingJob, *, stop: threading.Event,
            on_progress: Callable[[Progress], None],
            on_checkpoint: Callable[[CheckpointRef], None]) -> TrainResult:
        from kubernetes.client.exceptions import ApiException

        remote = _remote(job.store)
        nodes = self.nodes_for(job.config)
        for stale in self.list_for_run(job.run_id):
            log.warning("deleting %s %s left by an earlier attempt of run %s", self.kind,
                        stale, job.run_id)
            self.delete(stale)
        name = training_job_name(job.run_id)
        document = pod_job_document(job, name)
        self.create(name, job, nodes, document)
        log.info("created %s %s/%s: %d nodes x %d ranks, image %s", self.kind,
                 self.config.namespace, name, nodes, job.config.world_size // nodes,
                 self.config.image)
        relay = Rank0LogRelay(self, name, on_progress, on_checkpoint)
        relay.start()
        keep = False
        stopped_at: float | None = None
        try:
            while True:
                try:
                    outcomes = [o for o in map(self.outcome, self.watch_round(name)) if o]
                except ApiException as exc:  # a watch cut short is watched again
                    log.warning("watch of %s %s interrupted (%s %s); watching again",
                                self.kind, name, exc.status, exc.reason)
                    outcomes = []
                if outcomes and outcomes[-1][0] == "failed":
                    keep = True
                    raise KubernetesJobFailed(self.failure(name, outcomes[-1][1]))
                if outcomes:
                    break
                self.check_pods(name)
                if stop.is_set() and stopped_at is None:
                    remote.write_document(job.run_id, document["stop_document"],
                                          {"requested_at_unix": time.time()})
                    stopped_at = time.monotonic()
                    log.info("asked the ranks of %s to checkpoint and stop", name)
                if stopped_at is not None and (
                        time.monotonic() - stopped_at > self.config.stop_grace_s):
                    raise KubernetesJobFailed(
                        f"{self.kind} {self.config.namespace}/{name} did not checkpoint "
                        f"within {self.config.stop_grace_s:.0f} s of the stop request "
                        "(LMFORGE_TRAINER_KUBERNETES_STOP_GRACE_S); deleted it, the run "
                        "resumes from its last stored checkpoint")
            relay.finish()
            return self.result(job, remote, name, document["result_document"])
        finally:
            relay.close()
            if not keep:
                try:
                    self.delete(name)
                except ApiException as exc:
                    if exc.status != 404:
                        log.warning("could not delete %s %s: %s %s", self.kind, name,
                                    exc.status, exc.reason)

    def result(self, job: TrainingJob, remote: RemoteArtifacts, name: str,
               document: str) -> TrainResult:
        data = remote.read_document(job.run_id, document)
        if data is None:
            raise KubernetesJobFailed(
                f"{self.kind} {self.config.namespace}/{name} succeeded but rank 0 wrote no "
                f"result at {remote.url}/runs/{job.run_id}/{document}.json")
        result = result_from_dict(data["result"])
        if data.get("model_digest"):
            # A copy the handler can store with move=True (the stored one must stay).
            stored = job.store.get_dir(data["model_digest"])
            model_dir = job.store.scratch_dir("model-") / "model"
            shutil.copytree(stored, model_dir,
                            ignore=lambda d, names: [MANIFEST] if Path(d) == stored else [])
            result.model_dir = model_dir
        return result

    def pods(self, name: str) -> list[dict[str, Any]]:
        listed = self.core.list_namespaced_pod(self.config.namespace,
                                               label_selector=self.pod_selector(name))
        pods: list[dict[str, Any]] = self.api_client.sanitize_for_serialization(listed.items)
        return pods

    def check_pods(self, name: str) -> None:
        """Give up on a pod that cannot start: the Job would wait for it forever."""
        for pod in self.pods(name):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (status.get("state") or {}).get("waiting") or {}
                reason = waiting.get("reason", "")
                where = (f"pod {pod['metadata']['name']} (node rank {self.node_rank(pod)}) "
                         f"of {self.kind} {self.config.namespace}/{name}")
                if reason in IMAGE_ERRORS:
                    self.delete(name)
                    raise TrainingImageUnavailable(
                        f"{where} cannot pull image {status.get('image') or self.config.image}"
                        f": {reason}: {waiting.get('message', '')}; check "
                        "LMFORGE_TRAINER_KUBERNETES_IMAGE and the registry's pull secret")
                if reason in CONTAINER_ERRORS:
                    self.delete(name)
                    raise KubernetesJobFailed(f"{where} cannot start: {reason}: "
                                              f"{waiting.get('message', '')}")

    def failure(self, name: str, why: str) -> str:
        """What failed, pod by pod, with the end of each failed pod's log."""
        lines = [f"{self.kind} {self.config.namespace}/{name} failed ({why})"]
        for pod in self.pods(name):
            pod_name = pod["metadata"]["name"]
            status = pod.get("status") or {}
            for container in status.get("containerStatuses") or []:
                ended = (container.get("state") or {}).get("terminated") or {}
                if ended and ended.get("exitCode", 0) != 0:
                    lines.append(
                        f"pod {pod_name} (node rank {self.node_rank(pod)}) on "
                        f"{(pod.get('spec') or {}).get('nodeName', '?')}: exit code "
                        f"{ended.get('exitCode')} ({ended.get('reason', '?')})"
                        + (f": {ended['message']}" if ended.get("message") else ""))
                    lines.append(self.log_tail(pod_name))
            if status.get("phase") == "Failed" and status.get("reason"):
                lines.append(f"pod {pod_name}: {status['reason']}: {status.get('message', '')}")
        return "\n".join(lines)

    def log_tail(self, pod: str) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            # The raw body, decoded here: kubernetes 36's client hands a pod log back as
            # the repr of its bytes ("b'...\\n...'"), one line with escaped newlines.
            response = self.core.read_namespaced_pod_log(
                pod, self.config.namespace, container=self.container,
                tail_lines=LOG_TAIL_LINES, _preload_content=False)
        except ApiException as exc:
            return f"  (log unreadable: {exc.status} {exc.reason})"
        try:
            body = response.data
        finally:  # an unpreloaded response holds its pooled connection until released
            response.release_conn()
        tail = body.decode("utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(f"  | {line}" for line in tail)

    container = CONTAINER


class Rank0LogRelay:
    """Follows rank 0's pod log and hands its events to the callbacks, each once."""

    def __init__(self, launcher: KubernetesJobLauncher, name: str,
                 on_progress: Callable[[Progress], None],
                 on_checkpoint: Callable[[CheckpointRef], None]) -> None:
        self.launcher, self.name = launcher, name
        self.on_progress, self.on_checkpoint = on_progress, on_checkpoint
        self.seen: set[tuple[str, int]] = set()
        self.closing = threading.Event()
        self.ended = threading.Event()
        """Set when the followed container's log ended because it terminated."""
        self.thread = threading.Thread(target=self._follow, name=f"log-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self, timeout: float = 15.0) -> None:
        """After the job ended: let the relay read rank 0's last lines."""
        self.ended.wait(timeout)

    def close(self) -> None:
        self.closing.set()
        self.thread.join(timeout=1)  # a follow blocks until the pod ends; a daemon

    def _follow(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        launcher = self.launcher
        while not self.closing.is_set():
            try:
                pods = launcher.core.list_namespaced_pod(
                    launcher.config.namespace,
                    label_selector=launcher.rank0_selector(self.name)).items
                if not pods or pods[0].status.phase in (None, "Pending"):
                    self.closing.wait(1.0)
                    continue
                pod = pods[0].metadata.name
                for line in watch.Watch().stream(
                        launcher.core.read_namespaced_pod_log, pod, launcher.config.namespace,
                        container=launcher.container):
                    event = parse_event_line(line)
                    if event is None:
                        continue
                    key = (type(event).__name__, event.step)
                    if key not in self.seen:
                        self.seen.add(key)
                        relay_event(event, self.on_progress, self.on_checkpoint)
                phase = launcher.core.read_namespaced_pod(
                    pod, launcher.config.namespace).status.phase
                if phase in ("Succeeded", "Failed"):
                    self.ended.set()
                    return
            except (ApiException, HTTPError, ValueError) as exc:
                if getattr(exc, "status", None) == 404:  # the pod is gone
                    self.ended.set()
                    return
                log.debug("log of %s's rank 0 not readable yet: %s", self.name, exc)
            self.closing.wait(1.0)


def build_cluster_launcher(settings: TrainerSettings, store: ArtifactStore
                           ) -> ClusterLauncher | None:
    """The launcher LMFORGE_TRAINER_LAUNCHER names; None for 'local' (torchrun here)."""
    if settings.trainer_launcher == "local":
        return None
    from lmforge.kube import kubernetes_api_client, pod_namespace

    _remote(store)  # refused now, not at the first multi-node plan
    config = ClusterConfig(
        namespace=settings.trainer_kubernetes_namespace or pod_namespace(
            "LMFORGE_TRAINER_KUBERNETES_NAMESPACE"),
        image=settings.trainer_kubernetes_image, gpus_per_node=settings.trainer_gpus_per_node,
        cpu=settings.trainer_kubernetes_cpu, memory=settings.trainer_kubernetes_memory,
        stop_grace_s=settings.trainer_kubernetes_stop_grace_s)
    api = kubernetes_api_client(f"LMFORGE_TRAINER_LAUNCHER={settings.trainer_launcher}")
    if settings.trainer_launcher == "kubeflow":
        from services.trainer.kubeflow_launcher import PyTorchJobLauncher

        return PyTorchJobLauncher(api, config)
    return KubernetesJobLauncher(api, config)
