"""The container cluster, built and run: ``deploy/compose-check.sh`` builds the image from
``deploy/Dockerfile``, brings ``docker-compose.yml`` up, checks an answer, kills a worker
container mid-stream and checks the recovery, then does the same deployment with ``deploy/stack.yml``
on a one-node Swarm. Minutes with its caches warm (image layers, the base image tarball under
``~/.cache/edgellm``), more cold; select or leave it out with ``-m docker`` / ``-m 'not docker'``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.processes import ROOT

pytestmark = pytest.mark.docker

SKIP = 77  # compose-check.sh: it cannot run here, and says why


def _engine_usable() -> bool:
    docker = shutil.which("docker")
    return docker is not None and subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.timeout(3600)
def test_compose_and_swarm_clusters_are_built_run_and_survive_a_killed_worker() -> None:
    if os.geteuid() != 0 and not _engine_usable():
        pytest.skip("needs root (to install and start Docker) or a Docker engine this user can use")
    if os.geteuid() == 0 and not _engine_usable() and shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        pytest.skip("no Docker engine and no apt-get to install one")
    result = subprocess.run(["bash", str(ROOT / "deploy" / "compose-check.sh")], cwd=ROOT, capture_output=True,
                            text=True, timeout=3300)
    output = result.stdout + result.stderr
    if result.returncode == SKIP:
        pytest.skip(output.strip().splitlines()[-1])
    assert result.returncode == 0, output[-6000:]
    # every check ran, not only the script's exit status
    for line in ("compose up until /health is 200", "compose: README chat request answered and checked",
                 "compose: worker1 killed mid-stream, back, /health 200, answering", "compose down -v",
                 "swarm: README chat request answered and checked", "swarm: stack rm + swarm leave"):
        assert line in output, f"{line!r} missing from:\n{output[-6000:]}"
    assert "worker1 restarted" in output and "chat answer: Return a list of strings" in output
