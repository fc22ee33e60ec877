"""Host dataset paths as the services in containers see them, or a clear refusal.

docker-compose.yml mounts ./data at /data, and the services only read under
LMFORGE_DATA_ROOTS=/data. `lmforge run ./data/corpus.jsonl` typed on the host must
therefore publish /data/corpus.jsonl. LMFORGE_DATASET_MOUNTS says which host
directories are mounted where (`host=container`, comma separated, e.g.
`./data=/data`); a host path under none of them is refused before anything is
published, since no service could read it. Unset, paths are published as they are
(`lmforge up`: the services share the host's filesystem).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class UnmountedDataset(ValueError):
    """A host path that no container mount covers."""


def parse_mounts(text: str) -> list[tuple[Path, PurePosixPath]]:
    mounts = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        host, sep, container = item.partition("=")
        if not sep or not host or not container.startswith("/"):
            raise ValueError(f"dataset mount {item!r} is not HOST_DIR=/CONTAINER_DIR")
        mounts.append((Path(host).expanduser().resolve(), PurePosixPath(container)))
    return mounts


def container_path(spec: str, mounts_text: str) -> str:
    """`spec` (an absolute host path or glob) as the containers see it."""
    if "://" in spec or not mounts_text.strip():
        return spec
    mounts = parse_mounts(mounts_text)
    host = Path(spec)
    for host_dir, container_dir in mounts:
        if host == host_dir or host_dir in host.parents:
            return str(container_dir / host.relative_to(host_dir).as_posix())
    listed = ", ".join(f"{h}={c}" for h, c in mounts)
    raise UnmountedDataset(
        f"dataset {spec} is outside every directory mounted into the services "
        f"(LMFORGE_DATASET_MOUNTS={listed}): move it under {mounts[0][0]} or mount its "
        f"directory in docker-compose.yml and add it to LMFORGE_DATASET_MOUNTS")
