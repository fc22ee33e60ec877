"""What `lmforge status` says of security: is anything serving openly?

Two sources, each the authority on its part: the supervisor's state file says
how NATS runs (`tls+credentials`, or `open` under `--open-nats`), and each gateway
replica's /metrics says whether it requires API keys (`lmforge_gateway_auth_required`,
1 once any key exists) and serves TLS (`lmforge_gateway_tls`). A replica that does
not answer is "unknown", never taken for secured.
"""

from __future__ import annotations

from typing import Any

AUTH_GAUGE = "lmforge_gateway_auth_required"
TLS_GAUGE = "lmforge_gateway_tls"


def security_status(nats_state: dict[str, Any], replicas: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """{"nats": ..., "gateway_api_keys": ..., "gateway_tls": ..., "open": [why, ...]}:
    each part "on", "off" or "unknown"; `open` names every part that is off, with how to
    close it (empty when nothing is known to be open)."""
    nats = {"tls+credentials": "on", "open": "off"}.get(nats_state.get("security", ""),
                                                        "unknown")
    keys = _replicas_agree(replicas, "auth_required")
    tls = _replicas_agree(replicas, "tls")
    reasons = []
    if nats == "off":
        reasons.append("NATS runs without credentials or TLS (--open-nats): any local "
                       "process may publish any event")
    if keys == "off":
        reasons.append("the gateway serves without API keys (`lmforge keys create --tenant T`)")
    if tls == "off":
        reasons.append("the gateway serves without TLS (LMFORGE_GATEWAY_TLS_CERT/_KEY)")
    for part, value in (("API keys", keys), ("TLS", tls)):
        if value == "mixed":
            reasons.append(f"some gateway replicas serve without {part}")
    return {"nats": nats, "gateway_api_keys": keys, "gateway_tls": tls, "open": reasons}


def _replicas_agree(replicas: list[dict[str, Any]], key: str) -> str:
    """"on"/"off" when every replica answered the same; "mixed"; "unknown" otherwise."""
    values = {r.get(key) for r in replicas}
    if not replicas or None in values:
        return "unknown"
    if values == {True}:
        return "on"
    if values == {False}:
        return "off"
    return "mixed"
