"""Running a training job on several ranks through the standard launcher.

`launch` starts `torchrun --standalone --nproc_per_node N -m services.trainer.worker
JOB.json` (gloo on CPU, NCCL on GPUs), relays rank 0's progress and checkpoint
lines to the callbacks, and turns a stop request into a stop file that every
rank polls (and agrees on with an all-reduce) so they all checkpoint at the
same step. Across nodes the same worker runs under
`torchrun --nnodes M --node_rank K --rdzv_endpoint HOST:PORT --nproc_per_node N
-m services.trainer.worker JOB.json`; each node's LMFORGE_HOME may be its own disk
(node_checkpoints.py) when the job names an object store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from services.trainer.checkpoints import CheckpointRef
from services.trainer.config import TrainConfig, config_to_dict
from services.trainer.training import Progress, TrainResult

EVENT_PREFIX = "LMFORGE_EVENT "


class DistributedTrainingError(RuntimeError):
    pass


def write_job(directory: Path, *, config: TrainConfig, dataset_dir: Path, store_root: Path,
              checkpoint_root: Path, run_id: str, device: str = "cpu",
              peak_flops: float = 0.0, artifact_url: str = "",
              artifact_endpoint_url: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    job = {"config": config_to_dict(config), "dataset_dir": str(dataset_dir),
           "store_root": str(store_root), "checkpoint_root": str(checkpoint_root),
           "run_id": run_id, "device": device, "peak_flops": peak_flops,
           "artifact_url": artifact_url, "artifact_endpoint_url": artifact_endpoint_url,
           "stop_file": str(directory / "STOP"), "result_file": str(directory / "result.json")}
    path = directory / "job.json"
    path.write_text(json.dumps(job, indent=1))
    (directory / "STOP").unlink(missing_ok=True)
    (directory / "result.json").unlink(missing_ok=True)
    return path


def launch(job_path: Path, nproc: int, *, stop: threading.Event | None = None,
           on_progress: Callable[[Progress], None] | None = None,
           on_checkpoint: Callable[[CheckpointRef], None] | None = None,
           log_path: Path | None = None) -> TrainResult:
    job = json.loads(job_path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    log = log_path.open("ab") if log_path else None
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", "-m", "services.trainer.worker", str(job_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if log is None else log, env=env,
        text=True)

    def watch_stop() -> None:
        while process.poll() is None:
            if stop is not None and stop.wait(0.2):
                Path(job["stop_file"]).touch()
                return

    watcher = threading.Thread(target=watch_stop, daemon=True)
    watcher.start()
    assert process.stdout is not None  # stdout=PIPE
    for line in process.stdout:
        relay_event(parse_event_line(line), on_progress, on_checkpoint)
    code = process.wait()
    if log is not None:
        log.close()
    result_file = Path(job["result_file"])
    if code != 0 or not result_file.exists():
        raise DistributedTrainingError(
            f"torchrun with {nproc} ranks exited with {code}"
            + (f"; see {log_path}:\n{_tail(log_path)}" if log_path else ""))
    return result_from_dict(json.loads(result_file.read_text()))


def parse_event_line(line: str) -> Progress | CheckpointRef | None:
    """The event an `LMFORGE_EVENT` line of rank 0's output carries; None for any
    other line (the ranks' own logging)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    message = json.loads(line[len(EVENT_PREFIX):])
    if message["type"] == "progress":
        return Progress(**message["data"])
    if message["type"] == "checkpoint":
        return CheckpointRef(**message["data"])
    return None


def relay_event(event: Progress | CheckpointRef | None,
                on_progress: Callable[[Progress], None] | None,
                on_checkpoint: Callable[[CheckpointRef], None] | None) -> None:
    if isinstance(event, Progress) and on_progress:
        on_progress(event)
    elif isinstance(event, CheckpointRef) and on_checkpoint:
        on_checkpoint(event)


def result_to_dict(result: TrainResult) -> dict:
    """A TrainResult as JSON data: rank 0's result file or object-store document."""
    data = asdict(result)
    data["model_dir"] = str(result.model_dir) if result.model_dir else None
    return data


def result_from_dict(data: dict) -> TrainResult:
    data = dict(data)
    if data.get("model_dir"):
        data["model_dir"] = Path(data["model_dir"])
    if data.get("checkpoint"):
        data["checkpoint"] = CheckpointRef(**data["checkpoint"])
    return TrainResult(**data)


def _tail(path: Path, lines: int = 40) -> str:
    """The end of the ranks' log, so the error says why without a trip to the file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(log unreadable: {exc})"


def emit(kind: str, payload) -> None:
    data = asdict(payload)
    print(EVENT_PREFIX + json.dumps({"type": kind, "data": data}), flush=True)
