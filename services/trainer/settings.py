"""trainer settings (env prefix LMFORGE_TRAINER_; shared ones LMFORGE_)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.settings import ServiceSettings
from services.trainer.spot_notices import NoticeSource


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    trainer_keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept per run.")
    trainer_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")
    trainer_peak_tflops: float = Field(
        0.0, ge=0, description="Device peak for MFU (989 for an H100's dense bf16); 0 = off.")
    trainer_spot_notices: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Spot termination-notice endpoints to poll, comma "
        "separated: aws, gcp, azure (their metadata endpoints) or provider=URL. Empty: none "
        "(SIGTERM still checkpoints and hands back).")
    trainer_spot_poll_s: float = Field(5.0, gt=0, le=60, description="Seconds between polls "
                                       "of the spot notice endpoints.")

    trainer_launcher: Literal["local", "kubernetes", "kubeflow"] = Field(
        "local", description="Where a plan that needs more than one node runs: 'local' "
        "(torchrun on this machine, all ranks here), 'kubernetes' (an indexed batch/v1 Job "
        "and a headless Service), 'kubeflow' (a kubeflow.org/v1 PyTorchJob). Both cluster "
        "launchers need LMFORGE_ARTIFACT_URL: the pods share nothing else with the trainer.")
    trainer_kubernetes_namespace: str = Field(
        "", description="Namespace of the training Jobs; empty: the trainer pod's own.")
    trainer_kubernetes_image: str = Field(
        "", description="Image of the training pods (the trainer's own image, with torch "
        "for the plans' device); required by the cluster launchers.")
    trainer_gpus_per_node: int = Field(
        1, ge=1, description="Ranks (GPUs) one node runs: a plan of world_size W needs "
        "W / this many nodes, and more than one node goes to the cluster launcher.")
    trainer_kubernetes_cpu: str = Field("8", description="CPU request of a training pod.")
    trainer_kubernetes_memory: str = Field(
        "64Gi", description="Memory request and limit of a training pod.")
    trainer_kubernetes_stop_grace_s: float = Field(
        120.0, gt=0, description="After a stop, seconds the ranks get to checkpoint and "
        "write their result before the Job is deleted (inside the trainer pod's 150 s "
        "termination grace).")

    @field_validator("trainer_spot_notices", mode="before")
    @classmethod
    def _split_sources(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("trainer_spot_notices")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        for spec in value:
            NoticeSource.parse(spec)  # raises ValueError naming the bad one
        return value

    def notice_sources(self) -> list[NoticeSource]:
        return [NoticeSource.parse(spec) for spec in self.trainer_spot_notices]
