"""A throwaway Citus cluster on this machine: a coordinator and workers started from an installed Citus.

Used by `make test-citus` (tests/conftest.py) and `make bench BENCH_CITUS=1`: PostgreSQL's own binaries
(a ``bin_dir``, by default the Debian layout of PostgreSQL 15) with the citus extension installed into them
(docs/citus.md says how). Each node is a fresh data directory under a temporary directory, on a free port
of 127.0.0.1, trusting local connections; nothing here builds or installs Citus.

``python -m worker.local.citus check [BIN_DIR]`` prints why Citus cannot be used here (exit 1), or nothing (exit 0).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from worker.db.engine import connect

DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
# Test settings: a node that loses its data on a crash is fine here, and fsync would dominate the timings
# of a machine shared by several sessions. The bench keeps fsync (``durable``).
_FAST = ("fsync = off", "synchronous_commit = off", "full_page_writes = off")
_START_TIMEOUT_S = 60


def unavailable_reason(bin_dir: Path = Path(DEFAULT_PG_BIN)) -> str | None:
    """Why a Citus cluster cannot be started from ``bin_dir`` (None: it can)."""
    for tool in ("postgres", "initdb", "pg_ctl"):
        if not (bin_dir / tool).is_file():
            return f"no PostgreSQL server binaries in {bin_dir} ({tool} is missing)"
    try:
        version = _run([str(bin_dir / "postgres"), "--version"]).stdout
        sharedir = _run([str(bin_dir / "pg_config"), "--sharedir"]).stdout.strip() \
            if (bin_dir / "pg_config").is_file() else None
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot run {bin_dir / 'postgres'}: {exc}"
    libdir = bin_dir.parent / "lib"
    share = Path(sharedir) if sharedir else Path("/usr/share/postgresql") / bin_dir.parent.name
    if not (libdir / "citus.so").is_file() or not (share / "extension" / "citus.control").is_file():
        return (f"Citus is not installed for {version.strip()} (no citus.so in {libdir} or citus.control in "
                f"{share / 'extension'}); docs/citus.md says how to install it")
    return None


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    # PostgreSQL's own binaries from the directory the caller names (the tests' or the bench's setting).
    return subprocess.run(argv, capture_output=True, text=True, check=check)  # noqa: S603


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; the Debian packages bring a `postgres` account for this.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@dataclass
class Node:
    """One PostgreSQL server of the cluster."""

    name: str
    data_dir: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@dataclass
class Cluster:
    """A coordinator and ``workers``; :meth:`stop` ends every server it started."""

    root: Path
    bin_dir: Path
    coordinator: Node
    workers: list[Node] = field(default_factory=list)
    owns_root: bool = False

    @property
    def nodes(self) -> list[Node]:
        return [self.coordinator, *self.workers]

    def url(self, database: str = "postgres") -> str:
        return self.coordinator.url(database)

    def stop(self) -> None:
        for node in self.nodes:
            if (node.data_dir / "postmaster.pid").exists():
                _run(_as_server_user([str(self.bin_dir / "pg_ctl"), "stop", "-D", str(node.data_dir),
                                      "-m", "immediate", "-w"]), check=False)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _initdb(bin_dir: Path, data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(data_dir.parent, "postgres")
        shutil.chown(data_dir, "postgres")
    _run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8", "--locale=C"]))


def _configure(source: Path, name: str, *, durable: bool) -> Node:
    """A node's data directory: a copy of the freshly initialized ``source`` with its own port and settings."""
    data_dir = source.parent / name
    shutil.copytree(source, data_dir, symlinks=True)
    if os.geteuid() == 0:
        # PostgreSQL checks that the server account owns its data directory.
        for path in (data_dir, *data_dir.rglob("*")):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    settings = [
        f"port = {port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{data_dir}'",
        "shared_preload_libraries = 'citus'", "citus.node_conninfo = 'sslmode=disable'",
        "max_connections = 200", "max_prepared_transactions = 200", "shared_buffers = '128MB'",
        *(() if durable else _FAST),
    ]
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n# worker.local.citus\n" + "\n".join(settings) + "\n")
    return Node(name, data_dir, port)


def _start(bin_dir: Path, nodes: list[Node]) -> None:
    """Start every node at once and wait for all of them."""
    argv = [_as_server_user([str(bin_dir / "pg_ctl"), "start", "-D", str(node.data_dir), "-w",
                             "-t", str(_START_TIMEOUT_S), "-l", str(node.data_dir / "server.log")]) for node in nodes]
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in argv]  # noqa: S603
    failed = [(node.name, proc.communicate()[1]) for node, proc in zip(nodes, procs, strict=True) if proc.wait()]
    if failed:
        raise RuntimeError(f"PostgreSQL did not start: {failed}")


# The test databases this creates: a plain name, since CREATE DATABASE cannot bind it.
DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


async def create_citus_database(cluster: Cluster, database: str) -> None:
    """Create ``database`` on every node with the citus extension, and register the nodes on the coordinator.

    Citus keeps its node list per database: every database of a cluster gets the extension on each node
    and the coordinator's list of workers (a managed service does this for its one database).
    """
    if not DATABASE_NAME.match(database):
        raise ValueError(f"not a plain database name: {database!r}")
    for node in (*cluster.workers, cluster.coordinator):
        admin = await connect(node.url())
        try:
            # CREATE DATABASE takes no bound parameters: the name is checked against DATABASE_NAME above.
            await admin.execute(f'CREATE DATABASE "{database}"')
        finally:
            await admin.close()
    await add_citus(cluster, database)


async def add_citus(cluster: Cluster, database: str) -> None:
    """Make ``database``, which exists on every node, a Citus database: the extension on each node, the
    workers registered on the coordinator (also how a database created before Citus is converted)."""
    for node in (*cluster.workers, cluster.coordinator):
        conn = await connect(node.url(database))
        try:
            await conn.execute("CREATE EXTENSION citus")
        finally:
            await conn.close()
    conn = await connect(cluster.url(database))
    try:
        await conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', $1)", cluster.coordinator.port)
        for worker in cluster.workers:
            await conn.fetchval("SELECT citus_add_node('127.0.0.1', $1)", worker.port)
    finally:
        await conn.close()


def start_cluster(root: Path | None = None, *, bin_dir: Path = Path(DEFAULT_PG_BIN), workers: int = 2,
                  durable: bool = False) -> Cluster:
    """Start a coordinator and ``workers`` workers under ``root`` (a new temporary directory by default)."""
    reason = unavailable_reason(bin_dir)
    if reason is not None:
        raise RuntimeError(reason)
    owns_root = root is None
    root = root or Path(tempfile.mkdtemp(prefix="citus-cluster-"))
    _initdb(bin_dir, root / "initdb")
    nodes = [_configure(root / "initdb", name, durable=durable)
             for name in ("coordinator", *(f"worker{i + 1}" for i in range(workers)))]
    cluster = Cluster(root, bin_dir, nodes[0], nodes[1:], owns_root=owns_root)
    try:
        _start(bin_dir, nodes)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) <= 2:
        reason = unavailable_reason(Path(argv[1]) if len(argv) == 2 else Path(DEFAULT_PG_BIN))
        if reason is not None:
            print(reason)
            return 1
        return 0
    print("usage: python -m worker.local.citus check [BIN_DIR]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
