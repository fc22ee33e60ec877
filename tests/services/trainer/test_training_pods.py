"""The training pods, executed: the Job the launcher renders, run as two local nodes.

test_kubernetes_launcher.py checks the launcher's conversation with the API and
plays the pods with canned log lines; here the pods' side runs for real. The
launcher creates its indexed Job on the stand-in API server
(tests/kube_api_server.py: no cluster runs here), and the test plays the Job
controller and the kubelets by starting each pod's container as a local process
with the command, arguments and environment exactly as rendered. Only what the
cluster would supply is substituted, and nothing else:

- `$(VAR)` references are expanded as the kubelet does, with JOB_COMPLETION_INDEX
  (0 and 1) injected as the Job controller does for an indexed Job;
- each volume mount's path is re-rooted under the pod's own directory (the
  downwardAPI file holds the pod template's annotation, the emptyDirs start
  empty: the two pods share no disk, as on two nodes);
- pod 0's name under the headless Service resolves to 127.0.0.1, and the
  rendezvous port is a free one (two pods share this host's ports);
- `python` is this interpreter, with the repository on PYTHONPATH (the image's
  installed packages), and HOME is a path nothing can be written under (the
  image's user has no home and the root file system is read-only);
- OMP_NUM_THREADS=1 (a host of 2 cores running two ranks; the single-node run
  below gets the same from distributed.launch).

The ranks train on CPU with gloo and talk to the object store through fsspec on
a file:// URL (the same code path as s3://). A first Job is asked to stop (a spot
notice) and checkpoints after its first step; a second Job, of fresh pods with
empty disks, resumes from that checkpoint and finishes. The trainer's launcher
reads each result document and the model back; together they must match a
single-node run of the same plan (torchrun --standalone, distributed.launch) loss
for loss. The pods' disks are separate directories of one host, not separate file
systems: that each node used its own copy is checked by where the files are.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from lmforge.artifacts import ArtifactStore
from lmforge.object_store import RemoteArtifacts
from services.trainer.checkpoints import CheckpointIndex, CheckpointRef
from services.trainer.distributed import launch, write_job
from services.trainer.jobs import TrainingJob
from services.trainer.kubernetes_launcher import (
    JOB_ANNOTATION,
    POD_HOME,
    RENDEZVOUS_PORT,
    ClusterConfig,
    KubernetesJobLauncher,
)
from services.trainer.training import Progress, TrainResult
from tests.conftest import tiny_train_config
from tests.kube_api_server import StandInCluster, start_kube_api

pytestmark = [pytest.mark.distributed, pytest.mark.processes, pytest.mark.servers]

NS = "lmforge"
IMAGE = "registry.example/lmforge/trainer:1.4"
REPO = Path(__file__).resolve().parents[3]
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
POD_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: a reference to an unknown variable stays."""
    return REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), text)


class Pod:
    """One pod of the Job: its container as a local process, its log into the stand-in."""

    def __init__(self, state: StandInCluster, job: dict[str, Any], index: int,
                 root: Path, port: int) -> None:
        self.state = state
        name = job["metadata"]["name"]
        template = job["spec"]["template"]
        (container,) = template["spec"]["containers"]
        self.name = f"{name}-{index}-x7k2p"
        self.root = root
        mounts = {m["mountPath"]: root / m["mountPath"].lstrip("/")
                  for m in container["volumeMounts"]}

        # A path that starts at a mount (a whole value, or an argument's after "="), in
        # one pass; the bucket's file:// URL is this host's already.
        inside = re.compile(r'(?:^|(?<=[="]))(' + "|".join(
            re.escape(m) for m in sorted(mounts, key=len, reverse=True)) + r')(?=[/"]|$)')

        def on_this_host(text: str) -> str:
            text = inside.sub(lambda m: str(mounts[m.group(1)]), text)
            return text.replace(f"{name}-0.{name}:{RENDEZVOUS_PORT}", f"127.0.0.1:{port}")

        for here in mounts.values():
            here.mkdir(parents=True, exist_ok=True)
        (job_volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "job"]
        (item,) = job_volume["downwardAPI"]["items"]
        assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{JOB_ANNOTATION}']"
        job_dir = mounts[next(m["mountPath"] for m in container["volumeMounts"]
                              if m["name"] == "job")]
        (job_dir / item["path"]).write_text(
            on_this_host(template["metadata"]["annotations"][JOB_ANNOTATION]))

        env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{REPO / 'libs'}:{REPO}",
               "HOME": str(root / "no-home-file" / "home"), "OMP_NUM_THREADS": "1",
               "JOB_COMPLETION_INDEX": str(index)}
        (root / "no-home-file").write_text("")  # nothing can be created under HOME
        for var in container["env"]:
            env[var["name"]] = on_this_host(_expand(var["value"], env))
        command = [on_this_host(_expand(arg, env)) for arg in container["command"]]
        assert command[0] == "python"
        self.command = [sys.executable, *command[1:]]
        self.output: list[str] = []
        state.put("pods", NS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "labels": {
                **template["metadata"]["labels"],
                "batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {**template["spec"], "nodeName": f"node-{index}"},
            "status": {"phase": "Running", "containerStatuses": [self._status(
                {"running": {}})]}})
        self.process = subprocess.Popen(self.command, cwd=root, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()

    def _status(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"name": "trainer", "image": IMAGE, "imageID": "",
                "ready": "running" in state, "restartCount": 0, "state": state}

    def _read_log(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.state.append_log(NS, self.name, line)

    def wait(self) -> int:
        """The container's exit, recorded on the pod as the kubelet does."""
        try:
            code = self.process.wait(timeout=POD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(timeout=5)
        self.state.update("pods", NS, self.name, lambda p: p["status"].update(
            phase="Succeeded" if code == 0 else "Failed",
            containerStatuses=[self._status({"terminated": {"exitCode": code}})]))
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Cluster:
    """The launcher's Job run by the test in the Job controller's and kubelets' place."""

    def __init__(self, state: StandInCluster, api: client.ApiClient, root: Path) -> None:
        self.state, self.root = state, root
        self.launcher = KubernetesJobLauncher(api, ClusterConfig(
            namespace=NS, image=IMAGE, gpus_per_node=1, stop_grace_s=60))
        self.runs = 0

    def run(self, job: TrainingJob, stop: threading.Event
            ) -> tuple[TrainResult, list[Progress], list[CheckpointRef]]:
        """One Job of two pods, to its end; the result as the launcher reads it back."""
        self.runs += 1
        pods: list[Pod] = []
        codes: list[int] = []

        def controller_and_kubelets() -> None:
            obj = self.state.wait_for("jobs", NS)
            assert obj["spec"]["completions"] == 2
            if stop.is_set():  # the pods start once the trainer's stop request is there
                document = json.loads(obj["spec"]["template"]["metadata"]["annotations"][
                    JOB_ANNOTATION])
                remote = RemoteArtifacts(document["artifact_url"])
                deadline = time.monotonic() + 10
                while remote.read_document(job.run_id, document["stop_document"]) is None:
                    assert time.monotonic() < deadline, "the launcher wrote no stop document"
                    time.sleep(0.1)
            port = _free_port()
            pods.extend(Pod(self.state, obj, i, self.root / f"job{self.runs}-pod{i}", port)
                        for i in range(2))
            codes.extend(pod.wait() for pod in pods)
            condition = "Complete" if codes == [0, 0] else "Failed"
            self.state.update("jobs", NS, obj["metadata"]["name"], lambda j: j.setdefault(
                "status", {}).update(conditions=[{"type": condition, "status": "True"}]))

        progress: list[Progress] = []
        checkpoints: list[CheckpointRef] = []
        playing = threading.Thread(target=controller_and_kubelets, daemon=True)
        playing.start()
        try:
            result = self.launcher.run(job, stop=stop, on_progress=progress.append,
                                       on_checkpoint=checkpoints.append)
        finally:
            playing.join(timeout=POD_TIMEOUT_S + 10)
            for pod in pods:
                pod.kill()
        assert codes == [0, 0], "".join(
            f"--- {pod.name}\n" + "".join(pod.output[-30:]) for pod in pods)
        assert self.state.objects.keys().isdisjoint({("jobs", NS, n) for n in [
            r.body["metadata"]["name"] for r in self.state.requests_to("POST", "jobs")]})
        return result, progress, checkpoints


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    state = StandInCluster()
    server, url = start_kube_api(state)
    yield Cluster(state, client.ApiClient(client.Configuration(host=url)), tmp_path)
    server.shutdown()
    server.server_close()


def test_two_pods_as_rendered_train_stop_and_resume_as_one_node_would(
        cluster, tmp_path, prepared_dataset) -> None:
    bucket = (tmp_path / "bucket").as_uri()
    store = ArtifactStore(tmp_path / "trainer-home" / "artifacts", remote=RemoteArtifacts(bucket))
    dataset = store.put_dir(prepared_dataset.path)  # the pods fetch it by digest
    config = tiny_train_config(max_steps=6, checkpoint_interval=2, world_size=2)
    job = TrainingJob(run_id="pods", config=config, dataset_dir=dataset.path,
                      dataset_digest=dataset.digest, store=store,
                      home=tmp_path / "trainer-home", device="cpu")

    stop = threading.Event()
    stop.set()  # a spot notice, read by rank 0 within STOP_DOCUMENT_POLL_S
    part, _, part_checkpoints = cluster.run(job, stop)
    assert part.preempted and 1 <= part.step < 6
    # On a fast machine the pods pass a periodic checkpoint (every 2 steps) before rank 0
    # reads the notice: the stop's own checkpoint is then the last one reported.
    assert part.checkpoint is not None and part_checkpoints[-1] == part.checkpoint
    assert [c.step for c in part_checkpoints] == sorted({c.step for c in part_checkpoints})
    # the checkpoint holds both nodes' files: a machine with nothing else resumes from it
    elsewhere = ArtifactStore(tmp_path / "elsewhere", remote=RemoteArtifacts(bucket))
    latest = CheckpointIndex(tmp_path / "elsewhere-index", "pods", elsewhere).latest_good()
    assert latest is not None and latest[0].digest == part.checkpoint.digest
    assert sorted(p.name for p in latest[1].glob("rng-rank*.pt")) == [
        "rng-rank0.pt", "rng-rank1.pt"]
    assert not (latest[1] / ".rank0-disk").exists()

    rest, progress, checkpoints = cluster.run(job, threading.Event())  # new pods, new disks
    assert not rest.preempted and rest.step == 6 and rest.resumed_from_step == part.step
    assert progress[-1].step == 6 and all(c.step > part.step for c in checkpoints)
    assert rest.model_dir is not None and (rest.model_dir / "config.json").is_file()
    # Node 1 resumed from its own copy, fetched from the object store: on a cluster it
    # cannot read rank 0's disk (here it could, this host's file system being shared).
    node1 = ArtifactStore(tmp_path / "job2-pod1" / POD_HOME.lstrip("/") / "artifacts")
    assert node1.exists(part.checkpoint.digest)

    one_node = write_job(tmp_path / "one-node", config=config, dataset_dir=dataset.path,
                         store_root=tmp_path / "one-node-store",
                         checkpoint_root=tmp_path / "one-node-index", run_id="one-node")
    whole = launch(one_node, 2, log_path=tmp_path / "one-node.log")
    assert part.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    assert rest.heldout_perplexity == pytest.approx(whole.heldout_perplexity, rel=1e-5)
