"""Start the compose topology as local processes: the same commands and environment as
docker-compose.yml, with PostgreSQL, Redis and S3 endpoints swapped for ones the test started."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("api", "crawler", "detector", "siamese")
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?]([^}]*))?\}")


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, resolved from ``env``."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if m.group(0).startswith(f"${{{name}:?") or m.group(0).startswith(f"${{{name}?"):
            raise KeyError(f"compose needs {name}: {default}")
        return default or ""

    return _VAR.sub(sub, value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_command(service: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment compose gives ``service``, with ``env`` overriding."""
    spec = compose_file()["services"][service]
    environment = {k: _interpolate(str(v), env) for k, v in (spec.get("environment") or {}).items()}
    environment.update({k: v for k, v in env.items() if k in environment or k.startswith(("IMGSIFT_", "UVICORN_"))})
    command = [_interpolate(str(part), env) for part in spec["command"]]
    return command, environment


@dataclass
class Stack:
    """The four app services running as child processes; logs go to files under ``logdir``.

    ``start(service, name)`` starts another replica of a service under its own name (like
    ``docker compose up --scale``). Each worker serves its metrics on a port of its own
    (``metrics_ports``), as it would in its own container, unless ``env`` sets IMGSIFT_METRICS_PORT.
    """

    env: dict[str, str]
    logdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def start(self, service: str, name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or service
        command, environment = service_command(service, self.env)
        bindir = Path(sys.executable).parent
        command[0] = str(bindir / command[0]) if (bindir / command[0]).exists() else command[0]
        if "--hostname" in command:  # replicas on one machine need distinct Celery node names
            command[command.index("--hostname") + 1] = f"{name}@%h"
        full_env = {**os.environ, **environment, "PYTHONUNBUFFERED": "1"}
        if service != "api" and "IMGSIFT_METRICS_PORT" not in self.env:
            self.metrics_ports[name] = _free_port()
            full_env["IMGSIFT_METRICS_PORT"] = str(self.metrics_ports[name])
            # Its values under logdir, not a temporary folder that a SIGKILL would leave behind.
            full_env["PROMETHEUS_MULTIPROC_DIR"] = str(self.logdir / f"metrics-{name}")
        log = (self.logdir / f"{name}.log").open("ab")
        self.logs[name] = log
        # Own process group, so a stop also ends the Celery prefork children.
        proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def migrate(self, timeout: float = 120) -> None:
        """Run compose's one-shot ``migrate`` service to completion, as compose does before the others."""
        command, environment = service_command("migrate", self.env)
        bindir = Path(sys.executable).parent
        command[0] = str(bindir / command[0]) if (bindir / command[0]).exists() else command[0]
        done = subprocess.run(
            command, env={**os.environ, **environment}, capture_output=True, text=True, timeout=timeout
        )
        (self.logdir / "migrate.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"migrate exited with {done.returncode}:\n{done.stdout}{done.stderr}")

    def start_all(self) -> None:
        self.migrate()
        for service in APP_SERVICES:
            self.start(service)

    def stop(self, service: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.procs.pop(service)
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        self.logs.pop(service).close()

    def stop_all(self) -> None:
        for service in list(self.procs):
            self.stop(service)

    def log(self, service: str) -> str:
        return (self.logdir / f"{service}.log").read_text(errors="replace")

    def check_alive(self) -> None:
        for service, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}:\n{self.log(service)[-4000:]}")

    def wait_ready(self, api_url: str, timeout: float = 120) -> None:
        """The API answers /healthz and every worker started has logged that it is ready."""
        deadline = time.monotonic() + timeout
        pending = set(self.procs)
        while pending and time.monotonic() < deadline:
            self.check_alive()
            if "api" in pending:
                try:
                    if httpx.get(f"{api_url}/healthz", timeout=2).status_code == 200:
                        pending.discard("api")
                except httpx.HTTPError:
                    pass
            for worker in pending - {"api"}:
                if " ready." in self.log(worker):
                    pending.discard(worker)
            time.sleep(0.3)
        if pending:
            raise TimeoutError(f"not ready after {timeout}s: {sorted(pending)}")
