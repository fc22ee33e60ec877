"""Multi-node training as a Kubeflow PyTorchJob (`LMFORGE_TRAINER_LAUNCHER=kubeflow`).

For clusters that run the Kubeflow training operator (kubeflow.org/v1, v1.7+) and
want its scheduling integrations (gang scheduling through Volcano or the
scheduler plugins, its dashboards) rather than a plain Job. Everything but the
object differs nowhere from kubernetes_launcher.py: the same pods, job document,
object-store documents, log relay, stop and failure reports.

The operator makes the Service and injects MASTER_ADDR, MASTER_PORT and RANK (the
replica's place: Master 0, Worker i is i+1) into each pod, and the command hands
those to torchrun explicitly. `nprocPerNode` is left unset on purpose: with it
the operator redefines WORLD_SIZE and RANK per process for elastic launches,
while torchrun here already gives every process its own.

Kubeflow Trainer v2's TrainJob needs a ClusterTrainingRuntime installed by the
operator's admin; it is not created here (deploy/k8s/README.md, "Not yet").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.trainer.jobs import TrainingJob
from services.trainer.kubernetes_launcher import (
    FINISHED_TTL_S,
    JOB_LABEL,
    RUN_LABEL,
    ClusterConfig,
    KubernetesJobLauncher,
    _labels,
    label_value,
    pod_template,
    torchrun_command,
)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"
"""The operator injects its environment only into a container of this name."""
REPLICA_TYPE = "training.kubeflow.org/replica-type"
REPLICA_INDEX = "training.kubeflow.org/replica-index"


def pytorchjob_body(*, name: str, job: TrainingJob, config: ClusterConfig, nodes: int,
                    document: dict[str, Any]) -> dict[str, Any]:
    """A Master and `nodes - 1` Workers, each a torchrun node of the same pod template."""
    per_node = job.config.world_size // nodes
    command = torchrun_command(
        nodes=nodes, per_node=per_node, node_rank="$(RANK)",
        rendezvous=["--rdzv_backend=static", "--master_addr=$(MASTER_ADDR)",
                    "--master_port=$(MASTER_PORT)"])

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never",
                "template": pod_template(name=name, run_id=job.run_id, document=document,
                                         config=config, per_node=per_node, command=command,
                                         container=CONTAINER)}

    specs = {"Master": replicas(1)}
    if nodes > 1:
        specs["Worker"] = replicas(nodes - 1)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": _labels(name, job.run_id)},
            "spec": {"runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None",
                                   "ttlSecondsAfterFinished": FINISHED_TTL_S},
                     "pytorchReplicaSpecs": specs}}


class PyTorchJobLauncher(KubernetesJobLauncher):
    """A `ClusterLauncher` creating a PyTorchJob (the operator makes pods and Service)."""

    kind = "PyTorchJob"
    container = CONTAINER

    def create(self, name: str, job: TrainingJob, nodes: int, document: dict[str, Any]
               ) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.config.namespace, PLURAL,
            pytorchjob_body(name=name, job=job, config=self.config, nodes=nodes,
                            document=document))

    def list_for_run(self, run_id: str) -> list[str]:
        listed = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.config.namespace, PLURAL,
            label_selector=f"{RUN_LABEL}={label_value(run_id)}")
        return [item["metadata"]["name"] for item in listed.get("items", [])]

    def watched(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.custom.list_namespaced_custom_object, (
            GROUP, VERSION, self.config.namespace, PLURAL)

    success_condition = "Succeeded"
    """A PyTorchJob's success condition (a batch Job says "Complete")."""

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.config.namespace, PLURAL, name,
            propagation_policy="Background")

    def pod_selector(self, name: str) -> str:
        # The operator labels pods with the job's name; the template's labels come too.
        return f"{JOB_LABEL}={name}"

    def rank0_selector(self, name: str) -> str:
        return f"{JOB_LABEL}={name},{REPLICA_TYPE}=master,{REPLICA_INDEX}=0"

    @staticmethod
    def node_rank(pod: dict[str, Any]) -> str:
        labels = pod["metadata"].get("labels") or {}
        index = labels.get(REPLICA_INDEX, "?")
        if labels.get(REPLICA_TYPE) == "worker" and index.isdigit():
            return str(int(index) + 1)
        return index
