"""Run the real `tritonserver` shipped in the nvidia-pytriton wheel against our model repository.

On a CPU machine this is how the embedded profile serves: the same binary and
Python backend NVIDIA ships, our `model_repository/`, and a backends folder of
our own holding the Python backend plus the stub built for the running
Python, so the models import this virtual environment's packages. On GPU the
NVIDIA image provides `tritonserver` instead (docker/) and this module is not
used.

    python -m edge.tritonserver --profile cpu
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"
MODELS = ("asr", "llm", "tts")
SHM_BYTES = 64 << 20

log = logging.getLogger("edge.tritonserver")


def _wheel_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def _wheel_libs() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (tests and benchmarks start servers on them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_backend_dir(cache: Path) -> Path:
    """A backends folder whose python/ holds the backend and the stub matching this interpreter."""
    wheel = _wheel_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    target = cache / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (wheel / "backends/python/libtriton_python.so",
                   wheel / "backends/python/triton_python_backend_utils.py", stub):
        dest = target / source.name
        if not dest.exists() or dest.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, dest)
    return target.parent


class TritonServer:
    """One tritonserver process: started, waited for until every model is ready, stopped on exit."""

    def __init__(self, profile: str = "cpu", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, cache: Path = ROOT / ".cache", log_file: Path | None = None,
                 models: tuple[str, ...] = MODELS, log_verbose: int = 0):
        self.profile, self.models = profile, models
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.cache, self.log_file, self.log_verbose = cache, log_file, log_verbose
        self.process: subprocess.Popen | None = None
        self._stopping = False

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [str(_wheel_dir() / "bin" / "tritonserver"),
               f"--model-repository={MODEL_REPOSITORY}",
               f"--backend-directory={python_backend_dir(self.cache)}",
               f"--model-config-name={self.profile}",
               "--model-control-mode=explicit",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
               "--exit-timeout-secs=10", f"--log-verbose={self.log_verbose}",
               # each Python model talks to its stub through shared memory: start it big enough for
               # seconds of audio in flight rather than growing it 1 MB at a time
               f"--backend-config=python,shm-default-byte-size={SHM_BYTES}"]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd

    def start(self, timeout: float = 300.0) -> "TritonServer":
        self._stopping = False
        self._launch(timeout)
        return self

    def supervise(self, timeout: float = 300.0) -> None:
        """Restart the server whenever it dies (as Kubernetes would restart its pod): calls in flight get
        errors and apologise, and the next turn finds the models again."""

        def watch():
            while not self._stopping:
                code = self.process.wait()
                if self._stopping:
                    return
                log.error("tritonserver exited with code %s; restarting it", code)
                try:
                    self._launch(timeout)
                except (RuntimeError, TimeoutError) as e:
                    log.error("tritonserver restart failed: %s", e)
                    time.sleep(5)

        threading.Thread(target=watch, name="tritonserver-supervisor", daemon=True).start()

    def _launch(self, timeout: float) -> None:
        env = dict(os.environ)
        # the stub must load this interpreter's libpython (not the system's), then the wheel's own libraries
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"), str(_wheel_libs()),
                                                               env.get("LD_LIBRARY_PATH")]))
        # the stub runs the models in this interpreter's environment
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        out = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        start_new_session=True)
        self.wait_ready(timeout)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            if self.ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        self._stopping = True
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("TRITON_PROFILE", "cpu"), help="configs/<profile>.pbtxt")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()
    server = TritonServer(args.profile, args.http_port, args.grpc_port, args.metrics_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(f"tritonserver ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
