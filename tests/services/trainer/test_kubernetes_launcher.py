"""The multi-node launchers' Kubernetes conversation, against a stand-in API server.

No cluster runs here: tests/kube_api_server.py speaks Jobs, Services, Pods (and
their logs), PyTorchJobs and watches over HTTP on 127.0.0.1, and each test plays
the Job controller and the kubelets (creates the pods, writes rank 0's log, sets
the Job's conditions). What is checked is the official client's real requests and
the launcher's reading of real-shaped answers; the object store is real (fsspec on
a file:// URL), the same code path as s3://. No torch training runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lmforge.artifacts import ArtifactStore
from lmforge.failures import BadInput
from lmforge.object_store import RemoteArtifacts
from services.trainer import kubernetes_launcher
from services.trainer.checkpoints import CheckpointRef
from services.trainer.config import TrainConfig
from services.trainer.distributed import EVENT_PREFIX, result_to_dict
from services.trainer.jobs import TrainingJob, run_training_job
from services.trainer.kubeflow_launcher import PyTorchJobLauncher
from services.trainer.kubernetes_launcher import (
    JOB_ANNOTATION,
    ClusterConfig,
    KubernetesJobFailed,
    KubernetesJobLauncher,
    TrainingImageUnavailable,
    build_cluster_launcher,
    nodes_for,
)
from services.trainer.settings import TrainerSettings
from services.trainer.training import Progress, TrainResult
from tests.kube_api_server import StandInCluster, start_kube_api

pytestmark = pytest.mark.servers

NS = "lmforge"
IMAGE = "registry.example/lmforge/trainer:1.4"
DATASET = "sha256:" + "ab" * 32


@pytest.fixture
def cluster() -> Iterator[tuple[StandInCluster, client.ApiClient]]:
    state = StandInCluster()
    server, url = start_kube_api(state)
    yield state, client.ApiClient(client.Configuration(host=url))
    server.shutdown()
    server.server_close()


@pytest.fixture
def training_job(tmp_path: Path) -> TrainingJob:
    url = (tmp_path / "bucket").as_uri()
    store = ArtifactStore(tmp_path / "trainer-home" / "artifacts", remote=RemoteArtifacts(url))
    return TrainingJob(run_id="run-7f3a", config=TrainConfig(world_size=8),
                       dataset_dir=tmp_path / "unused", dataset_digest=DATASET, store=store,
                       home=tmp_path / "trainer-home", device="cuda")


def _launcher(api: client.ApiClient, kind: type[KubernetesJobLauncher] = KubernetesJobLauncher,
              **overrides: Any) -> KubernetesJobLauncher:
    config = ClusterConfig(namespace=NS, image=IMAGE, gpus_per_node=4, **overrides)
    return kind(api, config)


class Calls:
    def __init__(self) -> None:
        self.progress: list[int] = []
        self.checkpoints: list[int] = []

    def on_progress(self, p: Progress) -> None:
        self.progress.append(p.step)

    def on_checkpoint(self, ref: CheckpointRef) -> None:
        self.checkpoints.append(ref.step)


def _event_line(kind: str, payload: Any) -> str:
    return EVENT_PREFIX + json.dumps({"type": kind, "data": asdict(payload)}) + "\n"


def _progress(step: int) -> Progress:
    return Progress(step=step, total_steps=4, loss=3.0 - step / 10, learning_rate=1e-3,
                    tokens_per_second=1e5, eta_seconds=1.0)


def _container(state: dict[str, Any], name: str = "trainer") -> dict[str, Any]:
    """A containerStatuses entry as a kubelet reports it (the client insists on the
    required fields)."""
    return {"name": name, "image": IMAGE, "imageID": "", "ready": "running" in state,
            "restartCount": 0, "state": state}


class Kubelet:
    """Plays the Job controller and the kubelets for one Job (or PyTorchJob)."""

    def __init__(self, state: StandInCluster, plural: str = "jobs") -> None:
        self.state, self.plural = state, plural
        self.obj = state.wait_for(plural, NS)
        self.name = self.obj["metadata"]["name"]
        self.pods: list[str] = []

    def template(self) -> dict[str, Any]:
        if self.plural == "jobs":
            return self.obj["spec"]["template"]
        return self.obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]

    def document(self) -> dict[str, Any]:
        """The job document the pods read (the pod template's annotation)."""
        return json.loads(self.template()["metadata"]["annotations"][JOB_ANNOTATION])

    def start_pods(self, nodes: int, rank_labels: Callable[[int], dict[str, str]] | None = None,
                   phase: str = "Running", container: dict[str, Any] | None = None) -> None:
        labels = rank_labels or (lambda i: {"batch.kubernetes.io/job-completion-index": str(i)})
        for i in range(nodes):
            pod = f"{self.name}-{i}-x7k2p"
            self.pods.append(pod)
            self.state.put("pods", NS, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod,
                             "labels": {**self.template()["metadata"]["labels"], **labels(i)},
                             "ownerReferences": [{
                                 "apiVersion": self.obj.get("apiVersion", "batch/v1"),
                                 "kind": self.obj.get("kind", "Job"), "name": self.name,
                                 "uid": self.obj["metadata"]["uid"]}]},
                "spec": {**self.template()["spec"], "nodeName": f"gpu-node-{i}"},
                "status": {"phase": phase, "containerStatuses": [
                    container or _container({"running": {}})]}})

    def log(self, pod: int, text: str) -> None:
        self.state.append_log(NS, self.pods[pod], text)

    def write_result(self, tmp_path: Path, result: TrainResult, with_model: bool) -> str:
        """Rank 0's part: the model stored (and uploaded), the result document written."""
        doc = self.document()
        pod_store = ArtifactStore(tmp_path / "pod-home" / "artifacts",
                                  remote=RemoteArtifacts(doc["artifact_url"]))
        digest = ""
        if with_model:
            model = tmp_path / "pod-model"
            model.mkdir()
            (model / "model.safetensors").write_bytes(b"weights" * 100)
            (model / "config.json").write_text('{"hidden_size": 64}')
            digest = pod_store.put_dir(model, move=True).digest
        assert pod_store.remote is not None
        pod_store.remote.write_document(doc["run_id"], doc["result_document"],
                                        {"result": result_to_dict(result),
                                         "model_digest": digest})
        return digest

    def finish(self, condition: str = "Complete", reason: str = "", message: str = "",
               pod_phase: str = "Succeeded") -> None:
        for pod in self.pods:
            self.state.update("pods", NS, pod, lambda p: p["status"].update(phase=pod_phase))
        self.state.update(self.plural, NS, self.name, lambda j: j.setdefault("status", {})
                          .update(conditions=[{"type": condition, "status": "True",
                                               "reason": reason, "message": message}]))


def _in_thread(play: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            play()
        except BaseException as exc:  # surfaced by join_checked
            errors.append(exc)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _join_checked(thread: threading.Thread) -> None:
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert not thread.errors  # type: ignore[attr-defined]


def _deleted(state: StandInCluster, plural: str) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in state.requests_to("DELETE", plural)]


def test_a_plan_over_one_node_needs_whole_nodes() -> None:
    assert nodes_for(8, 4) == 2
    assert nodes_for(4, 4) == 1
    assert nodes_for(2, 4) == 1
    with pytest.raises(BadInput, match="world_size 6 does not split into nodes of 4"):
        nodes_for(6, 4)


def test_a_two_node_plan_becomes_an_indexed_job_of_torchrun_pods_and_a_headless_service(
        cluster, training_job, tmp_path) -> None:
    state, api = cluster

    def play() -> None:
        kubelet = Kubelet(state)
        kubelet.start_pods(2)
        kubelet.write_result(tmp_path, TrainResult(preempted=False, step=4), with_model=False)
        kubelet.finish()

    thread = _in_thread(play)
    _launcher(api).run(training_job, stop=threading.Event(), on_progress=lambda p: None,
                       on_checkpoint=lambda r: None)
    _join_checked(thread)

    (posted_job,) = [r.body for r in state.requests_to("POST", "jobs")]
    (posted_service,) = [r.body for r in state.requests_to("POST", "services")]
    name = posted_job["metadata"]["name"]
    assert name.startswith("lmforge-train-run-7f3a-") and len(name) <= 52
    spec = posted_job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"],
            spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == [
        "python", "-m", "torch.distributed.run", "--nnodes=2",
        "--node_rank=$(JOB_COMPLETION_INDEX)", "--rdzv_backend=static",
        f"--rdzv_endpoint={name}-0.{name}:29500", "--nproc_per_node=4",
        "-m", "services.trainer.worker", "/etc/lmforge/job/job.json"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "LMFORGE_HOME", "value": "/var/lib/lmforge"} in container["env"]
    assert {"configMapRef": {"name": "lmforge-config"}} in container["envFrom"]
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (job_volume,) = [v for v in pod["volumes"] if v["name"] == "job"]
    assert job_volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{JOB_ANNOTATION}']")
    document = json.loads(spec["template"]["metadata"]["annotations"][JOB_ANNOTATION])
    assert document["dataset_digest"] == DATASET
    assert document["artifact_url"] == training_job.store.remote.url
    assert document["config"]["world_size"] == 8
    assert (document["stop_document"], document["result_document"]) == (
        f"stop-{name}", f"result-{name}")
    assert document["store_root"].startswith("/var/lib/lmforge/")

    assert posted_service["metadata"]["name"] == name
    service = posted_service["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert service["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]
    (owner,) = posted_service["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("Job", name)
    assert owner["uid"] == state.requests_to("POST", "jobs")[0].body["metadata"]["uid"]


def test_rank_0s_log_reaches_the_callbacks_once_and_the_model_comes_from_the_object_store(
        cluster, training_job, tmp_path) -> None:
    state, api = cluster
    calls = Calls()
    digest: list[str] = []

    def play() -> None:
        kubelet = Kubelet(state)
        kubelet.start_pods(2)
        kubelet.log(1, _event_line("progress", _progress(1)))  # not rank 0: never read
        kubelet.log(0, "[rank0] NCCL INFO Using network Socket\n")
        kubelet.log(0, _event_line("progress", _progress(1)))
        kubelet.log(0, _event_line("progress", _progress(2)))
        kubelet.log(0, _event_line("checkpoint", CheckpointRef(step=2, digest=DATASET)))
        kubelet.log(0, _event_line("progress", _progress(2)))  # a repeat is skipped
        time.sleep(0.5)
        digest.append(kubelet.write_result(
            tmp_path, TrainResult(preempted=False, step=4, final_loss=2.5,
                                  checkpoint=CheckpointRef(step=4, digest=DATASET)),
            with_model=True))
        kubelet.log(0, _event_line("progress", _progress(4)))
        kubelet.finish()

    thread = _in_thread(play)
    result = _launcher(api).run(training_job, stop=threading.Event(),
                                on_progress=calls.on_progress,
                                on_checkpoint=calls.on_checkpoint)
    _join_checked(thread)

    assert calls.progress == [1, 2, 4]
    assert calls.checkpoints == [2]
    assert (result.preempted, result.step, result.final_loss) == (False, 4, 2.5)
    assert result.checkpoint == CheckpointRef(step=4, digest=DATASET)
    assert result.model_dir is not None
    assert sorted(p.name for p in result.model_dir.iterdir()) == [
        "config.json", "model.safetensors"]
    # the handler stores it with move=True: the copy goes, the stored artifact stays
    stored = training_job.store.put_dir(result.model_dir, move=True)
    assert stored.digest == digest[0] and training_job.store.exists(digest[0])
    name = state.requests_to("POST", "jobs")[0].body["metadata"]["name"]
    assert _deleted(state, "jobs") == [name]
    assert state.get("services", NS, name) is None  # owned by the Job, collected with it


def test_a_failed_pod_fails_the_run_naming_the_pod_its_exit_code_and_log_tail(
        cluster, training_job) -> None:
    state, api = cluster

    def play() -> None:
        kubelet = Kubelet(state)
        kubelet.start_pods(2)
        kubelet.log(1, "step 3\ntorch.OutOfMemoryError: CUDA out of memory. Tried to "
                       "allocate 2.00 GiB\n")
        state.update("pods", NS, kubelet.pods[1], lambda p: p["status"].update(
            phase="Failed", containerStatuses=[_container(
                {"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]))
        kubelet.finish("Failed", "BackoffLimitExceeded", "Job has reached the specified "
                       "backoff limit", pod_phase="Failed")

    thread = _in_thread(play)
    with pytest.raises(KubernetesJobFailed) as failed:
        _launcher(api).run(training_job, stop=threading.Event(), on_progress=lambda p: None,
                           on_checkpoint=lambda r: None)
    _join_checked(thread)
    message = str(failed.value)
    name = state.requests_to("POST", "jobs")[0].body["metadata"]["name"]
    assert f"Job {NS}/{name} failed (BackoffLimitExceeded" in message
    assert f"pod {name}-1-x7k2p (node rank 1) on gpu-node-1: exit code 137 (OOMKilled)" in (
        message)
    assert "\n  | torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in (
        message)  # the log's own lines, not the repr of its bytes
    assert _deleted(state, "jobs") == []  # kept for kubectl logs until its TTL


def test_an_image_that_cannot_be_pulled_is_bad_input_naming_it_and_the_job_is_deleted(
        cluster, training_job) -> None:
    state, api = cluster

    def play() -> None:
        Kubelet(state).start_pods(2, phase="Pending", container=_container({"waiting": {
            "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{IMAGE}"'}}))

    thread = _in_thread(play)
    with pytest.raises(TrainingImageUnavailable) as failed:
        _launcher(api).run(training_job, stop=threading.Event(), on_progress=lambda p: None,
                           on_checkpoint=lambda r: None)
    _join_checked(thread)
    assert isinstance(failed.value, BadInput)  # stage.failed at once, no retries
    assert f"cannot pull image {IMAGE}: ImagePullBackOff" in str(failed.value)
    assert "LMFORGE_TRAINER_KUBERNETES_IMAGE" in str(failed.value)
    name = state.requests_to("POST", "jobs")[0].body["metadata"]["name"]
    assert name in _deleted(state, "jobs")


def test_a_stop_asks_the_ranks_through_the_object_store_returns_their_checkpoint_and_deletes(
        cluster, training_job, tmp_path) -> None:
    state, api = cluster
    stop = threading.Event()

    def play() -> None:
        kubelet = Kubelet(state)
        kubelet.start_pods(2)
        stop.set()  # SIGTERM or a spot notice reaches the trainer
        doc = kubelet.document()
        remote = RemoteArtifacts(doc["artifact_url"])
        deadline = time.monotonic() + 10
        while remote.read_document(doc["run_id"], doc["stop_document"]) is None:
            assert time.monotonic() < deadline, "no stop document written"
            time.sleep(0.1)
        kubelet.write_result(tmp_path, TrainResult(
            preempted=True, step=3, checkpoint=CheckpointRef(step=3, digest=DATASET)),
            with_model=False)
        kubelet.finish()

    thread = _in_thread(play)
    result = _launcher(api).run(training_job, stop=stop, on_progress=lambda p: None,
                                on_checkpoint=lambda r: None)
    _join_checked(thread)
    assert result.preempted and result.checkpoint == CheckpointRef(step=3, digest=DATASET)
    assert result.model_dir is None
    name = state.requests_to("POST", "jobs")[0].body["metadata"]["name"]
    assert _deleted(state, "jobs") == [name]


def test_ranks_that_do_not_checkpoint_within_the_grace_are_deleted_and_it_says_so(
        cluster, training_job) -> None:
    state, api = cluster
    stop = threading.Event()

    def play() -> None:
        Kubelet(state).start_pods(2)
        stop.set()

    thread = _in_thread(play)
    with pytest.raises(KubernetesJobFailed, match="did not checkpoint within 1 s"):
        _launcher(api, stop_grace_s=1.0).run(training_job, stop=stop,
                                             on_progress=lambda p: None,
                                             on_checkpoint=lambda r: None)
    _join_checked(thread)
    name = state.requests_to("POST", "jobs")[0].body["metadata"]["name"]
    assert _deleted(state, "jobs") == [name]


def test_a_job_left_by_an_earlier_attempt_of_the_run_is_deleted_first(
        cluster, training_job, tmp_path) -> None:
    state, api = cluster
    state.put("jobs", NS, {"metadata": {"name": "lmforge-train-run-7f3a-old", "labels": {
        "lmforge.dev/run": "run-7f3a"}}})

    def play() -> None:
        deadline = time.monotonic() + 10
        while not state.requests_to("POST", "jobs"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kubelet = Kubelet(state)
        kubelet.start_pods(2)
        kubelet.write_result(tmp_path, TrainResult(preempted=False, step=4), with_model=False)
        kubelet.finish()

    thread = _in_thread(play)
    _launcher(api).run(training_job, stop=threading.Event(), on_progress=lambda p: None,
                       on_checkpoint=lambda r: None)
    _join_checked(thread)
    assert _deleted(state, "jobs")[0] == "lmforge-train-run-7f3a-old"


def test_kubeflow_creates_a_pytorchjob_of_a_master_and_workers_and_follows_it(
        cluster, training_job, tmp_path) -> None:
    state, api = cluster
    calls = Calls()

    def ranks(i: int) -> dict[str, str]:
        return {"training.kubeflow.org/replica-type": "master" if i == 0 else "worker",
                "training.kubeflow.org/replica-index": "0" if i == 0 else str(i - 1)}

    def play() -> None:
        kubelet = Kubelet(state, "pytorchjobs")
        kubelet.start_pods(2, rank_labels=ranks)
        kubelet.log(0, _event_line("progress", _progress(1)))
        time.sleep(0.3)
        kubelet.write_result(tmp_path, TrainResult(preempted=False, step=4), with_model=False)
        kubelet.finish("Succeeded", "PyTorchJobSucceeded")

    thread = _in_thread(play)
    result = _launcher(api, PyTorchJobLauncher).run(
        training_job, stop=threading.Event(), on_progress=calls.on_progress,
        on_checkpoint=calls.on_checkpoint)
    _join_checked(thread)
    assert result.step == 4 and calls.progress == [1]
    (posted,) = state.requests_to("POST", "pytorchjobs")
    assert posted.path == f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
    specs = posted.body["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 1)
    assert posted.body["spec"]["runPolicy"]["backoffLimit"] == 0
    (container,) = specs["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"  # where the operator injects MASTER_ADDR, RANK
    assert "--node_rank=$(RANK)" in container["command"]
    assert "--master_addr=$(MASTER_ADDR)" in container["command"]
    assert "--nproc_per_node=4" in container["command"]
    assert state.requests_to("POST", "services") == []  # the operator makes its own
    assert _deleted(state, "pytorchjobs") == [posted.body["metadata"]["name"]]


@pytest.mark.parametrize(("kind", "plural", "condition", "outcome"), [
    (KubernetesJobLauncher, "jobs", "Complete", "succeeded"),
    (KubernetesJobLauncher, "jobs", "Failed", "failed"),
    (PyTorchJobLauncher, "pytorchjobs", "Succeeded", "succeeded"),
    (PyTorchJobLauncher, "pytorchjobs", "Failed", "failed"),
])
def test_a_watch_round_ends_the_moment_the_workload_reports_its_outcome(
        cluster, monkeypatch, kind, plural, condition, outcome) -> None:
    state, api = cluster
    monkeypatch.setattr(kubernetes_launcher, "WATCH_ROUND_S", 30)
    state.put(plural, NS, {"metadata": {"name": "lmforge-train-run-7f3a-1a2b3c"}})

    def report() -> None:
        time.sleep(0.2)
        state.update(plural, NS, "lmforge-train-run-7f3a-1a2b3c", lambda j: j.setdefault(
            "status", {}).update(conditions=[{"type": condition, "status": "True"}]))

    thread = _in_thread(report)
    started = time.monotonic()
    seen = _launcher(api, kind).watch_round("lmforge-train-run-7f3a-1a2b3c")
    _join_checked(thread)
    assert time.monotonic() - started < 1.5  # not the round's 30 s (nor the default 2)
    assert kind.outcome(seen[-1]) == (outcome, "")


def test_a_plan_over_one_node_goes_to_the_cluster_launcher(training_job) -> None:
    class FourPerNode:
        def nodes_for(self, config: TrainConfig) -> int:
            return nodes_for(config.world_size, 4)

        def run(self, job: TrainingJob, **callbacks: object) -> TrainResult:
            return TrainResult(preempted=False, step=7)

    result = run_training_job(training_job, stop=threading.Event(), on_progress=lambda p: None,
                              on_checkpoint=lambda r: None, cluster=FourPerNode())
    assert result.step == 7  # 8 ranks on 4-GPU nodes: not torchrun here


def test_a_cluster_launcher_without_an_object_store_is_refused_at_start(tmp_path) -> None:
    settings = TrainerSettings(home=tmp_path, trainer_launcher="kubernetes",
                               trainer_kubernetes_image=IMAGE,
                               trainer_kubernetes_namespace=NS)
    with pytest.raises(ValueError, match="set LMFORGE_ARTIFACT_URL"):
        build_cluster_launcher(settings, ArtifactStore(tmp_path / "artifacts"))
    local = TrainerSettings(home=tmp_path)
    assert build_cluster_launcher(local, ArtifactStore(tmp_path / "artifacts")) is None


def test_a_log_tail_hands_its_connection_back_to_the_pool(cluster) -> None:
    """log_tail reads the body unpreloaded (as bytes); the pooled connection must go back
    (urllib3 2.8 already releases a fully read body: this guards the explicit release)."""
    state, api = cluster
    state.put("pods", NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p-0"},
                           "spec": {"containers": [{"name": "trainer"}]},
                           "status": {"phase": "Failed"}})
    state.append_log(NS, "p-0", "step 1\nboom\n")
    launcher = _launcher(api)
    for _ in range(3):
        assert launcher.log_tail("p-0") == "  | step 1\n  | boom"
    pools = list(api.rest_client.pool_manager.pools._container.values())
    assert pools and all(p.pool.qsize() == p.pool.maxsize for p in pools)  # none held
