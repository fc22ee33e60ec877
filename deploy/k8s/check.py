"""Render every overlay and validate what a cluster would be sent, without a cluster.

    python deploy/k8s/check.py            # exit 0 when every overlay passes

For each overlay under deploy/k8s/overlays:
1. `kubectl kustomize` renders it (kubectl's built-in Kustomize; no cluster needed);
2. `kubernetes-validate --strict` checks the built-in kinds against the published
   OpenAPI schemas of KUBERNETES_VERSION, refusing unknown fields;
3. every custom resource (KEDA's ScaledObject) is checked against the CRD schema
   shipped in deploy/k8s/crds/ (SOURCES.md says where each came from), also
   refusing unknown fields, as the API server's strict field validation would.

A custom resource whose CRD is not shipped is an error, never a silent pass.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KUBERNETES_VERSION = "1.33.0"
"""The oldest Kubernetes the manifests are written for (pod-index label, gRPC probes)."""

K8S_DIR = Path(__file__).resolve().parent
CRD_DIR = K8S_DIR / "crds"
BUILT_IN_GROUPS = {"", "apps", "batch", "policy", "rbac.authorization.k8s.io",
                   "networking.k8s.io", "autoscaling"}


def render(overlay: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("kubectl is not on PATH: it renders the Kustomize overlays "
                         "(Debian/Ubuntu: apt-get install kubectl)")
    done = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay} failed: {done.stderr.strip()}")
    return done.stdout


def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> the version's openAPIV3Schema, from deploy/k8s/crds."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schemas[(spec["group"], version["name"], spec["names"]["kind"])] = (
                    version["schema"]["openAPIV3Schema"])
    return schemas


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Fields the schema does not declare (a structural schema prunes them silently)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, dict) and "properties" in schema:
        known = schema["properties"]
        for key, value in obj.items():
            if key in known:
                yield from unknown_fields(value, known[key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                yield f"{path}.{key}"
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            yield from unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


def check_custom_resources(documents: list[dict[str, Any]]) -> list[str]:
    schemas = crd_schemas()
    problems = []
    for doc in documents:
        group, _, version = doc["apiVersion"].rpartition("/")
        if group in BUILT_IN_GROUPS:
            continue
        name = f"{doc['kind']} {doc.get('metadata', {}).get('name')}"
        schema = schemas.get((group, version, doc["kind"]))
        if schema is None:
            problems.append(f"{name}: no CRD for {doc['apiVersion']} {doc['kind']} in {CRD_DIR}")
            continue
        for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
            where = ".".join(str(p) for p in error.absolute_path)
            problems.append(f"{name}: {where}: {error.message}")
        problems.extend(f"{name}: unknown field {field}" for field in unknown_fields(doc, schema))
    return problems


def check_built_in(rendered: Path, version: str) -> list[str]:
    validator = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(validator), "--strict", "--quiet", "-k", version, str(rendered)],
                          capture_output=True, text=True, timeout=300)
    lines = (done.stdout + done.stderr).splitlines()
    # Custom kinds have no built-in schema: check_custom_resources judges those.
    return [line for line in lines if "Couldn't find schema for kind" not in line] + (
        [f"kubernetes-validate exited {done.returncode}"] if done.returncode else [])


def check_overlay(overlay: Path, out_dir: Path, version: str = KUBERNETES_VERSION
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    text = render(overlay)
    rendered = out_dir / f"{overlay.name}.yaml"
    rendered.write_text(text)
    documents = [d for d in yaml.safe_load_all(text) if d]
    problems = check_built_in(rendered, version) + check_custom_resources(documents)
    return documents, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/k8s"),
                        help="where the rendered manifests are written")
    parser.add_argument("-k", "--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for overlay in sorted((K8S_DIR / "overlays").iterdir()):
        documents, problems = check_overlay(overlay, args.out, args.kubernetes_version)
        kinds = sorted({d["kind"] for d in documents})
        status = "FAIL" if problems else "ok"
        print(f"{overlay.name}: {len(documents)} objects ({', '.join(kinds)}) against "
              f"Kubernetes {args.kubernetes_version} + shipped CRDs: {status}")
        for problem in problems:
            print(f"  {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
