"""The repository `triton-repo` writes loads in Triton as is: the tritonserver binary of the
nvidia-pytriton wheel (in its own venv, made by samples/setup.sh: it pins numpy<2) runs the
decoupled model, and a gRPC streaming client gets the runtime's greedy reply."""
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

VENV = Path(os.environ.get("VISPEC_TRITON_VENV",
                           Path.home() / ".cache" / "vispec-export" / "triton-venv"))
PYTRITON = VENV / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / \
    "site-packages"


def skip_reason() -> str | None:
    """Why tritonserver cannot run here (None: it can)."""
    libc = os.confstr("CS_GNU_LIBC_VERSION") or "libc ?"
    if platform.system() != "Linux" or not libc.startswith("glibc"):
        return f"the bundled tritonserver needs Linux with glibc ({libc} here)"
    if tuple(int(x) for x in libc.split()[1].split(".")[:2]) < (2, 35):
        return f"the bundled tritonserver needs glibc >= 2.35 ({libc} here)"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "Triton's Python stub needs a shared libpython; this Python is static"
    if not (PYTRITON / "pytriton" / "tritonserver" / "bin" / "tritonserver").exists():
        return (f"no nvidia-pytriton venv at {VENV} (samples/setup.sh makes it; "
                f"VISPEC_TRITON_VENV names another)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_files(work: Path) -> Path:
    """The wheel's tritonserver with the Python stub of this interpreter's version."""
    dist = PYTRITON / "pytriton" / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for part in ("bin", "backends", "caches"):
        shutil.copytree(dist / part, work / part)
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                work / "backends" / "python")
    return work


@pytest.fixture
def tritonserver(tmp_path):
    """``start(repository) -> grpc address``; the server is stopped after the test."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    procs = []

    def start(repository: Path) -> str:
        work = server_files(tmp_path / "tritonserver")
        ports = [free_port() for _ in range(3)]
        env = {**os.environ,
               # The stub embeds this interpreter (its libpython) and finds the venv, with
               # its numpy<2, through the `python3` first on PATH.
               "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
               "LD_LIBRARY_PATH": os.pathsep.join([sysconfig.get_config_var("LIBDIR"),
                                                   str(PYTRITON / "nvidia_pytriton.libs")])}
        log = open(tmp_path / "tritonserver.log", "w")
        procs.append((subprocess.Popen(
            [work / "bin" / "tritonserver", "--model-repository", repository,
             "--backend-directory", work / "backends", "--cache-directory", work / "caches",
             "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
             "--metrics-address", "127.0.0.1", "--http-port", str(ports[0]),
             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
             "--exit-timeout-secs", "5"], env=env, stdout=log, stderr=subprocess.STDOUT),
            log))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert procs[-1][0].poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=2)
                return f"127.0.0.1:{ports[1]}"
            except OSError:
                time.sleep(0.5)
        raise AssertionError("tritonserver not ready: "
                             + (tmp_path / "tritonserver.log").read_text()[-3000:])

    yield start
    for proc, log in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_tritonserver_streams_the_runtimes_greedy_reply(tritonserver, tiny_target, tiny_drafter,
                                                        noise_image, tmp_path):
    from vispec.runtime.pipeline import Pipeline
    from vispec.runtime.serve.triton import write_repository

    artifacts, drafter = tiny_target("llava")[1], tiny_drafter("vispec", "llava")[1]
    repository = write_repository(artifacts, tmp_path / "repo", drafter=drafter, instances=2)
    config = (repository / "vispec" / "config.pbtxt").read_text()
    assert "count: 2 kind: KIND_CPU" in config and "decoupled: true" in config
    address = tritonserver(repository)
    image = tmp_path / "image.png"
    noise_image(56, 56, 3).save(image)
    reference = Pipeline(artifacts, tree=None)
    client = Path(__file__).with_name("triton_client.py")
    for images in ([], [image]):
        run = subprocess.run([VENV / "bin" / "python", client, address, "Describe the boat.",
                              "16", *images], capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
        pieces = json.loads(run.stdout)
        want = reference.generate("Describe the boat.", images=images, max_new_tokens=16,
                                  draft=False).text
        assert len(pieces) > 1 and "".join(pieces) == want
