"""The MLflow tracking server of a cluster head, run to last a week-long sweep.

- Backend store: PostgreSQL on the head (Debian/Ubuntu's package). Every trial worker writes to it at
  once; SQLite serialises writers behind one file lock, and on NFS that lock is unreliable.
- Artifacts: on the shared file system (`--artifacts-destination`), served by the server.
- Supervision: a systemd unit with Restart=always, so a crashed or OOM-killed server is back in
  seconds (trials buffer their writes meanwhile).
- Head replacement: a systemd timer pg_dumps the database onto the shared file system every
  BACKUP_MINUTES; `install` on a fresh head restores the newest dump into an empty database, so a
  replaced head loses at most that many minutes of MLflow writes (checkpoints are not affected).
- The database password lives in the service user's ~/.pgpass (libpq reads it): never in a unit file,
  a command line or the repository.

    sudo ~/venv/bin/python -m helix_sweep.sweep.head install --host <private ip> --shared /mnt/helix/mlflow
    ~/venv/bin/python -m helix_sweep.sweep.head backup --shared /mnt/helix/mlflow      # what the timer runs
    python -m helix_sweep.sweep.head render --host 10.0.0.5 --shared /mnt/helix/mlflow  # print the units
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SERVICE, BACKUP, TIMER = "helix-mlflow.service", "helix-mlflow-backup.service", "helix-mlflow-backup.timer"
BACKUP_MINUTES = 15
KEEP_BACKUPS = 8
DB = "mlflow"  # database and role name


@dataclass(frozen=True)
class Head:
    host: str  # the head's private address: workers reach it, the outside does not
    shared: Path  # on the shared file system: artifacts/ and backup/
    port: int = 5000
    db_host: str = "127.0.0.1"
    db_port: int = 5432
    python: str = sys.executable
    user: str = "ubuntu"  # the service user: owns ~/.pgpass and the shared folder
    auth: bool = False  # MLflow's basic-auth app (users and passwords; cluster/README.md)

    @property
    def db_uri(self) -> str:
        return f"postgresql://{DB}@{self.db_host}:{self.db_port}/{DB}"  # password from ~/.pgpass

    @property
    def backups(self) -> Path:
        return self.shared / "backup"


def server_command(head: Head) -> list[str]:
    cmd = [head.python, "-m", "mlflow", "server", "--host", head.host, "--port", str(head.port),
           "--backend-store-uri", head.db_uri, "--artifacts-destination", str(head.shared / "artifacts"),
           "--serve-artifacts", "--workers", "4"]
    return cmd + (["--app-name", "basic-auth"] if head.auth else [])


def auth_config(head: Head) -> str:
    """basic-auth's own settings: its users table in the same PostgreSQL database, new users may read
    nothing until granted (the admin's first password must be changed at once: cluster/README.md)."""
    return ("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = {head.db_uri}\nadmin_username = admin\nadmin_password = {secrets.token_urlsafe(16)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def units(head: Head) -> dict[str, str]:
    """The systemd units, by file name."""
    env = "Environment=MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false\n"
    if head.auth:
        env += f"Environment=MLFLOW_AUTH_CONFIG_PATH={head.shared / 'basic_auth.ini'}\n"
    backup = [head.python, "-m", "helix_sweep.sweep.head", "backup", "--shared", str(head.shared),
              "--db-host", head.db_host, "--db-port", str(head.db_port)]
    return {
        SERVICE: (
            "[Unit]\nDescription=helix_sweep MLflow tracking server (PostgreSQL backend)\n"
            "After=network-online.target postgresql.service\nWants=postgresql.service\n"
            # never give up restarting: the default start limit would stop it after 5 quick crashes
            "StartLimitIntervalSec=0\n\n"
            f"[Service]\nUser={head.user}\n{env}"
            f"ExecStart={shlex.join(server_command(head))}\n"
            "Restart=always\nRestartSec=5\n\n[Install]\nWantedBy=multi-user.target\n"),
        BACKUP: (
            "[Unit]\nDescription=pg_dump of the helix_sweep MLflow database onto the shared file system\n\n"
            f"[Service]\nType=oneshot\nUser={head.user}\nExecStart={shlex.join(backup)}\n"),
        TIMER: (
            f"[Unit]\nDescription=Every {BACKUP_MINUTES} minutes: {BACKUP}\n\n"
            f"[Timer]\nOnBootSec={BACKUP_MINUTES}min\nOnUnitActiveSec={BACKUP_MINUTES}min\n\n"
            "[Install]\nWantedBy=timers.target\n"),
    }


def _pg(args: list[str], head: Head, **kw) -> subprocess.CompletedProcess:
    """A libpq client (pg_dump, pg_restore, psql) as the mlflow role, password from ~/.pgpass."""
    return subprocess.run([*args, "-h", head.db_host, "-p", str(head.db_port), "-U", DB], check=True,
                          capture_output=True, text=True, **kw)


def backup(head: Head, keep: int = KEEP_BACKUPS) -> Path:
    """pg_dump to backup/mlflow-<time>.dump through a temp file (a dump cut short never looks whole),
    then keep the newest `keep`."""
    head.backups.mkdir(parents=True, exist_ok=True)
    stamp = subprocess.run(["date", "-u", "+%Y%m%dT%H%M%S"], capture_output=True, text=True).stdout.strip()
    final = head.backups / f"mlflow-{stamp}.dump"
    tmp = final.with_suffix(".tmp")
    _pg(["pg_dump", "-Fc", "-f", str(tmp), DB], head)
    os.replace(tmp, final)
    for old in sorted(head.backups.glob("mlflow-*.dump"))[:-keep]:
        old.unlink()
    return final


def restore_newest(head: Head) -> Path | None:
    """Restore the newest dump into the database when it has no tables yet (a fresh head)."""
    dumps = sorted(head.backups.glob("mlflow-*.dump"))
    tables = _pg(["psql", "-tAc", "SELECT count(*) FROM information_schema.tables WHERE table_schema='public'",
                  DB], head).stdout.strip()
    if not dumps or tables != "0":
        return None
    _pg(["pg_restore", "--no-owner", "-d", DB, str(dumps[-1])], head)
    return dumps[-1]


def _as_postgres(sql: str) -> str:
    return subprocess.run(["sudo", "-u", "postgres", "psql", "-tAc", sql], check=True, capture_output=True,
                          text=True).stdout.strip()


def install(head: Head, unit_dir: Path = Path("/etc/systemd/system")) -> None:
    """On the head, as root: PostgreSQL, the role and database, ~/.pgpass, the newest backup, the units."""
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True)
    subprocess.run(["systemctl", "enable", "--now", "postgresql"], check=True)
    home = Path(pwd.getpwnam(head.user).pw_dir)
    pgpass = home / ".pgpass"
    if not pgpass.exists():  # one password for the life of the head's database
        password = secrets.token_urlsafe(24)
        pgpass.write_text(f"{head.db_host}:{head.db_port}:{DB}:{DB}:{password}\n")
        pgpass.chmod(0o600)
        subprocess.run(["chown", head.user, str(pgpass)], check=True)
        exists = _as_postgres(f"SELECT 1 FROM pg_roles WHERE rolname='{DB}'") == "1"
        _as_postgres(f"{'ALTER' if exists else 'CREATE'} ROLE {DB} LOGIN PASSWORD '{password}'")
    if _as_postgres(f"SELECT 1 FROM pg_database WHERE datname='{DB}'") != "1":
        _as_postgres(f"CREATE DATABASE {DB} OWNER {DB}")
    restored = subprocess.run(["sudo", "-u", head.user, head.python, "-m", "helix_sweep.sweep.head", "restore",
                               "--shared", str(head.shared)], check=True, capture_output=True, text=True)
    print(restored.stdout.strip())
    if head.auth and not (head.shared / "basic_auth.ini").exists():
        ini = head.shared / "basic_auth.ini"
        ini.write_text(auth_config(head))
        ini.chmod(0o600)
        subprocess.run(["chown", head.user, str(ini)], check=True)
    for name, text in units(head).items():
        (unit_dir / name).write_text(text)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", SERVICE, TIMER], check=True)
    subprocess.run(["systemctl", "restart", SERVICE], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helix_sweep.sweep.head", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["install", "render", "backup", "restore"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--shared", type=Path, required=True, help="the MLflow folder on the shared file system")
    p.add_argument("--db-host", default="127.0.0.1")
    p.add_argument("--db-port", type=int, default=5432)
    p.add_argument("--user", default=os.environ.get("SUDO_USER") or "ubuntu")
    p.add_argument("--auth", action="store_true", help="MLflow's basic-auth app (cluster/README.md)")
    a = p.parse_args(argv)
    head = Head(host=a.host, shared=a.shared, port=a.port, db_host=a.db_host, db_port=a.db_port, user=a.user,
                auth=a.auth)
    if a.action == "render":
        for name, text in units(head).items():
            print(f"# {name}\n{text}")
    elif a.action == "backup":
        print(backup(head))
    elif a.action == "restore":
        done = restore_newest(head)
        print(f"restored {done}" if done else "nothing to restore (no dump, or the database has tables)")
    else:
        install(head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
