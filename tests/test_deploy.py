"""The deployment files: docker-compose.yml, deploy/stack.yml, deploy/Dockerfile, deploy/systemd/.

Compose and Swarm files are validated by ``docker-compose config`` (no docker engine needed),
and every command they, the Dockerfile and the systemd units run is parsed by the real
``edgellm`` argument parser, so a renamed flag breaks this test rather than a Pi.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

import server.cli
import worker.cli
from tests.processes import ROOT, START_S
from worker.kernels import native

DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
# The variables the files read; unset while testing so that their defaults are what is checked.
SETTINGS = ("EDGELLM_CLUSTER_TOKEN", "EDGELLM_IMAGE", "EDGELLM_MODELS", "EDGELLM_MODEL", "EDGELLM_DTYPE",
            "EDGELLM_THREADS", "EDGELLM_HTTP_PORT", "EDGELLM_WEIGHTS")


def parse_edgellm(argv: list[str]) -> argparse.Namespace:
    """``edgellm ARGV`` through the real parser (``server.cli.main``), without running anything."""
    parsed: list[argparse.Namespace] = []

    def capture(args: argparse.Namespace) -> int:
        parsed.append(args)
        return 0

    with mock.patch.object(server.cli, "run_serve", capture), mock.patch.object(server.cli, "run_shard", capture), \
            mock.patch.object(worker.cli, "run", capture):
        try:
            code = server.cli.main(argv)
        except SystemExit as exc:
            raise AssertionError(f"`edgellm {shlex.join(argv)}` is refused by the parser (exit {exc.code})") from None
    assert code == 0 and len(parsed) == 1
    return parsed[0]


# --- docker-compose.yml and deploy/stack.yml ---------------------------------------------------------


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip("docker-compose is not installed and this is not root: run `sudo deploy/install-system-deps.sh`")
    pytest.fail("docker-compose is not installed: run `deploy/install-system-deps.sh` as root (a step of `make setup`)")


def compose_config(file: Path, **env: str) -> dict:
    """``docker-compose -f FILE config``, validated and interpolated, as a dict."""
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("COMPOSE_")}
    cmd = [_docker_compose(), "--project-directory", str(ROOT), "-f", str(file), "config"]
    quiet = subprocess.run([*cmd, "-q"], env=dict(clean, **env), capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    full = subprocess.run(cmd, env=dict(clean, **env), capture_output=True, text=True, timeout=60)
    assert full.returncode == 0, full.stderr
    return yaml.safe_load(full.stdout)


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes, whatever the syntax compose printed."""
    mounts = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        mounts[target] = source
    return mounts


def _check_cluster(services: dict) -> dict[str, argparse.Namespace]:
    """What both files must agree on; returns each service's parsed command."""
    args = {name: parse_edgellm([str(a) for a in s["command"]]) for name, s in services.items()}
    coordinator = args["coordinator"]
    assert coordinator.command == "serve"
    workers = coordinator.workers
    assert sorted(workers) == sorted(f"{n}:{a.port}" for n, a in args.items() if a.command == "worker")
    assert len(workers) == 2
    assert coordinator.hub_port and coordinator.host == "0.0.0.0"
    assert all(a.host == "0.0.0.0" for a in args.values())
    # The coordinator sends its model path to the workers: one mount, at the same path, everywhere.
    assert Path(coordinator.model).parent == Path("/models")
    assert len({_mounts(s).get("/models") for s in services.values()} - {None}) == 1
    assert all("/models" in _mounts(s) for s in services.values())
    for name, s in services.items():
        assert s["environment"]["EDGELLM_CLUSTER_TOKEN"], name
        test = s["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python", name  # the slim image has no curl
        probe = " ".join(test[2:])
        port = args[name].port
        assert str(port) in probe, f"{name}'s healthcheck must probe its own port {port}"
    return args


def test_docker_compose_file_validates_and_runs_a_coordinator_and_two_workers() -> None:
    services = compose_config(ROOT / "docker-compose.yml")["services"]
    assert set(services) == {"coordinator", "worker1", "worker2"}
    assert _check_cluster(services)["coordinator"].hub_host == "coordinator"  # the service name
    for name, s in services.items():
        assert s["restart"] == "unless-stopped", name
        assert s["build"]["dockerfile"] == "deploy/Dockerfile", name
    depends_on = services["coordinator"]["depends_on"]
    assert {name: d["condition"] for name, d in depends_on.items()} == {
        "worker1": "service_healthy", "worker2": "service_healthy"}
    assert "/health" in " ".join(services["coordinator"]["healthcheck"]["test"])
    # By default the named volume seeded from the image's /models (the embedded model) ...
    assert _mounts(services["coordinator"])["/models"] == "models"
    assert parse_edgellm([str(a) for a in services["coordinator"]["command"]]).model == "/models/default_model"
    # ... or a host directory of checkpoints.
    custom = compose_config(ROOT / "docker-compose.yml", EDGELLM_MODELS="/srv/models", EDGELLM_MODEL="Llama-3.2-1B",
                            EDGELLM_CLUSTER_TOKEN="s3cret")["services"]
    assert {_mounts(s)["/models"] for s in custom.values()} == {"/srv/models"}
    assert parse_edgellm([str(a) for a in custom["coordinator"]["command"]]).model == "/models/Llama-3.2-1B"
    assert {s["environment"]["EDGELLM_CLUSTER_TOKEN"] for s in custom.values()} == {"s3cret"}


def test_swarm_stack_validates_and_places_one_rank_per_labelled_node() -> None:
    config = compose_config(DEPLOY / "stack.yml", EDGELLM_CLUSTER_TOKEN="s3cret")
    services = config["services"]
    # Swarm resolves "coordinator" only once it is healthy, i.e. after the workers joined its hub:
    # it advertises its own address instead (deploy/compose-check.sh deploys the stack for real)
    assert _check_cluster(services)["coordinator"].hub_host is None
    constraints = {name: s["deploy"]["placement"]["constraints"] for name, s in services.items()}
    # one label per rank, so that one node can carry several (deploy/compose-check.sh's single node)
    assert constraints == {"coordinator": ["node.labels.edgellm.coordinator == true"],
                           "worker1": ["node.labels.edgellm.worker1 == true"],
                           "worker2": ["node.labels.edgellm.worker2 == true"]}
    assert all(s["deploy"]["replicas"] == 1 for s in services.values())
    assert config["networks"]["cluster"]["driver"] == "overlay"
    assert {_mounts(s)["/models"] for s in services.values()} == {"/srv/edgellm/models"}  # a host path
    weights = parse_edgellm([str(a) for a in services["coordinator"]["command"]]).weights
    assert len(weights.split(",")) == len(services)  # one weight per rank


def test_swarm_stack_refuses_to_deploy_without_a_token() -> None:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    result = subprocess.run([_docker_compose(), "-f", str(DEPLOY / "stack.yml"), "config", "-q"], env=clean,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "EDGELLM_CLUSTER_TOKEN" in result.stderr


def test_swarm_stack_passes_dockers_own_stack_loader() -> None:
    """``docker stack config`` is the loader ``docker stack deploy`` uses (no engine needed)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed; docker-compose validated the stack already")
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    result = subprocess.run([docker, "stack", "config", "-c", str(DEPLOY / "stack.yml")],
                            env=dict(clean, EDGELLM_CLUSTER_TOKEN="s3cret"), capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip(f"this docker CLI has no `stack config`: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "node.labels.edgellm.worker2 == true" in result.stdout


# --- deploy/Dockerfile ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def test_dockerfile_is_multi_arch_cpu_torch_non_root_and_runs_edgellm() -> None:
    steps = _dockerfile()
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(a.partition("=")[::2] for kind, a in steps if kind == "ARG")
    bases = [a.split()[0] for kind, a in steps if kind == "FROM"]
    assert bases and all(b in ("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE")) for b in bases), bases
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert "TARGETARCH" in args and "${TARGETARCH" in text
    # torch: the version pyproject.toml pins, from PyTorch's CPU wheel index.
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    pins = re.findall(r'"torch==([\w.]+)"', pyproject)
    assert len(pins) == 1, pins
    assert args["TORCH_VERSION"] == pins[0] and 'torch==${TORCH_VERSION}' in text
    assert "download.pytorch.org/whl/cpu" in args["TORCH_INDEX"]
    # TORCH_WHEELS' default is committed without a wheel (.gitignore keeps out the one that
    # deploy/compose-check.sh puts there), so users get torch from TORCH_INDEX
    assert (ROOT / args["TORCH_WHEELS"] / "README.md").exists()
    assert f"{args['TORCH_WHEELS']}/*.whl" in (ROOT / ".gitignore").read_text().splitlines()
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert json.loads(next(a for kind, a in steps if kind == "ENTRYPOINT")) == ["edgellm"]
    assert re.search(r'^edgellm = "server\.cli:main"$', pyproject, re.M)  # the console script
    # Every file the build copies from the context exists and is not excluded by .dockerignore.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for kind, a in steps:
        if kind == "COPY" and "--from=" not in a:
            sources = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s)
                       for s in a.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, source


# --- deploy/systemd/ -------------------------------------------------------------------------------------


def _unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit, in order, continuation lines joined."""
    entries, section, pending = [], "", ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip()[0] in "#;"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.startswith("["):
            section = pending.strip("[]")
        else:
            key, _, value = pending.partition("=")
            entries.append((section, key.strip(), value.strip()))
        pending = ""
    return entries


def _exec_start(path: Path) -> list[str]:
    """ExecStart's argv, with ${VAR} expanded from the unit's own Environment= defaults."""
    entries = _unit(path)
    env = dict(assignment.split("=", 1) for s, k, v in entries if k == "Environment" for assignment in shlex.split(v))
    line = next(v for s, k, v in entries if s == "Service" and k == "ExecStart")

    def expand(m: re.Match) -> str:
        assert m.group(1) in env, f"{path.name}: ${{{m.group(1)}}} has no default in an Environment= line"
        return env[m.group(1)]

    return shlex.split(re.sub(r"\$\{(\w+)\}", expand, line))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_runs_a_command_edgellm_accepts(unit: Path) -> None:
    entries = _unit(unit)
    service = {k: v for s, k, v in entries if s == "Service"}
    assert service["User"] not in ("root", "0") and service["Restart"] in ("always", "on-failure")
    assert service["EnvironmentFile"] == "/etc/edgellm/edgellm.env"  # where the token lives
    argv = _exec_start(unit)
    assert argv[0] == "/opt/edgellm/venv/bin/edgellm"
    assert "--cluster-token" not in argv, "the token comes from the EnvironmentFile, not the command line"
    args = parse_edgellm(argv[1:])
    expected = "worker" if "worker" in unit.name else "serve"
    assert args.command == expected
    if expected == "serve":
        assert args.workers and args.host == "0.0.0.0"
        assert len(args.weights.split(",")) == 1 + len(args.workers)


def test_systemd_units_and_their_worker_and_coordinator_pair() -> None:
    assert {p.name for p in UNITS} == {"edgellm-worker.service", "edgellm-coordinator.service"}
    worker_port = parse_edgellm(_exec_start(DEPLOY / "systemd" / "edgellm-worker.service")[1:]).port
    coordinator = parse_edgellm(_exec_start(DEPLOY / "systemd" / "edgellm-coordinator.service")[1:])
    assert all(w.rsplit(":", 1)[1] == str(worker_port) for w in coordinator.workers)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verifies_the_unit(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd); the parser checks above still ran")
    # verify wants the binary to exist: point ExecStart at this checkout's edgellm.
    edgellm = Path(shutil.which("edgellm") or Path(sys.executable).with_name("edgellm"))
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/edgellm/venv/bin/edgellm", str(edgellm)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@pytest.mark.skipif(native.unsupported_reason() is not None or shutil.which("cc") is None,
                    reason="the native kernel builds on Linux x86-64 with AVX2 and a C compiler")
def test_dockerfile_builds_the_native_kernel_where_the_runtime_image_loads_it(tmp_path: Path) -> None:
    """The build stage's kernel command, run here, leaves a library that a process with no
    compiler (as in the runtime image) loads from the cache directory both stages name."""
    steps = _dockerfile()
    caches = [a for kind, a in steps if kind == "ENV" and "EDGELLM_KERNEL_CACHE=" in a]
    assert len(caches) == 2  # the build stage and the runtime stage
    assert len({re.findall(r"EDGELLM_KERNEL_CACHE=(\S+)", a)[0] for a in caches}) == 1
    build = next(a for kind, a in steps if kind == "RUN" and "native.build()" in a)
    (code,) = re.findall(r'python -c "([^"]+)"', build)
    env = {**os.environ, "EDGELLM_KERNEL_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=START_S)
    probe = "from worker.kernels import native; assert native.int8_mm() is not None"
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, "PATH": "/nonexistent"}, check=True,
                   timeout=START_S)


def test_help_and_argument_errors_answer_without_loading_torch() -> None:
    """``edgellm --help``, every subcommand's help and a bad argument answer at once: torch (seconds
    to import on a Pi) is loaded only for the work itself."""
    code = """
import sys
import server.cli
for argv in (["--help"], ["serve", "--help"], ["worker", "--help"], ["shard", "--help"], ["probe", "--help"],
             ["plan", "--help"], ["worker", "--port", "many"]):
    try:
        server.cli.main(argv)
    except SystemExit:
        pass
    assert "torch" not in sys.modules, f"{argv} imported torch"
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=START_S)


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--max-batch", "0"], "--max-batch: must be positive, got 0"),
    (["serve", "--prefill-chunk", "0"], "--prefill-chunk: must be positive, got 0"),
    (["serve", "--max-context", "0"], "--max-context: must be positive, got 0"),
    (["serve", "--local-workers", "-1"], "--local-workers: must be 0 or more, got -1"),
    (["serve", "--threads", "-2"], "--threads: must be positive, got -2"),
    (["serve", "--port", "99999"], "--port: a port is 0-65535, got 99999"),
    (["serve", "--request-timeout", "-1"], "--request-timeout: must be a positive number of seconds, got -1"),
    (["serve", "--step-timeout", "0"], "--step-timeout: must be a positive number of seconds, got 0"),
    (["serve", "--recovery-wait", "nan"], "--recovery-wait: must be a positive number of seconds, got nan"),
    (["shard", "--model", "m", "--out", "o", "--ranks", "0"], "--ranks: must be positive, got 0"),
    (["worker", "--port", "65536"], "--port: a port is 0-65535, got 65536"),
    (["worker", "--threads", "two"], "--threads: not an integer: 'two'"),
    # each failed only after the 10 s connect timeout ("not reachable"), and "," served 1 rank
    (["serve", "--workers", "127.0.0.1"], "--workers: not host:port (port 1-65535): '127.0.0.1'"),
    (["serve", "--workers", "127.0.0.1:99999"], "--workers: not host:port (port 1-65535): '127.0.0.1:99999'"),
    (["serve", "--workers", "a:1,,b:2"], "--workers: an empty address in 'a:1,,b:2'"),
    (["serve", "--workers", ","], "--workers: an empty address in ','"),
])
def test_serve_shard_and_worker_refuse_values_that_could_not_work(argv: list[str], message: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before, --max-batch 0 started a server on which every request hung, --prefill-chunk 0 one
    on which every request failed with a 500, and --local-workers -1, --threads -2 and
    --port 99999 died in tracebacks."""
    with pytest.raises(SystemExit) as exit_info:
        server.cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
