"""Static checks of the container deployment: docker-compose.yml, the Dockerfiles, .dockerignore.

Nothing is built or started here (no Docker engine needed): the files are parsed and held
against each other and against the code they run (core.settings.Settings, the CLI commands,
the packages pyproject.toml installs). `.ci/compose` (run by `.ci/run`) builds the images and
runs a job through the stack; .ci/compose_check.py says what it checks there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "Dockerfile.api"
WORKER_DOCKERFILE = ROOT / "Dockerfile.worker"

REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "minio",
    "minio-init",
    "migrate",
    "api",
    "worker-cpu",
    "worker-gpu",
}
ONE_SHOTS = {"minio-init", "migrate"}
TEST_SECRET_KEY = "k" * 40  # long enough for production settings, and no placeholder


# -- helpers ---------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$\$"  # escaped dollar
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(Exception):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $$, ${V}, $V, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, ${V:+r}."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        is_set = name in env
        is_nonempty = bool(env.get(name))
        if op == ":-":
            return env[name] if is_nonempty else arg
        if op == "-":
            return env[name] if is_set else arg
        if op in (":?", "?"):
            if (op == ":?" and not is_nonempty) or (op == "?" and not is_set):
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        if op == ":+":
            return arg if is_nonempty else ""
        if op == "+":
            return arg if is_set else ""
        return env.get(name, "")

    return _INTERPOLATION.sub(sub, value)


def interpolate_tree(node, env: dict[str, str]):
    """Substitutes variables in every string value (compose leaves keys alone)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return node


def iter_strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from iter_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from iter_strings(v)


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd or [])


def settings_field(env_var: str) -> str:
    """CVOPT_DATABASE_URL -> database_url (nested CVOPT_A__B -> a)."""
    return env_var.removeprefix("CVOPT_").lower().split("__")[0]


def parse_dockerfile(path: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """Returns (instructions before the first FROM, stages); each stage is a dict with
    name, base and instructions [(KEYWORD, arguments)]. Handles continuations and comments."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    preamble: list[tuple[str, str]] = []
    stages: list[dict] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, f"{path.name}: cannot parse FROM {args!r}"
            stages.append({"base": m.group(1), "name": m.group(2), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args))
        else:
            preamble.append((keyword, args))
    return preamble, stages


def instructions(stage: dict, keyword: str) -> list[str]:
    return [args for kw, args in stage["instructions"] if kw == keyword]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)  # exec form (JSON array): no shell between Docker and the program
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def env_keys(stage: dict) -> set[str]:
    keys = set()
    for args in instructions(stage, "ENV"):
        keys.update(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args))
    return keys


def stage_named(stages: list[dict], name: str) -> dict:
    matches = [s for s in stages if (s["name"] or "").lower() == name]
    assert len(matches) == 1, f"expected exactly one stage named {name!r}"
    return matches[0]


def installed_packages() -> list[str]:
    """Top-level packages pyproject.toml installs (tool.setuptools.packages.find include)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def resolved_services(services) -> dict:
    """The services with variables substituted as compose would, given only the required
    CVOPT_SECRET_KEY (every other variable takes its default)."""
    return interpolate_tree(services, {"CVOPT_SECRET_KEY": TEST_SECRET_KEY})


# Each Dockerfile reads its dependency lists in a first stage of this name (no image is built
# from it); the fixtures below give the image stages.
REQUIREMENTS_STAGE = "requirements"


def image_stages(stages: list[dict]) -> list[dict]:
    return [s for s in stages if s["name"] != REQUIREMENTS_STAGE]


@pytest.fixture(scope="module")
def api_stages():
    return image_stages(parse_dockerfile(API_DOCKERFILE)[1])


@pytest.fixture(scope="module")
def worker_dockerfile():
    preamble, stages = parse_dockerfile(WORKER_DOCKERFILE)
    return preamble, image_stages(stages)


# -- compose: services, health, ordering -----------------------------------------------------


def test_compose_file_uses_the_compose_spec_without_version_key(compose):
    assert "version" not in compose
    assert isinstance(compose.get("services"), dict)


def test_compose_defines_every_required_service(services):
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_long_running_services_have_healthchecks_and_one_shots_never_restart(services):
    for name, service in services.items():
        if name in ONE_SHOTS:
            assert str(service.get("restart")) == "no", f"{name} is a one-shot: restart must be 'no'"
        else:
            test = (service.get("healthcheck") or {}).get("test")
            assert test and test != ["NONE"], f"{name} has no healthcheck"
            assert service.get("restart") in ("unless-stopped", "always"), name


def test_depends_on_conditions_fit_the_kind_of_service_waited_for(services):
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOTS, f"{name} waits for {target} to exit, but it runs forever"
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r} does not wait for readiness")


def test_migration_waits_for_healthy_postgres(services):
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_bucket_init_waits_for_healthy_minio(services):
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["api", "worker-cpu", "worker-gpu"])
def test_api_and_workers_start_after_migration_bucket_and_broker_are_ready(services, name):
    depends = {target: spec["condition"] for target, spec in services[name]["depends_on"].items()}
    assert depends["migrate"] == "service_completed_successfully"
    assert depends["minio-init"] == "service_completed_successfully"
    assert depends["redis"] == "service_healthy"


def test_compose_strings_have_no_unbraced_or_unescaped_dollar(services):
    # `$HOSTNAME` in a healthcheck would be filled in by compose from the *host's* env;
    # container-side variables must be written `$$NAME`.
    for value in iter_strings(services):
        unescaped = value.replace("$$", "")
        for m in re.finditer(r"\$", unescaped):
            assert unescaped[m.start() + 1 : m.start() + 2] == "{", f"ambiguous '$' in {value!r}"


# -- compose: images and commands ------------------------------------------------------------


@pytest.mark.parametrize("name", ["api", "migrate"])
def test_api_and_migrate_build_the_api_dockerfile(services, name):
    build = services[name]["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == "Dockerfile.api"
    assert "target" not in build


@pytest.mark.parametrize("name,target", [("worker-cpu", "cpu"), ("worker-gpu", "gpu")])
def test_workers_build_the_worker_dockerfile_with_their_target(services, name, target):
    build = services[name]["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == "Dockerfile.worker"
    assert build["target"] == target


def published(service: dict) -> dict[int, str]:
    """{container port: "host address:host port"} of a resolved service's ports."""
    out = {}
    for entry in service.get("ports", []):
        *host, container = str(entry).rsplit(":", 2)
        out[int(container)] = ":".join(host)
    return out


def test_api_serves_on_port_8000_without_an_embedded_worker(services, resolved_services):
    api = services["api"]
    cmd = command_of(api)
    assert cmd[:2] == ["cvopt", "serve"]
    assert "--no-worker" in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert published(resolved_services["api"])[8000] == "0.0.0.0:8000"


@pytest.mark.parametrize("name,queue", [("worker-cpu", "cpu"), ("worker-gpu", "gpu")])
def test_workers_consume_their_own_queue(services, name, queue):
    assert command_of(services[name]) == ["cvopt", "worker", "--queues", queue]


def test_migrate_runs_the_migration_command(services):
    assert command_of(services["migrate"]) == ["cvopt", "migrate"]


@pytest.mark.parametrize("name", ["worker-cpu", "worker-gpu"])
def test_worker_healthcheck_pings_its_own_celery_node(services, name):
    test = services[name]["healthcheck"]["test"]
    script = test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:])
    assert "celery -A worker.celery_app inspect ping" in script
    assert "-d celery@$$HOSTNAME" in script  # this container's node, expanded in the container


def test_api_healthcheck_requests_healthz_on_the_served_port(services):
    test = services["api"]["healthcheck"]["test"]
    assert "http://127.0.0.1:8000/healthz" in " ".join(test)


def test_gpu_worker_is_opt_in_and_reserves_nvidia_gpus(services):
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == "all" and "gpu" in d.get("capabilities", []) for d in devices
    ), devices
    # Everything else starts with a plain `docker compose up`.
    assert [n for n, s in services.items() if s.get("profiles")] == ["worker-gpu"]


# -- compose: environment vs. core.settings --------------------------------------------------


def test_every_cvopt_variable_in_compose_names_a_settings_field(services):
    fields = set(Settings.model_fields)
    seen = set()
    for name, service in services.items():
        for key in environment_of(service):
            if key.startswith("CVOPT_"):
                seen.add(key)
                assert settings_field(key) in fields, f"{name}: {key} is not a Settings field"
    assert {"CVOPT_ENV", "CVOPT_DATABASE_URL", "CVOPT_BROKER_URL", "CVOPT_STORAGE_URL"} <= seen


@pytest.mark.parametrize("name", ["migrate", "api", "worker-cpu", "worker-gpu"])
def test_app_services_share_the_same_cvopt_settings(services, name):
    # Everything but worker tuning must agree between the API, the migration and the workers.
    def shared(service):
        return {k: v for k, v in environment_of(service).items() if k != "CVOPT_WORKER_CONCURRENCY"}

    assert shared(services[name]) == shared(services["api"])


def test_compose_environment_gives_valid_production_settings(resolved_services, monkeypatch):
    env = environment_of(resolved_services["api"])
    for key in list(os.environ):
        if key.startswith("CVOPT_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    settings = Settings()

    assert settings.env == "production"
    assert settings.secret_key == TEST_SECRET_KEY
    assert not settings.bootstrap_api_key  # unset by default: no key is created
    assert urlparse(settings.storage_url).scheme == "s3"
    assert urlparse(settings.broker_url).scheme == "redis"


@pytest.mark.parametrize("name", ["worker-cpu", "worker-gpu"])
def test_worker_environment_gives_valid_settings_with_a_concurrency(resolved_services, monkeypatch, name):
    for key in list(os.environ):
        if key.startswith("CVOPT_"):
            monkeypatch.delenv(key)
    for key, value in environment_of(resolved_services[name]).items():
        monkeypatch.setenv(key, value)
    assert Settings().worker_concurrency >= 1


def test_compose_refuses_to_run_without_a_secret_key(services):
    with pytest.raises(MissingVariable, match="CVOPT_SECRET_KEY"):
        interpolate_tree(services["api"], {})
    with pytest.raises(MissingVariable, match="CVOPT_SECRET_KEY"):
        interpolate_tree(services["api"], {"CVOPT_SECRET_KEY": ""})


def test_a_short_secret_key_is_rejected_by_production_settings(services):
    env = environment_of(interpolate_tree(services["api"], {"CVOPT_SECRET_KEY": "too-short"}))
    kwargs = {settings_field(k): v for k, v in env.items() if k.startswith("CVOPT_")}
    with pytest.raises(ValidationError, match="CVOPT_SECRET_KEY"):
        Settings(**kwargs)


def test_database_url_points_at_the_postgres_service_with_its_credentials(resolved_services):
    url = make_url(environment_of(resolved_services["api"])["CVOPT_DATABASE_URL"])
    pg = environment_of(resolved_services["postgres"])
    assert url.drivername == "postgresql+psycopg"  # psycopg 3, the driver pyproject installs
    assert url.host == "postgres" and (url.port or 5432) == 5432
    assert url.username == pg["POSTGRES_USER"]
    assert url.password == pg["POSTGRES_PASSWORD"]
    assert url.database == pg["POSTGRES_DB"]


def test_database_password_override_reaches_both_postgres_and_the_url(services):
    resolved = interpolate_tree(services, {"CVOPT_SECRET_KEY": TEST_SECRET_KEY, "POSTGRES_PASSWORD": "pw123"})
    assert environment_of(resolved["postgres"])["POSTGRES_PASSWORD"] == "pw123"
    assert make_url(environment_of(resolved["api"])["CVOPT_DATABASE_URL"]).password == "pw123"


def test_broker_url_points_at_the_redis_service(resolved_services):
    broker = urlparse(environment_of(resolved_services["api"])["CVOPT_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and (broker.port or 6379) == 6379


def test_s3_settings_point_at_minio_with_its_root_credentials(resolved_services):
    env = environment_of(resolved_services["api"])
    minio = resolved_services["minio"]
    minio_env = environment_of(minio)

    endpoint = urlparse(env["CVOPT_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert len(minio_env["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter root passwords

    # Presigned URLs are signed for the public endpoint, which must reach MinIO's S3 port.
    public = urlparse(env["CVOPT_S3_PUBLIC_ENDPOINT_URL"])
    assert public.hostname == "localhost"
    assert published(minio)[9000].endswith(f":{public.port}")


def test_bucket_created_by_minio_init_is_the_storage_url_bucket(resolved_services):
    init = resolved_services["minio-init"]
    command = init["command"]
    script = command if isinstance(command, str) else "\n".join(command)
    made = re.findall(r"mc mb\b[^\n]*?--ignore-existing\s+\S+/([A-Za-z0-9.\-]+)", script)
    assert made, f"minio-init makes no bucket idempotently: {script!r}"
    storage = urlparse(environment_of(resolved_services["api"])["CVOPT_STORAGE_URL"])
    assert storage.scheme == "s3"
    assert made == [storage.netloc]
    # The alias mc creates the bucket through is the minio service, with the root credentials.
    assert re.search(r"mc alias set (\S+) http://minio:9000 ", script)


# -- Dockerfiles -----------------------------------------------------------------------------


def arg_defaults(preamble_or_stage) -> dict[str, str]:
    items = preamble_or_stage if isinstance(preamble_or_stage, list) else preamble_or_stage["instructions"]
    return dict(a.split("=", 1) for kw, a in items if kw == "ARG" and "=" in a)


def test_api_dockerfile_installs_only_the_base_package(services, api_stages):
    preamble, _ = parse_dockerfile(API_DOCKERFILE)
    (stage,) = api_stages
    assert stage["base"] == "${PYTHON_BASE}"
    assert arg_defaults(preamble)["PYTHON_BASE"] == "python:3.11-slim-bookworm"
    # compose passes the same default, overridable (CI builds on a local stand-in)
    for name in ("api", "migrate"):
        assert services[name]["build"]["args"]["PYTHON_BASE"] == "${PYTHON_BASE:-python:3.11-slim-bookworm}"
    runs = " ".join(instructions(stage, "RUN"))
    assert "pip install ." in runs
    for heavy in ("[worker]", "torch", "onnxruntime", "tensorrt", "optional-dependencies"):
        assert heavy not in re.sub(r'python -c "import importlib.util[^"]*"', "", runs), (
            f"Dockerfile.api installs {heavy}"
        )
    # ... and the build fails if a dependency brought an ML runtime in anyway
    assert "u.find_spec(m)]; assert not heavy" in runs and "'torch'" in runs and "'onnxruntime'" in runs


def test_worker_dockerfile_builds_cpu_without_the_gpu_stage(services, worker_dockerfile):
    """The classic builder builds every stage before the target: cpu comes before gpu (after
    only the requirements stage, on the same small base) and takes nothing from gpu, so
    `--target cpu` never pulls the multi-GB NGC base."""
    preamble, stages = worker_dockerfile
    assert [s["name"] for s in parse_dockerfile(WORKER_DOCKERFILE)[1]] == [REQUIREMENTS_STAGE, "cpu", "gpu"]
    assert parse_dockerfile(WORKER_DOCKERFILE)[1][0]["base"] == "${CPU_BASE}"
    cpu = stage_named(stages, "cpu")
    assert {a.split()[0] for a in instructions(cpu, "COPY") if a.startswith("--from")} == {"--from=requirements"}
    args = arg_defaults(preamble)
    assert stage_named(stages, "gpu")["base"] == "${GPU_BASE}"
    assert args["GPU_BASE"].startswith("nvcr.io/nvidia/pytorch:")
    assert cpu["base"] == "${CPU_BASE}" and args["CPU_BASE"] == "python:3.11-slim-bookworm"
    build = services["worker-cpu"]["build"]
    assert build["target"] == "cpu"
    assert build["args"]["CPU_BASE"] == "${PYTHON_BASE:-python:3.11-slim-bookworm}"


def test_cpu_worker_gets_torch_from_a_build_argument_index_and_the_worker_extra(services, worker_dockerfile):
    _, stages = worker_dockerfile
    cpu = stage_named(stages, "cpu")
    runs = instructions(cpu, "RUN")
    torch_runs = [r for r in runs if "torch==" in r and "pip install" in r]
    assert torch_runs and all('--index-url "${TORCH_INDEX_URL}"' in r for r in torch_runs)
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert arg_defaults(cpu)["TORCH_INDEX_URL"] == cpu_index  # users get the CPU build by default
    assert services["worker-cpu"]["build"]["args"]["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL:-" + cpu_index + "}"
    assert any("torch.version.cuda" in r and "download.pytorch.org/whl/cpu" in r for r in runs)
    assert any("pip install '.[worker,tflite]'" in r for r in runs)


@pytest.mark.parametrize(
    ("dockerfile", "lists"),
    [
        (API_DOCKERFILE, {"/requirements.txt": ["dependencies"]}),
        (
            WORKER_DOCKERFILE,
            {
                "/requirements-cpu.txt": ["dependencies", "worker", "tflite"],
                "/requirements-gpu.txt": ["dependencies", "worker"],
            },
        ),
    ],
)
def test_dependency_lists_come_from_pyproject_in_a_first_stage_and_feed_the_install_layers(dockerfile, lists):
    """The requirements stage runs its own script on pyproject.toml: run here, it writes the lists
    the images install, and each image stage installs one before it copies pyproject.toml and
    README.md (so that editing those does not reinstall the dependencies)."""
    _, stages = parse_dockerfile(dockerfile)
    assert stages[0]["name"] == REQUIREMENTS_STAGE
    (script,) = instructions(stages[0], "RUN")
    code = shlex.split(script)[2]
    assert shlex.split(script)[:2] == ["python", "-c"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    written = {}
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if path == "/src/pyproject.toml":
            return real_open(ROOT / "pyproject.toml", mode)
        assert mode == "w"
        written[path] = io.StringIO()
        written[path].close = lambda: None
        return written[path]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"open": fake_open})
    if not written:  # the API's script prints its one list
        written["/requirements.txt"] = out
    for path, groups in lists.items():
        expected = [
            r for g in groups for r in (project[g] if g == "dependencies" else project["optional-dependencies"][g])
        ]
        assert written[path].getvalue().split() == expected, path
    for stage in image_stages(stages):
        copies = instructions(stage, "COPY")
        install = next(i for i, a in enumerate(copies) if a.startswith(f"--from={REQUIREMENTS_STAGE} "))
        assert copies[install].split()[1] in lists
        assert install < next(i for i, a in enumerate(copies) if a.startswith("pyproject.toml README.md"))


def test_worker_image_torch_is_the_version_the_tests_run(worker_dockerfile):
    """TORCH_VERSION / TORCHVISION_VERSION (the image) and the `torch` extra (the venv the tests
    pass in) name the same releases."""
    cpu = arg_defaults(stage_named(worker_dockerfile[1], "cpu"))
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["torch"]
    assert sorted(extra) == sorted([f"torch=={cpu['TORCH_VERSION']}", f"torchvision=={cpu['TORCHVISION_VERSION']}"])


def test_docs_build_the_worker_image_with_a_target():
    """Without --target a build gives the last stage, gpu: every documented build names one."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), WORKER_DOCKERFILE]:
        for line in path.read_text().splitlines():
            if "docker build" in line and "Dockerfile.worker" in line:
                assert re.search(r"--target (cpu|gpu)\b", line), f"{path.name}: {line.strip()}"


def test_images_install_under_the_pinned_constraints(api_stages, worker_dockerfile):
    """Both pip-installing images read deploy/constraints.txt before their first dependency
    install, and it pins (==) every dependency pyproject.toml names for them, inside the
    ranges pyproject.toml allows."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "deploy/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for requirement in [*project["dependencies"], *extras["worker"], *extras["tflite"]]:
        req = Requirement(requirement)
        name = canonicalize_name(req.name)
        assert name in pins, f"deploy/constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    assert not {"torch", "torchvision"} & set(pins)  # the worker pins those by build argument
    for stage in [*api_stages, stage_named(worker_dockerfile[1], "cpu")]:
        body = stage["instructions"]
        copy = next(i for i, (kw, a) in enumerate(body) if kw == "COPY" and a.startswith("deploy/constraints.txt "))
        env = next(
            i for i, (kw, a) in enumerate(body) if kw == "ENV" and "PIP_CONSTRAINT=/etc/cvopt/constraints.txt" in a
        )
        deps = next(i for i, (kw, a) in enumerate(body) if kw == "RUN" and "requirements.txt" in a)
        assert copy < env < deps, stage["base"]


def test_every_service_image_is_overridable_and_ci_has_a_stand_in_for_it(services):
    """The official images stay the defaults; .ci/compose swaps in the stand-ins it builds."""
    stand_ins = (ROOT / ".ci/compose").read_text()
    for name, service in services.items():
        image = service["image"]
        m = re.fullmatch(r"\$\{([A-Z0-9_]+):-([^}]+)\}", image)
        assert m, f"{name}: image {image!r} is not ${{VAR:-default}}"
        variable, default = m.groups()
        if "build" in service:
            assert default.startswith("cvopt-"), (name, default)  # the name the build tags
        else:
            assert "/" not in default.split(":")[0] or default.startswith("minio/"), (name, default)
            assert re.search(rf"\b{variable}=cvopt-ci/", stand_ins), f".ci/compose has no stand-in for {variable}"


def test_ci_runs_the_compose_check_after_the_readme_test_command():
    run = (ROOT / ".ci/run").read_text()
    assert run.index(".venv/bin/pytest -q") < run.index("bash .ci/compose")
    compose = (ROOT / ".ci/compose").read_text()
    assert '"${COMPOSE[@]}" up -d' in compose and "compose_check.py" in compose
    assert '-f "$ROOT/docker-compose.yml"' in compose  # the real compose file, unchanged


def test_gpu_worker_keeps_the_base_images_torch(worker_dockerfile):
    _, stages = worker_dockerfile
    runs = " ".join(instructions(stage_named(stages, "gpu"), "RUN"))
    assert "pip install '.[worker]'" in runs
    assert "torch==" not in runs and "[torch]" not in runs and "worker,torch" not in runs


def test_dockerfile_cmds_match_the_compose_commands(services, api_stages, worker_dockerfile):
    _, worker_stages = worker_dockerfile
    images = {
        "api": api_stages[-1],
        "worker-cpu": stage_named(worker_stages, "cpu"),
        "worker-gpu": stage_named(worker_stages, "gpu"),
    }
    for name, stage in images.items():
        cmd = exec_form(instructions(stage, "CMD")[-1])
        assert cmd == command_of(services[name]), name
    # The migration runs the same program as the API image's CMD.
    assert command_of(services["migrate"])[0] == exec_form(instructions(api_stages[-1], "CMD")[-1])[0]


def test_api_dockerfile_exposes_8000_and_checks_healthz(api_stages):
    (stage,) = api_stages
    assert "8000" in instructions(stage, "EXPOSE")
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in healthcheck
    assert "curl" not in healthcheck  # python:3.11-slim has no curl


def test_worker_stages_healthcheck_their_own_celery_node(worker_dockerfile):
    _, stages = worker_dockerfile
    for stage in stages:
        (healthcheck,) = instructions(stage, "HEALTHCHECK")
        assert "celery -A worker.celery_app inspect ping" in healthcheck, stage["name"]
        assert '-d "celery@$HOSTNAME"' in healthcheck or "-d celery@$HOSTNAME" in healthcheck


def test_every_image_runs_as_a_non_root_user(api_stages, worker_dockerfile):
    for stage in [*api_stages, *worker_dockerfile[1]]:
        users = instructions(stage, "USER")
        assert users, f"stage {stage['name'] or stage['base']} runs as root"
        assert users[-1].split(":")[0] not in ("root", "0")
        # The user exists: created in the same stage.
        assert any("useradd" in r and users[-1].split(":")[0] in r for r in instructions(stage, "RUN"))


def test_every_cvopt_variable_set_in_the_dockerfiles_names_a_settings_field(api_stages, worker_dockerfile):
    fields = set(Settings.model_fields)
    for stage in [*api_stages, *worker_dockerfile[1]]:
        for key in env_keys(stage):
            if key.startswith("CVOPT_"):
                assert settings_field(key) in fields, f"{key} is not a Settings field"


# What the API image leaves out: the worker's code, which nothing the API runs imports.
API_IMAGE_OMITS = {"worker"}


def test_every_image_copies_every_installed_package(api_stages, worker_dockerfile):
    packages = installed_packages()
    assert packages and all((ROOT / p).is_dir() for p in packages), packages
    stages = [(stage, API_IMAGE_OMITS) for stage in api_stages] + [(stage, set()) for stage in worker_dockerfile[1]]
    for stage, omitted in stages:
        copied = {args.split()[0].rstrip("/") for args in instructions(stage, "COPY") if not args.startswith("--from")}
        assert not copied & omitted, f"stage {stage['name'] or stage['base']} copies {sorted(copied & omitted)}"
        missing = set(packages) - copied - omitted
        assert not missing, f"stage {stage['name'] or stage['base']} does not copy {sorted(missing)}"
        assert {"pyproject.toml", "README.md"} <= {
            src for args in instructions(stage, "COPY") if not args.startswith("--from") for src in args.split()[:-1]
        }


# -- .dockerignore ---------------------------------------------------------------------------


def test_dockerignore_keeps_local_state_out_and_lets_the_copied_sources_in(api_stages, worker_dockerfile):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        # Enough of Docker's matching for these paths: a pattern excludes a path or a folder
        # above it; `**/name` matches at any depth; the last matching line wins (`!` re-includes).
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!")
            if pattern.startswith("**/"):
                hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
            else:
                hit = any(fnmatch.fnmatch(prefix, pattern.strip("/")) for prefix in prefixes)
            if hit:
                result = not negate
        return result

    for local_state in (".venv", ".cvopt", ".git", ".env", "core/__pycache__", "cvopt.egg-info"):
        assert ignored(local_state), f".dockerignore lets {local_state} into the build context"
    for stage in [*api_stages, *worker_dockerfile[1]]:
        for args in instructions(stage, "COPY"):
            for src in [] if args.startswith("--from") else args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
                assert not ignored(src.rstrip("/")), f"COPY source {src} is excluded by .dockerignore"
