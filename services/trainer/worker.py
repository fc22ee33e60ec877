"""One training rank under torchrun: `python -m torch.distributed.run ... -m
services.trainer.worker JOB.json` (see distributed.py, which writes the job).

Rank 0 prints progress and checkpoint events as `LMFORGE_EVENT {json}` lines
on stdout for the trainer service to publish, and writes the result file.
SIGTERM or the job's stop file makes every rank checkpoint at the same step.

In a Kubernetes pod (kubernetes_launcher.py) nothing is shared with the trainer
but the object store, so the job names documents there instead of files:
`dataset_digest` is fetched by digest (and verified), rank 0 polls
`runs/<run_id>/<stop_document>.json` (the ranks agree on a stop by all-reduce,
so one poller is enough), stores the model as an artifact and writes
`runs/<run_id>/<result_document>.json` with the result and the model's digest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

STOP_DOCUMENT_POLL_S = 2.0
"""How often rank 0 in a pod reads the stop document: one small GET, and well inside
the seconds a spot notice leaves."""


def process_group_backend(device_type: str) -> str:
    """gloo on CPU; on CUDA NCCL for CUDA tensors and gloo for CPU ones. The trainer
    all-reduces a small CPU tensor every step (mean loss, stop and budget flags), which
    a group with NCCL alone refuses ("no backend for device type cpu")."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    if job["device"] == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from lmforge.artifacts import ArtifactStore
    from lmforge.object_store import remote_artifacts
    from services.trainer.checkpoints import CheckpointIndex
    from services.trainer.config import config_from_dict
    from services.trainer.distributed import emit, result_to_dict
    from services.trainer.training import Trainer

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if job["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=process_group_backend(device.type))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    config = config_from_dict(job["config"])
    store = ArtifactStore(Path(job["store_root"]), remote=remote_artifacts(
        job.get("artifact_url", ""), job.get("artifact_endpoint_url", "")))
    remote = store.remote
    stop_document = job.get("stop_document", "")
    if stop_document and remote is None:
        raise SystemExit("the job names a stop document but no artifact_url to read it from")

    def poll_stop() -> None:
        if stop_document:  # pods: rank 0 reads the object store, not too often
            while not stop.wait(STOP_DOCUMENT_POLL_S):
                assert remote is not None
                if remote.read_document(job["run_id"], stop_document) is not None:
                    stop.set()
        else:
            while not stop.wait(0.2):
                if Path(job["stop_file"]).exists():
                    stop.set()

    if not stop_document or dist.get_rank() == 0:
        threading.Thread(target=poll_stop, daemon=True).start()
    dataset_dir = Path(job["dataset_dir"])
    if job.get("dataset_digest"):  # a pod: fetched from the object store and verified,
        if local_rank == 0:         # once per node, then read by its other ranks
            store.get_dir(job["dataset_digest"])
        dist.barrier()
        dataset_dir = store.get_dir(job["dataset_digest"], verify=False)
    index = CheckpointIndex(Path(job["checkpoint_root"]), job["run_id"], store,
                            keep=config.checkpoint.keep)
    trainer = Trainer(config, dataset_dir, store, index, device=device,
                      peak_flops=job["peak_flops"])
    result = trainer.run(stop=stop, on_progress=lambda p: emit("progress", p),
                         on_checkpoint=lambda ref: emit("checkpoint", ref))
    if dist.get_rank() == 0 and job.get("result_document"):
        assert remote is not None
        model_digest = ""
        if result.model_dir is not None:
            model_digest = store.put_dir(result.model_dir, move=True).digest  # uploaded
            result.model_dir = None
        remote.write_document(job["run_id"], job["result_document"],
                              {"result": result_to_dict(result), "model_digest": model_digest})
    elif dist.get_rank() == 0:
        tmp = Path(job["result_file"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result_to_dict(result)))
        tmp.replace(job["result_file"])
    # Every rank reaches this point before any leaves, then leaves without running C++
    # destructors: tearing gloo down (destroy_process_group, or the interpreter's exit
    # destroying a still-joinable worker thread) aborted rank 0 in about one CI run in
    # five ("terminate called without an active exception", SIGABRT) after its result
    # was written. The sockets and the store go with the process.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
