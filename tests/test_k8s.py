"""Static checks of the Kubernetes manifests under deploy/k8s (docs/kubernetes.md).

No cluster: every kustomization is rendered once with `kubectl kustomize`, each built-in resource
is validated against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields are
errors) at a pinned version, KEDA's resources against a schema written here from KEDA's CRDs, and
everything is held against the code it runs, as tests/test_compose.py does for compose: the
commands are real CLI commands, every CVOPT_* name a Settings field, the settings valid for
production, the probes real routes, the queues the ones the workers consume and KEDA watches.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from core.settings import GPU_KIND_PATTERN, Settings
from core.workers import CPU_QUEUE, GPU_QUEUE, gpu_kind_from_name, gpu_queue, is_gpu_queue
from tests.test_compose import API_DOCKERFILE, COMPOSE_FILE, WORKER_DOCKERFILE, interpolate_tree, settings_field

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.relative_to(K8S).as_posix() for p in (K8S / "overlays").glob("*/kustomization.yaml"))
EXAMPLE_SECRETS = K8S / "overlays" / "example" / "secrets.env.example"
DOCS = ROOT / "docs" / "kubernetes.md"

# The oldest Kubernetes minor release the manifests are meant for; every field they use exists there.
KUBERNETES_VERSION = "1.30.0"
TEST_SECRET_KEY = "k" * 40  # long enough for production settings, and no placeholder
UPGRADE_LABEL = ("cvopt.io/upgrade-step", "migrate")
# What the Dockerfiles' build lines (and docker-compose.yml's `image:`) call the built images.
IMAGES = {
    "api": "cvopt-api",
    "migrate": "cvopt-api",
    "worker-cpu": "cvopt-worker-cpu",
    "worker-gpu": "cvopt-worker-gpu",
}
# Names besides CVOPT_* settings that the pods' environment or the Secret may hold.
OTHER_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "KEDA_REDIS_ADDRESS",
    "KEDA_REDIS_PASSWORD",
}
# A GPU worker scaled to zero needs a node, an image pull and a start before it takes a job:
# CVOPT_NO_WORKER_TIMEOUT_SECONDS must leave at least this long, or the job fails with no_worker.
COLD_START_BUDGET_S = 900


def _kustomizations() -> list[str]:
    """Every kustomization that builds on its own (Components are built into the overlays)."""
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":
            dirs.append(path.parent.relative_to(K8S).as_posix())
    return dirs


KUSTOMIZATIONS = _kustomizations()


# -- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is not on PATH: tests/test_k8s.py renders deploy/k8s with `kubectl kustomize` "
            "(kubectl >= 1.27, kustomize v5). Install kubectl, e.g. from the Kubernetes apt repository."
        )
    return found


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    """Each kustomization's resources, rendered once for the whole module."""
    out = {}
    for rel in KUSTOMIZATIONS:
        result = subprocess.run([kubectl, "kustomize", str(K8S / rel)], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            pytest.fail(f"kubectl kustomize deploy/k8s/{rel} failed:\n{result.stderr}")
        out[rel] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


@pytest.fixture(scope="module")
def overlays(rendered) -> dict[str, list[dict]]:
    assert OVERLAYS, "no overlay under deploy/k8s/overlays"
    return {rel: rendered[rel] for rel in OVERLAYS}


@pytest.fixture(scope="module")
def example_secret() -> dict[str, str]:
    """The Secret cvopt-secrets as the example file would make it (kubectl --from-env-file)."""
    values = {}
    for line in EXAMPLE_SECRETS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


@pytest.fixture(scope="module")
def filled_secret(example_secret) -> dict[str, str]:
    """The example with a real-looking secret key: what an operator's filled-in file looks like."""
    return {**example_secret, "CVOPT_SECRET_KEY": TEST_SECRET_KEY}


# -- helpers ---------------------------------------------------------------------------------


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def main_container(workload: dict) -> dict:
    (container,) = pod_spec(workload)["containers"]
    return container


def worker_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in of_kind(docs, "Deployment") if component(d).startswith("worker-")]


def gpu_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in of_kind(docs, "Deployment") if component(d) == "worker-gpu"]


def program(container: dict) -> list[str]:
    """What the container runs: command + args (args alone keep the image's entrypoint)."""
    return list(container.get("command", [])) + list(container.get("args", []))


def literal_env(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "valueFrom" not in item, f"{item['name']}: only literal values here; secrets come by envFrom"
        env[item["name"]] = item["value"]
    return env


def container_env(docs: list[dict], container: dict, secret: dict[str, str]) -> dict[str, str]:
    """The environment the container starts with: envFrom in order, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            assert source["secretRef"]["name"] == "cvopt-secrets", source
            env.update(secret)
    env.update(literal_env(container))
    return env


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.startswith("CVOPT_"):
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return Settings()


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_FACTORS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def quantity(value) -> float:
    """A Kubernetes resource quantity ("500m", "8Gi", 2) as a number (cores or bytes)."""
    m = _QUANTITY.match(str(value))
    assert m, f"cannot read the quantity {value!r}"
    return float(m.group(1)) * _FACTORS[m.group(2)]


def cli_params(args: list[str]) -> tuple[str, dict]:
    """Parses a `cvopt ...` line with the real click command (nothing runs): its name and options."""
    from cvopt.cli import main

    assert args[0] == "cvopt", args
    name = args[1]
    assert name in main.commands, f"cvopt has no command {name!r}"
    return name, main.commands[name].make_context(name, list(args[2:])).params


def consumed_queues(args: list[str], env: dict[str, str]) -> set[str]:
    """The queues `cvopt worker --queues ...` consumes on a node with a GPU of CVOPT_GPU_KIND (cvopt.cli.worker)."""
    name, params = cli_params(args)
    assert name == "worker"
    names = [q.strip() for q in params["queues"].split(",") if q.strip()]
    for q in names:
        assert q in (CPU_QUEUE, GPU_QUEUE) or (is_gpu_queue(q) and re.match(GPU_KIND_PATTERN, q.split(".", 1)[1])), q
    if any(is_gpu_queue(q) for q in names):
        names += [GPU_QUEUE, gpu_queue(env["CVOPT_GPU_KIND"])]
    return set(names)


def scaled_object_for(docs: list[dict], deployment: dict) -> dict:
    name = deployment["metadata"]["name"]
    matches = [s for s in of_kind(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]
    assert len(matches) == 1, f"{name}: {len(matches)} ScaledObjects scale it"
    return matches[0]


def image_name(image: str) -> tuple[str, str]:
    """registry.example.com/cvopt/cvopt-api:0.1.0 -> (cvopt-api, 0.1.0)."""
    path, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return path.rsplit("/", 1)[-1], tag


# -- every kustomization renders and validates ---------------------------------------------------


def test_every_kustomization_renders_distinct_resources(rendered):
    assert {"base", "gpu-worker", *OVERLAYS} <= set(rendered)
    for rel, docs in rendered.items():
        assert docs, f"{rel} renders nothing"
        ids = [(d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
        assert len(ids) == len(set(ids)), f"{rel}: duplicate resources"


def test_builtin_resources_validate_strictly_against_the_kubernetes_schemas(rendered):
    kinds = set()
    errors = []
    for rel, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                continue  # no schema in kubernetes-validate: see the KEDA tests below
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(
                    f"{rel}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{rel}: {e.message}")
            kinds.add(doc["kind"])
    assert not errors, "\n".join(errors)
    assert {"Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap", "Namespace"} <= kinds


def test_the_schema_validation_refuses_unknown_fields_and_wrong_types(rendered):
    # What the test above relies on: strict mode at this version catches a misspelt field.
    api = named(rendered["base"], "Deployment", "cvopt-api")
    kubernetes_validate.validate(api, KUBERNETES_VERSION, strict=True)
    misspelt = copy.deepcopy(api)
    main_container(misspelt)["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(api)
    main_container(wrong_type)["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_no_secret_is_rendered_or_generated(rendered, example_secret):
    # The Secret is the operator's (kubectl create secret ... --from-env-file); nothing here makes one.
    for rel, docs in rendered.items():
        assert not of_kind(docs, "Secret"), f"{rel} renders a Secret"
    for path in K8S.rglob("kustomization.yaml"):
        assert "secretGenerator" not in yaml.safe_load(path.read_text()), path
    # Every credential in the example is a visible placeholder.
    for key in ("CVOPT_SECRET_KEY", "KEDA_REDIS_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert example_secret[key].startswith("change-me"), key
    for key in ("CVOPT_DATABASE_URL", "CVOPT_BROKER_URL"):
        assert unquote(urlparse(example_secret[key]).password or "") == "change-me", key


# -- KEDA: a schema from its CRDs ----------------------------------------------------------------
#
# kubernetes-validate has no schema for KEDA's custom resources. These are written from KEDA's
# CRDs (config/crd/bases/keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml,
# v2.20), narrowed to what this deployment may use: unknown fields are errors, as in the strict
# Kubernetes schemas; the redis trigger's metadata keys are the ones KEDA's redis scaler reads
# (pkg/scalers/redis_scaler.go), less the connection ones, which must come from the
# TriggerAuthentication (a literal password in a ScaledObject would be a committed secret).

_INT = {"type": "integer"}
_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {**_INT, "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "tolerance": {"type": ["string", "integer"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {**_INT, "minimum": 1},
                    "periodSeconds": {**_INT, "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
_REDIS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["listName", "listLength"],
    "properties": {
        "listName": {"type": "string", "minLength": 1},
        "listLength": {"type": "string", "pattern": r"^[1-9][0-9]*$"},
        "activationListLength": {"type": "string", "pattern": r"^[0-9]+$"},
        "databaseIndex": {"type": "string", "pattern": r"^[0-9]+$"},
        "enableTLS": {"enum": ["true", "false"]},
        "unsafeSsl": {"enum": ["true", "false"]},
    },
}
_TRIGGER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "metadata", "authenticationRef"],
    "properties": {
        "type": {"const": "redis"},
        "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},  # a formula variable
        "metadata": _REDIS_METADATA,
        "authenticationRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
        },
        "metricType": {"enum": ["AverageValue", "Value"]},
        "useCachedMetrics": {"type": "boolean"},
    },
}


def _keda_resource(kind: str, spec: dict) -> dict:
    """A keda.sh/v1alpha1 object of this kind: apiVersion, kind, metadata with a name, and spec;
    nothing else."""
    metadata = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
    }


SCALED_OBJECT_SCHEMA = _keda_resource(
    "ScaledObject",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string", "minLength": 1},
                    "envSourceContainerName": {"type": "string"},
                },
            },
            "pollingInterval": {**_INT, "minimum": 1},
            "cooldownPeriod": {**_INT, "minimum": 0},
            "initialCooldownPeriod": {**_INT, "minimum": 0},
            "idleReplicaCount": {**_INT, "minimum": 0},
            "minReplicaCount": {**_INT, "minimum": 0},
            "maxReplicaCount": {**_INT, "minimum": 1},
            "fallback": {
                "type": "object",
                "required": ["failureThreshold", "replicas"],
                "properties": {"failureThreshold": {**_INT, "minimum": 0}, "replicas": {**_INT, "minimum": 0}},
            },
            "advanced": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "behavior": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"scaleUp": _SCALING_RULES, "scaleDown": _SCALING_RULES},
                            },
                        },
                    },
                    "scalingModifiers": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["formula", "target"],  # KEDA's webhook: a formula needs a target
                        "properties": {
                            "formula": {"type": "string", "minLength": 1},
                            "target": {"type": "string", "pattern": r"^[0-9]*\.?[0-9]+$"},
                            "activationTarget": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value"]},
                        },
                    },
                },
            },
            "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
        },
    },
)
# The connection parameters KEDA's redis scaler takes from a TriggerAuthentication (authParams).
REDIS_AUTH_PARAMETERS = ["address", "addresses", "host", "hosts", "port", "ports", "username", "password", "tls"]
TRIGGER_AUTHENTICATION_SCHEMA = _keda_resource(
    "TriggerAuthentication",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["secretTargetRef"],
        "properties": {
            "secretTargetRef": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["parameter", "name", "key"],
                    "properties": {
                        "parameter": {"enum": REDIS_AUTH_PARAMETERS},
                        "name": {"type": "string", "minLength": 1},
                        "key": {"type": "string", "minLength": 1},
                    },
                },
            }
        },
    },
)
KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT_SCHEMA, "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA}


def keda_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(KEDA_SCHEMAS[doc["kind"]])
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_keda_resources_match_the_schema_from_keda_crds(rendered):
    seen = set()
    for rel, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                assert doc["kind"] in KEDA_SCHEMAS, f"{rel}: no schema for {doc['kind']}"
                errors = keda_errors(doc)
                assert not errors, f"{rel}: {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)
                seen.add(doc["kind"])
    assert seen == {"ScaledObject", "TriggerAuthentication"}


def test_the_keda_schema_refuses_unknown_fields_and_bad_values(overlays):
    scaled = of_kind(next(iter(overlays.values())), "ScaledObject")[0]
    assert not keda_errors(scaled)
    for mutate in (
        lambda s: s["spec"].update(minReplicas=1),  # HPA's name, not KEDA's
        lambda s: s["spec"]["triggers"][0]["metadata"].update(listname="cpu"),
        lambda s: s["spec"]["triggers"][0]["metadata"].update(password="hunter2"),
        lambda s: s["spec"]["triggers"][0]["metadata"].update(listLength=1),  # metadata values are strings
        lambda s: s["spec"].update(maxReplicaCount=0),
    ):
        bad = copy.deepcopy(scaled)
        mutate(bad)
        assert keda_errors(bad), bad["spec"]


def test_keda_references_resolve_within_each_overlay(overlays):
    for rel, docs in overlays.items():
        deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
        auths = {d["metadata"]["name"]: d for d in of_kind(docs, "TriggerAuthentication")}
        for scaled in of_kind(docs, "ScaledObject"):
            target = scaled["spec"]["scaleTargetRef"]
            assert (target.get("kind", "Deployment"), target["name"]) in {("Deployment", n) for n in deployments}, rel
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["authenticationRef"]["name"] in auths, f"{rel}: {trigger}"
            formula = scaled["spec"].get("advanced", {}).get("scalingModifiers", {}).get("formula")
            if formula:
                names = {t["name"] for t in scaled["spec"]["triggers"]}
                assert set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", formula)) == names, f"{rel}: {formula!r} vs {names}"


# -- the settings ----------------------------------------------------------------------------


def test_every_environment_name_is_a_settings_field_or_a_known_other(rendered, example_secret):
    fields = set(Settings.model_fields)
    names = set(example_secret)
    for docs in rendered.values():
        for config in of_kind(docs, "ConfigMap"):
            names |= set(config["data"])
        for workload in workloads(docs):
            for container in containers(workload):
                names |= set(literal_env(container))
    cvopt = {n for n in names if n.startswith("CVOPT_")}
    for name in cvopt:
        assert settings_field(name) in fields, f"{name} is not a field of core.settings.Settings"
    assert names - cvopt <= OTHER_ENV, sorted(names - cvopt - OTHER_ENV)
    assert {"CVOPT_ENV", "CVOPT_DATABASE_URL", "CVOPT_BROKER_URL", "CVOPT_STORAGE_URL", "CVOPT_SECRET_KEY"} <= cvopt


def test_configmap_and_example_secret_give_valid_production_settings(rendered, filled_secret, monkeypatch):
    checked = 0
    for rel, docs in rendered.items():
        for workload in workloads(docs):
            if not of_kind(docs, "ConfigMap"):
                continue  # a GPU kind's own kustomization: checked inside its overlay
            container = main_container(workload)
            settings = settings_from(container_env(docs, container, filled_secret), monkeypatch)
            where = f"{rel}: {workload['metadata']['name']}"
            assert settings.env == "production", where
            assert make_url(settings.database_url).drivername == "postgresql+psycopg", where
            assert urlparse(settings.broker_url).scheme in ("redis", "rediss"), where
            assert urlparse(settings.storage_url).scheme == "s3" and urlparse(settings.storage_url).netloc, where
            for url in (settings.s3_endpoint_url, settings.s3_public_endpoint_url):
                assert url is None or urlparse(url).scheme in ("http", "https"), where
            if settings.public_url:
                assert urlparse(settings.public_url).scheme == "https", where
            checked += 1
    assert checked >= 3 * (1 + len(OVERLAYS))  # API, migration and CPU worker in the base and each overlay


def test_the_example_secret_as_it_stands_is_refused(overlays, example_secret, monkeypatch):
    # Deployed unedited, the services refuse to start instead of running on a placeholder key.
    docs = next(iter(overlays.values()))
    env = container_env(docs, main_container(named(docs, "Deployment", "cvopt-api")), example_secret)
    with pytest.raises(ValidationError, match="CVOPT_SECRET_KEY"):
        settings_from(env, monkeypatch)


def test_data_dir_is_a_writable_empty_dir_in_every_container(rendered, filled_secret, monkeypatch):
    dockerfile_dirs = set(
        re.findall(r"CVOPT_DATA_DIR=(\S+)", API_DOCKERFILE.read_text() + WORKER_DOCKERFILE.read_text())
    )
    for rel, docs in rendered.items():
        for workload in workloads(docs):
            container = main_container(workload)
            env = container_env(docs, container, filled_secret) if of_kind(docs, "ConfigMap") else {}
            data_dir = env.get("CVOPT_DATA_DIR") or next(iter(dockerfile_dirs))
            assert {data_dir} == dockerfile_dirs, "the manifests and the images disagree on CVOPT_DATA_DIR"
            volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            where = f"{rel}: {workload['metadata']['name']}"
            assert data_dir in mounts and "emptyDir" in mounts[data_dir], where
            if container["securityContext"].get("readOnlyRootFilesystem"):
                assert "/tmp" in mounts and "emptyDir" in mounts["/tmp"], where


# -- commands, probes, routes --------------------------------------------------------------------


def compose_commands() -> dict[str, list[str]]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {name: list(services[name]["command"]) for name in ("api", "migrate", "worker-cpu", "worker-gpu")}


def test_every_cvopt_command_is_a_real_cli_command(rendered):
    parsed = 0
    for rel, docs in rendered.items():
        for workload in workloads(docs):
            for container in containers(workload):
                args = program(container)
                assert args and args[0] == "cvopt", f"{rel}: {workload['metadata']['name']} runs {args}"
                cli_params(args)  # raises on an unknown command or option
                parsed += 1
    assert parsed >= 4


def test_each_workload_runs_what_compose_runs(overlays):
    compose = compose_commands()
    for rel, docs in overlays.items():
        for workload in workloads(docs):
            args = program(main_container(workload))
            assert args == compose[component(workload)], f"{rel}: {workload['metadata']['name']}"
            # args only: like compose's `command`, the image's ENTRYPOINT stays (NVIDIA's set-up).
            assert "command" not in main_container(workload)


def test_api_serves_on_the_probed_port_without_an_embedded_worker(rendered):
    for rel, docs in rendered.items():
        for api in [d for d in of_kind(docs, "Deployment") if component(d) == "api"]:
            container = main_container(api)
            _, params = cli_params(program(container))
            assert params["with_worker"] is False and params["host"] == "0.0.0.0", rel
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["http"] == params["port"], rel
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert container[probe]["httpGet"]["port"] in ("http", params["port"]), f"{rel}: {probe}"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", rel
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", rel
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz", rel


def test_the_probed_paths_are_routes_of_the_api():
    from starlette.routing import Match

    from api.main import app

    def served(path: str) -> bool:
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "query_string": b"", "headers": []}
        return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)

    assert served("/readyz") and served("/healthz")
    assert not served("/no-such-probe")  # the check can fail


def test_service_and_disruption_budget_select_the_api_pods(rendered):
    for rel, docs in rendered.items():
        for api in [d for d in of_kind(docs, "Deployment") if component(d) == "api"]:
            labels = api["spec"]["template"]["metadata"]["labels"]
            assert api["spec"]["replicas"] >= 2, rel
            service = named(docs, "Service", api["metadata"]["name"])
            assert service["spec"]["selector"].items() <= labels.items(), rel
            port_names = {p["name"] for p in main_container(api)["ports"]}
            assert all(p["targetPort"] in port_names for p in service["spec"]["ports"]), rel
            budget = named(docs, "PodDisruptionBudget", api["metadata"]["name"])
            assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items(), rel
            # A budget as large as the replicas would block every node drain.
            assert 1 <= budget["spec"]["minAvailable"] < api["spec"]["replicas"], rel


def test_worker_liveness_pings_its_own_celery_node(rendered):
    for rel, docs in rendered.items():
        for worker in worker_deployments(docs):
            command = main_container(worker)["livenessProbe"]["exec"]["command"]
            # Exec probes run no shell: sh expands $HOSTNAME, the pod's name and Celery's node name.
            assert command[:2] == ["sh", "-c"], rel
            assert "celery -A worker.celery_app inspect ping" in command[2], rel
            assert "-d celery@$HOSTNAME" in command[2], rel


# -- workers, queues, autoscaling ----------------------------------------------------------------


def test_celery_keeps_each_queue_in_a_redis_list_named_after_it():
    """What the redis triggers rely on: core/queue.py publishes without a priority and without a
    key prefix, so kombu's Redis transport pushes to the list named after the queue (a priority
    would add lists "<queue>\\x06\\x16<n>"), and delivered messages wait in its "unacked" hash."""
    from kombu.transport.redis import Channel

    from core.queue import enqueue_job, make_celery

    celery = make_celery(Settings(broker_url="redis://redis.invalid:6379/0"))
    assert set(celery.conf.broker_transport_options) == {"visibility_timeout"}  # no global_keyprefix
    assert celery.conf.task_default_priority is None

    class Recorder:
        calls: list = []

        def send_task(self, name, **kwargs):
            self.calls.append(kwargs)

    enqueue_job("job-1", "gpu.h100", celery=Recorder())
    assert Recorder.calls == [{"args": ["job-1"], "queue": "gpu.h100", "routing_key": "gpu.h100"}]

    channel = Channel.__new__(Channel)  # its class attributes only: no connection
    priority = channel._get_message_priority({"properties": {}}, reverse=False)
    assert channel._q_for_pri("gpu.h100", priority) == "gpu.h100"
    assert channel._q_for_pri("cpu", 9) != "cpu"  # a priority would have moved it
    assert Channel.unacked_key == "unacked"


def test_keda_triggers_watch_the_queues_each_worker_consumes(overlays, filled_secret):
    for rel, docs in overlays.items():
        for worker in worker_deployments(docs):
            container = main_container(worker)
            queues = consumed_queues(program(container), container_env(docs, container, filled_secret))
            scaled = scaled_object_for(docs, worker)
            lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"]}
            where = f"{rel}: {worker['metadata']['name']}"
            if component(worker) == "worker-cpu":
                # Waiting jobs plus running ones (the unacked hash; see the ScaledObject's comment).
                assert queues == {CPU_QUEUE} and lists == {CPU_QUEUE, "unacked"}, where
            else:
                # Running jobs are not counted: the unacked hash also holds CPU jobs, which would
                # keep GPU nodes from scaling to zero.
                assert lists == queues and len(queues) == 2, where


def test_each_worker_scales_by_its_concurrency_within_bounds(overlays, filled_secret, monkeypatch):
    for rel, docs in overlays.items():
        for worker in worker_deployments(docs):
            where = f"{rel}: {worker['metadata']['name']}"
            assert "replicas" not in worker["spec"], f"{where}: the ScaledObject owns the replica count"
            container = main_container(worker)
            settings = settings_from(container_env(docs, container, filled_secret), monkeypatch)
            spec = scaled_object_for(docs, worker)["spec"]
            assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], where
            target = spec["advanced"]["scalingModifiers"]["target"]
            assert float(target) == settings.worker_concurrency, f"{where}: one replica per concurrency-worth of jobs"
            assert all(t["metadata"]["listLength"] == target for t in spec["triggers"]), where
            if component(worker) == "worker-cpu":
                assert spec["minReplicaCount"] >= 1, f"{where}: workers run the reaper and the webhooks"
            elif spec["minReplicaCount"] == 0:
                assert settings.no_worker_timeout_seconds >= COLD_START_BUDGET_S, where
            # Scaling down stops a worker mid-job: it must have time to finish (warm shutdown).
            assert pod_spec(worker)["terminationGracePeriodSeconds"] >= 1800, where


def test_the_broker_address_keda_uses_is_the_brokers(overlays, filled_secret):
    broker = urlparse(filled_secret["CVOPT_BROKER_URL"])
    assert filled_secret["KEDA_REDIS_ADDRESS"] == f"{broker.hostname}:{broker.port or 6379}"
    assert filled_secret["KEDA_REDIS_PASSWORD"] == unquote(broker.password or "")
    database = broker.path.strip("/") or "0"
    for rel, docs in overlays.items():
        (auth,) = of_kind(docs, "TriggerAuthentication")
        refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        assert {r["name"] for r in refs.values()} == {"cvopt-secrets"}, rel
        assert refs["address"]["key"] == "KEDA_REDIS_ADDRESS" and refs["password"]["key"] == "KEDA_REDIS_PASSWORD"
        for scaled in of_kind(docs, "ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["metadata"].get("databaseIndex", "0") == database, rel
                tls = trigger["metadata"].get("enableTLS", "false") == "true"
                assert tls == (broker.scheme == "rediss"), rel


def test_workers_fit_their_steps_in_the_container(rendered, filled_secret, monkeypatch):
    """The step memory limit (RLIMIT_DATA per job) and the threads fit the container's limits,
    so a step that grows fails with out_of_memory instead of the pod being OOM-killed."""
    for rel, docs in rendered.items():
        for worker in worker_deployments(docs):
            container = main_container(worker)
            env = literal_env(container)
            settings = settings_from({k: v for k, v in env.items() if k != "CVOPT_GPU_KIND"}, monkeypatch)
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert {k: quantity(v) for k, v in limits.items()} == {k: quantity(v) for k, v in requests.items()}, rel
            volumes = {v["name"]: v["emptyDir"] for v in pod_spec(worker)["volumes"]}
            shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm and volumes[shm[0]["name"]].get("medium") == "Memory", f"{rel}: torch needs a real /dev/shm"
            shm_bytes = quantity(volumes[shm[0]["name"]]["sizeLimit"])
            assert settings.step_memory_limit_mb is not None, f"{rel}: the default reads the node's memory"
            steps = settings.step_memory_limit_mb * 2**20 * settings.worker_concurrency
            assert steps + shm_bytes <= 0.9 * quantity(limits["memory"]), rel
            assert settings.benchmark_threads * settings.worker_concurrency <= quantity(limits["cpu"]), rel


def test_gpu_workers_take_one_gpu_of_their_kind(overlays, filled_secret, monkeypatch):
    kinds = []
    for rel, docs in overlays.items():
        for worker in gpu_deployments(docs):
            where = f"{rel}: {worker['metadata']['name']}"
            spec, container = pod_spec(worker), main_container(worker)
            assert quantity(container["resources"]["limits"]["nvidia.com/gpu"]) == 1, where
            product = spec["nodeSelector"]["nvidia.com/gpu.product"]
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]), where
            settings = settings_from(container_env(docs, container, filled_secret), monkeypatch)
            # The kind the worker would derive from its GPU's name is the one it is told.
            assert settings.gpu_kind == gpu_kind_from_name(product), f"{where}: {product}"
            assert settings.worker_concurrency == 1, f"{where}: one job per GPU (undisturbed timings)"
            assert worker["metadata"]["name"].endswith("-" + settings.gpu_kind), where
            assert worker["spec"]["selector"]["matchLabels"]["cvopt.io/gpu-kind"] == settings.gpu_kind, where
            kinds.append((rel, settings.gpu_kind))
    assert kinds, "no overlay has a GPU worker"
    assert len(kinds) == len(set(kinds)), "two Deployments for one GPU kind"


def test_an_unpatched_gpu_kind_is_refused_by_the_settings(rendered, monkeypatch):
    # The gpu-worker base's placeholder kind makes a kind left unpatched fail at start-up.
    (worker,) = of_kind(rendered["gpu-worker"], "Deployment")
    env = literal_env(main_container(worker))
    with pytest.raises(ValidationError, match="gpu_kind"):
        settings_from(env, monkeypatch)


# -- security, images, upgrades ------------------------------------------------------------------


def dockerfile_uids() -> set[int]:
    text = API_DOCKERFILE.read_text() + WORKER_DOCKERFILE.read_text()
    return {int(uid) for uid in re.findall(r"useradd [^\n]*--uid (\d+)[^\n]*--user-group", text)}


def test_pods_run_as_the_images_user_without_privileges(rendered):
    uids = dockerfile_uids()
    assert len(uids) == 1, f"the images' users differ: {uids}"
    (uid,) = uids  # --user-group: the group has the user's number
    for rel, docs in rendered.items():
        for workload in workloads(docs):
            where = f"{rel}: {workload['metadata']['name']}"
            pod = pod_spec(workload)
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == uid, where
            assert pod["automountServiceAccountToken"] is False, where
            for container in containers(workload):
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
                assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where


def test_images_are_the_built_images_with_a_release_tag(overlays):
    for rel, docs in overlays.items():
        for workload in workloads(docs):
            name, tag = image_name(main_container(workload)["image"])
            assert name == IMAGES[component(workload)], f"{rel}: {workload['metadata']['name']}"
            assert tag and tag != "latest", f"{rel}: pin a release"
    # The names the images are built with: the Dockerfiles' build lines, and compose's `image:`.
    built = set(re.findall(r"docker build [^\n]*-t (\S+)", API_DOCKERFILE.read_text() + WORKER_DOCKERFILE.read_text()))
    assert set(IMAGES.values()) <= built, built
    services = interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text())["services"], {"CVOPT_SECRET_KEY": "x"})
    for service, expected in IMAGES.items():
        if "image" in services[service]:
            assert image_name(services[service]["image"])[0] == expected, service


def test_the_migration_runs_in_the_api_image_before_the_upgrade(overlays):
    docs_text = DOCS.read_text()
    key, value = UPGRADE_LABEL
    for rel, docs in overlays.items():
        (job,) = of_kind(docs, "Job")
        api = named(docs, "Deployment", "cvopt-api")
        assert main_container(job)["image"] == main_container(api)["image"], rel
        assert cli_params(program(main_container(job)))[0] == "migrate", rel
        assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure"), rel
        # `kubectl apply -k OVERLAY -l cvopt.io/upgrade-step=migrate` brings the Job and what it
        # needs (its namespace and settings), and nothing else, before the rest rolls out.
        selected = {d["kind"] for d in docs if d["metadata"].get("labels", {}).get(key) == value}
        assert selected == {"Job", "ConfigMap", "Namespace"}, f"{rel}: {selected}"
    assert f"-l {key}={value}" in docs_text
    assert "delete job cvopt-migrate" in docs_text
