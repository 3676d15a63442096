"""The multi-node training Job (deploy/kubernetes/training/) checked offline like the
serving manifests: against the Kubernetes JSON schemas, then its cross-references (the
rendezvous DNS name, ports, ConfigMap keys, volumes) and its command line, parsed by
torchrun's own parser and by `trainer train`, whose config is loaded and validated."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from .conftest import DEPLOY, manifest_documents

TRAINING = DEPLOY / "kubernetes" / "training"
SERVING_PVC = DEPLOY / "kubernetes" / "pvc.yaml"


def documents() -> dict[tuple[str, str], dict]:
    return manifest_documents(TRAINING)


def _job_parts():
    docs = documents()
    job = docs[("Job", "switchboard-train")]
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = docs[("ConfigMap", "switchboard-train-config")]["data"]
    return docs, job, pod, container, config


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_training_manifests_match_the_schemas(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = documents()
    assert {kind for kind, _ in docs} == {"ConfigMap", "Service", "Job"}
    for (kind, name), doc in docs.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{kind}/{name} (Kubernetes {version}): {path}: {e.message}")
    bad = json.loads(json.dumps(docs[("Job", "switchboard-train")]))
    bad["spec"]["completionMode"] = ["Indexed"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_training_objects_refer_to_each_other():
    docs, job, pod, container, config = _job_parts()
    kustomization = yaml.safe_load((TRAINING / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {
        p.name for p in TRAINING.glob("*.yaml") if p.name != "kustomization.yaml"}
    # one pod per node, all at once, each with a stable DNS name under the headless Service
    nnodes = int(config["NNODES"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    service = docs[("Service", pod["spec"]["subdomain"])]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # reachable before ready
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port = int(config["MASTER_PORT"])
    assert {p["containerPort"] for p in container["ports"]} == {port}
    assert {p["port"] for p in service["spec"]["ports"]} == {port}
    # every configMapKeyRef and the mounted config exist
    for env in container["env"]:
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["name"] == "switchboard-train-config" and ref["key"] in config
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert [i["key"] for i in volumes["config"]["configMap"]["items"]] == ["train.yaml"]
    # the artifact goes to the volume the servers read, which must allow a writer and readers
    pvc = yaml.safe_load(SERVING_PVC.read_text())
    assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert not mounts["adapters"].get("readOnly", False)
    # the node rank is the completion index
    (rank,) = [e for e in container["env"] if e["name"] == "NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")


def _expanded_args(container, config, node_rank: str) -> list[str]:
    env = {e["name"]: e.get("value") for e in container["env"]}
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            env[e["name"]] = config[ref["key"]]
    env["NODE_RANK"] = node_rank
    out = []
    for arg in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert env.get(var) is not None, f"{arg}: {var} is not set in the container"
            arg = arg.replace(f"$({var})", env[var])
        out.append(arg)
    return out


def test_the_command_is_torchrun_running_a_valid_fsdp_training(tmp_path):
    from torch.distributed.run import get_args_parser

    from trainer.cli import _parser
    from trainer.config import load_config

    _, job, pod, container, config = _job_parts()
    assert container["command"] == ["python", "-m", "torch.distributed.run"]
    ns = get_args_parser().parse_args(_expanded_args(container, config, node_rank="1"))
    assert ns.nnodes == config["NNODES"] and ns.node_rank == 1
    assert ns.nproc_per_node == config["NPROC_PER_NODE"]
    assert ns.master_addr == f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}"
    assert ns.master_port == int(config["MASTER_PORT"])
    assert ns.module and ns.training_script == "trainer.cli"
    train_args = _parser().parse_args(ns.training_script_args)
    assert train_args.command == "train" and not train_args.overrides
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert train_args.config == f"{mounts['config']}/train.yaml"
    path = tmp_path / "train.yaml"
    path.write_text(config["train.yaml"])
    cfg = load_config(path)  # the config the pods will run, validated
    assert cfg.parallelism == "fsdp" and cfg.method in ("lora", "full")
    assert cfg.output_dir.startswith(mounts["adapters"] + "/")
    assert cfg.run_dir.startswith(mounts["runs"] + "/")
