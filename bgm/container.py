"""The entry point of every bgm image (deploy/Dockerfile): one recipe for all five.

``python -m bgm.container`` runs the service that ``BGM_SERVICE`` names, listening on all
interfaces at its deployment port unless its own ``BGM_<S>_HOST``/``_PORT`` say otherwise;
``BGM_DEVICE`` (set by the GPU variants) becomes its ``BGM_<S>_DEVICE`` likewise, and
``BGM_TLS_CERT``/``_KEY``/``_CLIENT_CA`` and ``BGM_HEALTH_PORT`` its own
(deploy/k8s/components/tls). ``probe`` asks the health port when one is set.
``python -m bgm.container probe`` is the image's health check: exit 0 when the service
reports SERVING.
"""

from __future__ import annotations

import importlib
import os
import sys

from bgm import vocab

SHARED = ("DEVICE", "TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA", "HEALTH_PORT")
MODULES = {**{s.name: f"services.{s.name}.__main__" for s in vocab.BACKEND_SERVICES},
           vocab.GATEWAY.name: "gateway.server"}


def service() -> vocab.Service:
    name = os.environ.get("BGM_SERVICE", "")
    for candidate in vocab.SERVICES:
        if candidate.name == name:
            return candidate
    raise SystemExit(f"bgm: BGM_SERVICE={name!r} is not {vocab.choices(tuple(s.name for s in vocab.SERVICES))}")


def main(argv: list[str]) -> int:
    chosen = service()
    port = os.environ.get(f"{chosen.env_prefix}_PORT", str(chosen.port))
    if argv[:1] == ["probe"]:
        from bgm import probe

        health_port = os.environ.get(f"{chosen.env_prefix}_HEALTH_PORT") or os.environ.get("BGM_HEALTH_PORT")
        return probe.main(["--port", health_port or port, "--service", chosen.grpc_name])
    os.environ.setdefault(f"{chosen.env_prefix}_HOST", "0.0.0.0")
    os.environ.setdefault(f"{chosen.env_prefix}_PORT", port)
    # Image- or cluster-wide settings under one name (one manifest patch serves every
    # service) become the service's own; a service's own variable wins.
    shared = SHARED if chosen in vocab.BACKEND_SERVICES else tuple(n for n in SHARED if n != "DEVICE")
    for name in shared:
        value = os.environ.get(f"BGM_{name}", "")
        if value:
            os.environ.setdefault(f"{chosen.env_prefix}_{name}", value)
    importlib.import_module(MODULES[chosen.name]).main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
