"""The Kubernetes API client, configured the way every lmforge component needs it.

In a pod: its service account (and its namespace). Elsewhere: the kubeconfig
(KUBECONFIG or ~/.kube/config), for running a service against a cluster from a
workstation. Imported only by components that talk to Kubernetes, so the
`kubernetes` package stays optional for everything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubernetes_api_client(needed_by: str) -> ApiClient:
    """A client for this pod's cluster or the kubeconfig's; `needed_by` names the
    setting that asked for one, for the error when there is neither."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the client's default was fixed when it was imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as exc:
            raise RuntimeError(
                f"{needed_by} needs a cluster: run in a pod with a service account, or set "
                f"KUBECONFIG ({exc})") from None
    return client.ApiClient()


def pod_namespace(setting: str) -> str:
    """This pod's namespace; outside a pod, `setting` must name one."""
    if POD_NAMESPACE_FILE.is_file():
        return POD_NAMESPACE_FILE.read_text().strip()
    raise ValueError(f"{setting} is empty and this is not a pod ({POD_NAMESPACE_FILE} is "
                     "missing): name the namespace")
