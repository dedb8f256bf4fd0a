"""The cluster head's MLflow server as its systemd unit runs it: the unit's exact command line against a
real PostgreSQL (Debian's package, started here in a temp folder), many writers at once, then a backup
and its restore into a fresh database, as on a replaced head. systemd itself cannot run in this
container (no init): `systemd-analyze verify` checks the units, and Restart=always is asserted."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helix_sweep.sweep import head as H
from helix_sweep.sweep.tracking import check_tracking_reachable

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL on loopback with the mlflow role (password in a .pgpass) and database."""
    if not PG_BIN or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql)")
    bin_dir = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="helix-pg-"))  # pytest's tmp_path is not traversable by postgres
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                                 "--auth-host=scram-sha-256"]), check=True, capture_output=True)
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                                 f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    password = "test-only-password"

    def sql(statement: str) -> None:
        subprocess.run(_as_postgres([str(bin_dir / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres",
                                     "-v", "ON_ERROR_STOP=1", "-c", statement]), check=True, capture_output=True)

    sql(f"CREATE ROLE {H.DB} LOGIN PASSWORD '{password}'")
    sql(f"CREATE DATABASE {H.DB} OWNER {H.DB}")
    pgpass = tmp_path / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:{H.DB}:{H.DB}:{password}\n")
    pgpass.chmod(0o600)
    old_env = {k: os.environ.get(k) for k in ("PGPASSFILE", "PATH")}
    os.environ["PGPASSFILE"] = str(pgpass)  # the libpq clients (pg_dump, psql) and the server's psycopg2
    os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    try:
        yield port, sql
    finally:
        for k, v in old_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _serve(head: H.Head, log: Path) -> subprocess.Popen:
    """Start the server exactly as the unit's ExecStart says, with the unit's environment."""
    unit = H.units(head)[H.SERVICE]
    [exec_start] = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    env = dict(os.environ)
    env.update(line.split("=", 1)[1].split("=", 1) for line in unit.splitlines() if line.startswith("Environment="))
    proc = subprocess.Popen(shlex.split(exec_start), stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 240  # its first start creates MLflow's tables: slow on a loaded machine
    while True:
        try:
            check_tracking_reachable(f"http://{head.host}:{head.port}", timeout=2)
            return proc
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise AssertionError(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_units_verify_and_restart_forever(tmp_path):
    head = H.Head(host="10.0.0.5", shared=Path("/mnt/helix/mlflow"), user="root", auth=True)
    units = H.units(head)
    service = units[H.SERVICE]
    assert "Restart=always" in service and "StartLimitIntervalSec=0" in service
    assert "postgresql://mlflow@127.0.0.1:5432/mlflow" in service and "PASSWORD" not in service.upper()
    assert "--app-name basic-auth" in service and "MLFLOW_AUTH_CONFIG_PATH=/mnt/helix/mlflow/basic_auth.ini" in service
    assert f"OnUnitActiveSec={H.BACKUP_MINUTES}min" in units[H.TIMER]
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed: unit syntax not verified")
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in units]],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # ~40 s with a real PostgreSQL; CI keeps the unit and config checks of the head
def test_postgres_backed_server_takes_concurrent_writers_and_survives_a_replaced_head(postgres, tmp_path):
    db_port, sql = postgres
    head = H.Head(host="127.0.0.1", port=_free_port(), shared=tmp_path / "shared", db_port=db_port,
                  user="root")
    server = _serve(head, tmp_path / "server.log")
    uri = f"http://{head.host}:{head.port}"
    try:
        client = MlflowClient(uri)
        exp = client.create_experiment("helix-head-test")
        errors: list[BaseException] = []

        def trial(i: int) -> None:  # what each trial worker does at once: a run, params, epochs, tags
            try:
                c = MlflowClient(uri)
                run = c.create_run(exp, tags={"trial_key": f"t{i}"})
                c.log_param(run.info.run_id, "fold", i)
                for step in range(20):
                    c.log_metric(run.info.run_id, "test_acc", step / 20, step=step)
                c.set_tag(run.info.run_id, "status", "finished")
                c.set_terminated(run.info.run_id)
            except BaseException as exc:  # collected: an assertion in a thread would be lost
                errors.append(exc)

        threads = [threading.Thread(target=trial, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert len(client.search_runs([exp])) == 8
        dump = H.backup(head)  # what the timer runs every BACKUP_MINUTES
        assert dump.parent == head.backups and dump.stat().st_size > 0
    finally:
        _stop(server)

    # a replaced head: an empty database, the dump on the shared file system
    sql(f"DROP DATABASE {H.DB}")
    sql(f"CREATE DATABASE {H.DB} OWNER {H.DB}")
    assert H.restore_newest(head) == dump
    assert H.restore_newest(head) is None  # a database with tables is never overwritten
    server = _serve(head, tmp_path / "server.log")
    try:
        client = MlflowClient(uri)
        [exp] = [e for e in client.search_experiments() if e.name == "helix-head-test"]
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.data.tags["trial_key"] for r in runs) == [f"t{i}" for i in range(8)]
        assert all(len(client.get_metric_history(r.info.run_id, "test_acc")) == 20 for r in runs)
        assert {r.info.status for r in runs} == {"FINISHED"}
    finally:
        _stop(server)
