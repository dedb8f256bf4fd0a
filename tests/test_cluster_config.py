"""cluster.yaml and cluster/fake_cluster.yaml against Ray's own cluster-config validation, plus the
properties the project promises: nothing but SSH open to the outside, token auth on every node,
MLflow on the head's private address, GPU workers scaled from zero, no secrets."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
NODE_TYPES = {"ray.head.default", "ray.worker.gpu", "ray.worker.gpu_spot"}


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def aws() -> dict:
    return load("cluster.yaml")


@pytest.fixture(scope="module")
def fake() -> dict:
    return load("cluster/fake_cluster.yaml")


def commands(cfg: dict, *keys: str) -> str:
    return "\n".join(c for k in keys for c in cfg.get(k, []))


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster/fake_cluster.yaml"])
def test_ray_schema_accepts(name):
    jsonschema.validate(load(name), SCHEMA)


def test_fake_config_passes_ray_validation(fake):
    # validate_config also checks min/max worker sums and the head type. (prepare_config cannot
    # run on it: the wheel lacks the fake provider's example.yaml defaults.)
    validate_config(copy.deepcopy(fake))
    bad = copy.deepcopy(fake)
    bad["available_node_types"]["ray.worker.gpu"]["min_workers"] = fake["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(bad)


def test_ray_schema_rejects_a_misspelt_key(aws):
    bad = copy.deepcopy(aws)
    bad["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        jsonschema.validate(bad, SCHEMA)


def test_aws_config_prepares_offline(aws):
    # fills provider defaults (AWS: no boto3 calls here) and re-validates
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["head_node_type"] == "ray.head.default"


def test_same_node_types_in_both(aws, fake):
    assert set(aws["available_node_types"]) == set(fake["available_node_types"]) == NODE_TYPES
    assert aws["head_node_type"] == fake["head_node_type"] == "ray.head.default"
    for name in NODE_TYPES - {"ray.head.default"}:
        a, f = aws["available_node_types"][name], fake["available_node_types"][name]
        assert a["min_workers"] == f["min_workers"] == 0
        assert a["resources"]["GPU"] == f["resources"]["GPU"] == 1
        assert a["resources"].get("accelerator_type:L40S") == 1
    assert fake["provider"]["type"] == "fake_multinode"
    assert re.fullmatch(r"[\d.]+:\d+", fake["provider"]["gcs_address"])


def test_gpu_workers_are_48gb_l40s_scaled_from_zero(aws):
    types = aws["available_node_types"]
    gpu, spot = types["ray.worker.gpu"], types["ray.worker.gpu_spot"]
    assert gpu["node_config"]["InstanceType"].startswith("g6e.")  # 1+ x L40S 48 GB
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert aws["max_workers"] >= gpu["max_workers"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in gpu["node_config"]
    assert types["ray.head.default"]["resources"].get("GPU", 0) == 0


def test_nothing_open_to_the_world_but_ssh(aws):
    sg = aws["provider"]["security_group"]
    for rule in sg.get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if "0.0.0.0/0" in ranges or "::/0" in ranges:
            assert rule.get("FromPort") == rule.get("ToPort") == 22, rule
    # no node type brings its own groups: all get Ray's group (intra-cluster + SSH) plus the above
    for name, node in aws["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], name
        assert "NetworkInterfaces" not in node["node_config"], name
    start = commands(aws, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in commands(aws, "setup_commands", "head_setup_commands",
                                      "head_start_ray_commands", "worker_start_ray_commands")


def test_token_auth_on_every_node(aws):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in aws[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "export RAY_AUTH_MODE=token" in commands(aws, "setup_commands")


def test_mlflow_on_the_head_private_address_supervised_on_postgresql(aws):
    setup = commands(aws, "head_setup_commands")
    # the systemd service of helix_sweep.sweep.head (tests/test_head.py runs its command line)
    install = next(c for c in aws["head_setup_commands"] if "helix_sweep.sweep.head install" in c)
    assert '--host "$(cat ~/.helix_head_ip)"' in install
    assert setup.index("hostname -I") < setup.index("helix_sweep.sweep.head install")
    assert "--shared /mnt/helix/mlflow" in install  # artifacts and backups survive a replaced head
    assert "[head]" in setup  # the PostgreSQL client
    assert "sudo systemctl restart helix-mlflow.service" in commands(aws, "head_start_ray_commands")
    assert "mlflow" not in commands(aws, "worker_start_ray_commands")
    assert "sqlite" not in commands(aws, "head_setup_commands", "head_start_ray_commands")


def test_workers_install_the_cuda_extra_and_mount_shared_storage(aws):
    assert "[cuda]" in commands(aws, "worker_setup_commands")
    assert "[cuda]" not in commands(aws, "head_setup_commands")
    assert "/mnt/helix" in commands(aws, "setup_commands")


def test_no_secrets():
    text = (ROOT / "cluster.yaml").read_text() + (ROOT / "cluster/fake_cluster.yaml").read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"BEGIN [A-Z ]*PRIVATE KEY",
                    r"(?i)password\s*[:=]\s*\S+", r"RAY_AUTH_TOKEN="):
        assert not re.search(pattern, text), pattern
