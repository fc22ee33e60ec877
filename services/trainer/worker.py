"""One training rank under torchrun: `python -m torch.distributed.run ... -m
services.trainer.worker JOB.json` (see distributed.py, which writes the job).

Rank 0 prints progress and checkpoint events as `LMFORGE_EVENT {json}` lines
on stdout for the trainer service to publish, and writes the result file.
SIGTERM or the job's stop file makes every rank checkpoint at the same step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path


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
    from services.trainer.distributed import emit
    from services.trainer.training import Trainer

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if job["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def poll_stop_file() -> None:
        while not stop.wait(0.2):
            if Path(job["stop_file"]).exists():
                stop.set()

    threading.Thread(target=poll_stop_file, daemon=True).start()
    config = config_from_dict(job["config"])
    store = ArtifactStore(Path(job["store_root"]), remote=remote_artifacts(
        job.get("artifact_url", ""), job.get("artifact_endpoint_url", "")))
    index = CheckpointIndex(Path(job["checkpoint_root"]), job["run_id"], store,
                            keep=config.checkpoint.keep)
    trainer = Trainer(config, Path(job["dataset_dir"]), store, index, device=device,
                      peak_flops=job["peak_flops"])
    result = trainer.run(stop=stop, on_progress=lambda p: emit("progress", p),
                         on_checkpoint=lambda ref: emit("checkpoint", ref))
    if dist.get_rank() == 0:
        data = asdict(result)
        data["model_dir"] = str(result.model_dir) if result.model_dir else None
        tmp = Path(job["result_file"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
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
