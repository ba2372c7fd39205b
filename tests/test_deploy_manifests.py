"""The deployment files, checked offline against the Kubernetes schemas and the app.

`deploy/kubernetes` (the base and the production overlay) is rendered, every object
is validated against the Kubernetes schemas of one named version, strictly (an
unknown field is an error), and the probes, ports and variables are checked against
the app's routes and `Settings`: a renamed variable or route fails here. The compose
file and the Dockerfile get the same static checks; `make compose-test` runs them.

Rendering: the manifests are plain files, so a small Python step renders them
(resources, images, replicas and JSON patches, the only kustomize features used).
Where kubectl is installed, `kubectl kustomize` renders them too and both must agree,
so the Python step never drifts from kustomize.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from api.configs import Settings
from api.main import create_app
from api.tracing import OTEL_VARIABLES
from api.worker import create_worker_app

# The oldest Kubernetes release the manifests promise to work on.
KUBERNETES_VERSION = "1.33.0"

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
PRODUCTION = KUBERNETES / "overlays" / "production"
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"
IMAGE = "orders-api"

# Variables the process reads that are not `Settings` fields.
# Read by the environment's own consumers: prometheus-client and the OpenTelemetry SDK.
NON_SETTINGS_VARIABLES = frozenset({"PROMETHEUS_MULTIPROC_DIR"}) | OTEL_VARIABLES
# The kustomization fields the Python rendering implements.
RENDERED_FIELDS = frozenset({"apiVersion", "kind", "resources", "images", "replicas", "patches"})

Obj = dict[str, Any]


# --- rendering ---------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _apply_json_patch(document: Obj, operations: list[Obj]) -> None:
    """RFC 6902 add / replace / remove, the operations the overlays use."""
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        value = copy.deepcopy(operation.get("value"))
        if isinstance(node, list):
            if op == "add":
                node.insert(len(node) if last == "-" else int(last), value)
            elif op == "replace":
                node[int(last)] = value
            elif op == "remove":
                del node[int(last)]
            else:
                raise AssertionError(f"JSON patch op {op!r} is not rendered in Python")
        elif op == "add" or (op == "replace" and last in node):
            node[last] = value
        elif op == "remove" and last in node:
            del node[last]
        else:
            raise AssertionError(f"JSON patch {operation} does not apply")


def _matches(obj: Obj, target: Obj) -> bool:
    return all(
        (obj["metadata"]["name"] if key == "name" else obj.get(key)) == value
        for key, value in target.items()
    )


def _containers(obj: Obj) -> Iterator[Obj]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def render_in_python(directory: Path) -> list[Obj]:
    """What `kubectl kustomize directory` renders, for the features the manifests use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - RENDERED_FIELDS
    assert not unsupported, f"{directory}: {sorted(unsupported)} is not rendered in Python"
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render_in_python(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    for replicas in kustomization.get("replicas", []):
        targets = [
            obj
            for obj in objects
            if obj["kind"] in {"Deployment", "StatefulSet", "ReplicaSet"}
            and obj["metadata"]["name"] == replicas["name"]
        ]
        assert targets, f"replicas: no workload named {replicas['name']}"
        for obj in targets:
            obj["spec"]["replicas"] = replicas["count"]
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load(patch["patch"])
        assert isinstance(operations, list), "only JSON 6902 patches are rendered in Python"
        targets = [obj for obj in objects if _matches(obj, patch["target"])]
        assert targets, f"patch target {patch['target']} matches nothing"
        for obj in targets:
            _apply_json_patch(obj, operations)
    return objects


def _keyed(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    keyed = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    assert len(keyed) == len(objects), "two objects of one kind share a name"
    return keyed


def render(directory: Path) -> dict[tuple[str, str], Obj]:
    """The rendered objects by (kind, name); with kubectl, also checked against kustomize."""
    objects = _keyed(render_in_python(directory))
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        rendered = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        by_kustomize = _keyed([doc for doc in yaml.safe_load_all(rendered) if doc])
        assert by_kustomize == objects, "the Python rendering differs from kubectl kustomize"
    return objects


@pytest.fixture(scope="module", params=["base", "production"])
def rendered(request: pytest.FixtureRequest) -> dict[tuple[str, str], Obj]:
    return render(BASE if request.param == "base" else PRODUCTION)


def _secret_example() -> Obj:
    secret: Obj = yaml.safe_load(SECRET_EXAMPLE.read_text())
    return secret


def _pod(obj: Obj) -> Obj:
    pod: Obj = obj["spec"]["template"]["spec"]
    return pod


def _only_container(obj: Obj) -> Obj:
    (container,) = _pod(obj)["containers"]
    return container


def _port(container: Obj, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name_or_number]
    return int(port)


def _get_routes(app: Any) -> set[str]:
    return {
        route.path for route in app.routes if "GET" in (getattr(route, "methods", None) or set())
    }


# --- Kubernetes: schemas -----------------------------------------------------------


def test_every_object_validates_strictly_against_the_kubernetes_schemas(
    rendered: dict[tuple[str, str], Obj],
) -> None:
    errors = []
    for (kind, name), obj in {**rendered, ("Secret", "example"): _secret_example()}.items():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (
            kubernetes_validate.ValidationError,
            kubernetes_validate.SchemaNotFoundError,
        ) as exc:
            errors.append(f"{kind}/{name}: {exc.message}")
    assert not errors


def test_the_base_holds_every_object_the_deployment_needs() -> None:
    kinds = sorted(kind for kind, _ in render(BASE))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
        ]
    )
    # The example Secret stays out: an `apply -k` would overwrite the real one.
    assert "Secret" not in kinds


def test_strict_validation_rejects_an_unknown_field_and_a_wrong_type() -> None:
    """The validation is not vacuous: the bundled strict schemas catch both."""
    deployment = copy.deepcopy(render(BASE)[("Deployment", "orders-api")])
    _only_container(deployment)["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    config = copy.deepcopy(render(BASE)[("ConfigMap", "orders-api-config")])
    config["data"]["PORT"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(config, KUBERNETES_VERSION, strict=True)


def test_the_production_overlay_changes_capacity_and_image() -> None:
    base, production = render(BASE), render(PRODUCTION)
    hpa = ("HorizontalPodAutoscaler", "orders-api")
    assert production[hpa]["spec"]["minReplicas"] > base[hpa]["spec"]["minReplicas"]
    worker = ("Deployment", "orders-api-worker")
    assert production[worker]["spec"]["replicas"] == 2
    api = ("Deployment", "orders-api")
    assert _only_container(production[api])["resources"] != _only_container(base[api])["resources"]
    for obj in production.values():
        for container in _containers(obj):
            assert container["image"].startswith("registry.example.com/orders-api:")


# --- Kubernetes: the app's routes, ports and variables ------------------------------


def _config_values(rendered: dict[tuple[str, str], Obj]) -> dict[str, str]:
    data: dict[str, str] = rendered[("ConfigMap", "orders-api-config")]["data"]
    return data


def _settings(values: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_probes_and_ports_are_the_apps(rendered: dict[tuple[str, str], Obj]) -> None:
    real_secret = {"JWT_SECRET_KEY": "x" * 64}
    settings = _settings({**_config_values(rendered), **real_secret})
    # The probes reach the pod's address, not only its loopback.
    assert settings.HOST == "0.0.0.0"  # noqa: S104

    api = _only_container(rendered[("Deployment", "orders-api")])
    worker = _only_container(rendered[("Deployment", "orders-api-worker")])
    for container, app, port in (
        (api, create_app(settings), settings.PORT),
        (worker, create_worker_app(settings), settings.WORKER_PORT),
    ):
        routes = _get_routes(app)
        assert container["startupProbe"]["httpGet"]["path"] == "/livez"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] in routes, (container["name"], probe)
            assert _port(container, container[probe]["httpGet"]["port"]) == port
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert "/metrics" in routes

    for name, port in (("orders-api", settings.PORT), ("orders-api-worker", settings.WORKER_PORT)):
        annotations = rendered[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"

    service = rendered[("Service", "orders-api")]
    (service_port,) = service["spec"]["ports"]
    assert _port(api, service_port["targetPort"]) == settings.PORT


def test_commands_run_the_apps_modules(rendered: dict[tuple[str, str], Obj]) -> None:
    api = _only_container(rendered[("Deployment", "orders-api")])
    worker = _only_container(rendered[("Deployment", "orders-api-worker")])
    migrate = _only_container(rendered[("Job", "orders-api-migrate")])
    assert "command" not in api  # the image's CMD: python -m api
    assert worker["command"] == ["python", "-m", "api.worker"]
    assert importlib.util.find_spec("api.worker") is not None
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert (ROOT / "alembic.ini").is_file()


def _variables(container: Obj) -> set[str]:
    return {env["name"] for env in container.get("env", [])}


def test_every_variable_is_a_setting_of_the_app(rendered: dict[tuple[str, str], Obj]) -> None:
    known = set(Settings.model_fields) | NON_SETTINGS_VARIABLES
    config = _config_values(rendered)
    secret = _secret_example()["stringData"]
    assert set(config) - known == set(), "ConfigMap keys the app does not read"
    assert set(secret) - known == set(), "Secret keys the app does not read"
    assert not set(config) & set(secret)
    for obj in rendered.values():
        for container in _containers(obj):
            assert _variables(container) - known == set(), container["name"]
            sources = [
                source.get("configMapRef", source.get("secretRef"))["name"]
                for source in container["envFrom"]
            ]
            assert sources == ["orders-api-config", _secret_example()["metadata"]["name"]]


def test_the_api_leaves_the_event_side_to_the_worker(
    rendered: dict[tuple[str, str], Obj],
) -> None:
    config = _config_values(rendered)
    api = _only_container(rendered[("Deployment", "orders-api")])
    env = {e["name"]: e["value"] for e in api["env"]}
    settings = _settings({**config, "JWT_SECRET_KEY": "x" * 64, **env})
    assert settings.OUTBOX_RELAY_ENABLED is False
    assert settings.STATUS_CONSUMER_ENABLED is False
    worker = _only_container(rendered[("Deployment", "orders-api-worker")])
    assert "OUTBOX_RELAY_ENABLED" not in _variables(worker)


def test_the_example_secret_is_refused_in_production(
    rendered: dict[tuple[str, str], Obj],
) -> None:
    values = {**_config_values(rendered), **_secret_example()["stringData"]}
    assert values["APP_ENV"] == "production"
    with pytest.raises(ValidationError, match="JWT_SECRET_KEY"):
        _settings(values)


# --- Kubernetes: pods ----------------------------------------------------------------


def _image_user() -> int:
    (user,) = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return int(user)


def _drain_seconds() -> int:
    """uvicorn's timeout_graceful_shutdown in `python -m api`."""
    source = (ROOT / "api" / "__main__.py").read_text()
    (seconds,) = re.findall(r"timeout_graceful_shutdown=(\d+)", source)
    return int(seconds)


def test_pods_run_as_the_images_user_on_a_read_only_root(
    rendered: dict[tuple[str, str], Obj],
) -> None:
    workloads = [obj for obj in rendered.values() if obj["kind"] in {"Deployment", "Job"}]
    assert len(workloads) == 3
    for obj in workloads:
        pod = _pod(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == _image_user() != 0
        assert pod["automountServiceAccountToken"] is False
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in _containers(obj):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in tmp_volumes, "no writable /tmp"  # noqa: S108
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_the_api_drains_before_it_is_killed(rendered: dict[tuple[str, str], Obj]) -> None:
    deployment = rendered[("Deployment", "orders-api")]
    api = _only_container(deployment)
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert pause >= 3, "the endpoints need a moment to drop the pod"
    grace = _pod(deployment)["terminationGracePeriodSeconds"]
    assert grace > pause + _drain_seconds()
    # Never fewer ready pods than wanted during a rollout.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    worker = rendered[("Deployment", "orders-api-worker")]
    assert _pod(worker)["terminationGracePeriodSeconds"] > _drain_seconds()


def test_selectors_select_the_pods_they_mean(rendered: dict[tuple[str, str], Obj]) -> None:
    def labels(name: str) -> dict[str, str]:
        return dict(rendered[("Deployment", name)]["spec"]["template"]["metadata"]["labels"])

    api, worker = labels("orders-api"), labels("orders-api-worker")
    job_labels = rendered[("Job", "orders-api-migrate")]["spec"]["template"]["metadata"]["labels"]
    assert rendered[("Service", "orders-api")]["spec"]["selector"] == api
    assert rendered[("PodDisruptionBudget", "orders-api")]["spec"]["selector"]["matchLabels"] == api
    target = rendered[("HorizontalPodAutoscaler", "orders-api")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "orders-api")
    assert "replicas" not in rendered[("Deployment", "orders-api")]["spec"], "the HPA owns it"
    policies = {
        name: obj["spec"]["podSelector"]["matchLabels"]
        for (kind, name), obj in rendered.items()
        if kind == "NetworkPolicy"
    }
    assert sorted(map(dict, policies.values()), key=str) == sorted(
        [api, worker, dict(job_labels)], key=str
    )
    for name in ("orders-api", "orders-api-worker"):
        selector = rendered[("Deployment", name)]["spec"]["selector"]["matchLabels"]
        assert selector == labels(name)


def test_the_migration_step_of_a_rollout_holds_what_the_job_needs(
    rendered: dict[tuple[str, str], Obj],
) -> None:
    """The README's rollout applies `component in (config,migrate)` first, the rest after."""

    def component(obj: Obj) -> str | None:
        return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")

    first = {key for key, obj in rendered.items() if component(obj) in {"config", "migrate"}}
    assert first == {
        ("ConfigMap", "orders-api-config"),
        ("Job", "orders-api-migrate"),
        ("NetworkPolicy", "orders-api-migrate"),
    }
    assert component(_secret_example()) == "config"
    rest = {key for key, obj in rendered.items() if component(obj) != "migrate"}
    assert ("Job", "orders-api-migrate") not in rest
    assert first | rest == set(rendered)


# --- compose and the Dockerfile ------------------------------------------------------


def _compose() -> Obj:
    compose: Obj = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def test_compose_builds_one_image_for_the_four_roles() -> None:
    services = _compose()["services"]
    image_users = {name for name, s in services.items() if str(s.get("image", "")).find(IMAGE) >= 0}
    assert image_users == {"migrate", "api", "worker", "rpc-echo"}
    builders = [name for name, s in services.items() if "build" in s]
    assert builders == ["migrate"]
    # Compose v1 reaches the services in dependency order and would pull the image for
    # one that comes before the builder: every other user of the image waits for it.
    for name in image_users - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_compose_publishes_only_the_api() -> None:
    services = _compose()["services"]
    # Services under a profile (the optional trace viewer) are opt-in.
    published = {
        name: s["ports"] for name, s in services.items() if "ports" in s and "profiles" not in s
    }
    assert published == {"api": ["${API_PORT:-8000}:8000"]}
    optional = yaml.safe_load((ROOT / "docker-compose.ports.yml").read_text())["services"]
    assert set(optional) == {"postgres", "redis", "rabbitmq"}
    for service in optional.values():
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])


def test_compose_health_checks_only_what_serves_http() -> None:
    services = _compose()["services"]
    checked = {name: s["healthcheck"]["test"] for name, s in services.items() if "healthcheck" in s}
    assert set(checked) == {"postgres", "redis", "rabbitmq", "api", "worker"}
    assert "/readyz' % os.environ['PORT']" in checked["api"][-1]
    assert "/readyz' % os.environ['WORKER_PORT']" in checked["worker"][-1]
    # Not in the image either: rpc-echo and migrate would inherit it.
    assert "HEALTHCHECK" not in (ROOT / "Dockerfile").read_text()


def test_compose_variables_are_the_apps() -> None:
    known = set(Settings.model_fields) | NON_SETTINGS_VARIABLES
    services = _compose()["services"]
    for name in ("migrate", "api", "worker", "rpc-echo"):
        environment = services[name]["environment"]
        assert set(environment) - known == set(), name
        assert environment["HOST"] == "0.0.0.0"  # noqa: S104
    api = services["api"]["environment"]
    assert (api["OUTBOX_RELAY_ENABLED"], api["STATUS_CONSUMER_ENABLED"]) == ("false", "false")
    assert api["PORT"] == 8000
    assert services["worker"]["environment"]["WORKER_PORT"] == 8001
    assert "OUTBOX_RELAY_ENABLED" not in services["worker"]["environment"]


def test_the_dockerfile_pins_its_tools_and_drops_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # A `# syntax=` line makes BuildKit pull a frontend image from a registry.
    assert not re.search(r"^#\s*syntax=", dockerfile, re.MULTILINE)
    assert re.search(r"^ARG UV_VERSION=\d+\.\d+\.\d+$", dockerfile, re.MULTILINE)
    assert '"uv==${UV_VERSION}"' in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    assert _image_user() >= 1000
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :].count("*") == 1, ".dockerignore is an allow-list"
    assert "!.env" not in ignored
