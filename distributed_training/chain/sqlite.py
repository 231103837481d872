"""The embedded chain's file: its tables, and how many processes open, lock and read it safely.

SQLite gives a local cluster one shared chain for free: WAL mode lets readers run beside a writer,
``busy_timeout`` makes concurrent writers queue instead of failing, and ``BEGIN IMMEDIATE`` takes
the write lock *before* reading, so a read-modify-write (e.g. "next free uid") can never race
another process. The chain's rules live in ``local.py``; this module only keeps the file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

from .base import ChainError

DEFAULT_BUSY_TIMEOUT_S = 30.0

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta(
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS subnets(
        netuid INTEGER PRIMARY KEY,
        genesis_time REAL NOT NULL,
        block_time REAL NOT NULL,
        tempo INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS neurons(
        netuid INTEGER NOT NULL REFERENCES subnets(netuid),
        uid INTEGER NOT NULL,
        hotkey TEXT NOT NULL,
        coldkey TEXT NOT NULL,
        stake REAL NOT NULL DEFAULT 0,
        validator_permit INTEGER NOT NULL DEFAULT 0,
        ip TEXT NOT NULL DEFAULT '',
        port INTEGER NOT NULL DEFAULT 0,
        registered_block INTEGER NOT NULL,
        PRIMARY KEY (netuid, uid),
        UNIQUE (netuid, hotkey))""",
    """CREATE TABLE IF NOT EXISTS weights(
        netuid INTEGER NOT NULL,
        setter_uid INTEGER NOT NULL,
        dest_uid INTEGER NOT NULL,
        weight REAL NOT NULL,
        version_key INTEGER NOT NULL,
        block INTEGER NOT NULL,
        PRIMARY KEY (netuid, setter_uid, dest_uid))""",
    # One commitment per hotkey and subnet, as on subtensor's Commitments pallet; created here too
    # for files made before commitments existed.
    """CREATE TABLE IF NOT EXISTS commitments(
        netuid INTEGER NOT NULL REFERENCES subnets(netuid),
        hotkey TEXT NOT NULL,
        data TEXT NOT NULL,
        block INTEGER NOT NULL,
        PRIMARY KEY (netuid, hotkey))""",
)


class ChainFile:
    """One connection to the chain's SQLite file; threads sharing it are serialized by a lock."""

    def __init__(self, path: Path, *, create: bool, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        """Connect to ``path``; with ``create=False`` a missing file is an error, never a new file."""
        self.path, self._busy_timeout_s = path, busy_timeout_s
        self._lock = threading.RLock()
        self._conn: Optional[sqlite3.Connection] = None
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect(create)

    def _connect(self, create: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, explicitly; mode=rw never creates the file.
        target = str(self.path) if create else f"{self.path.resolve().as_uri()}?mode=rw"
        conn = sqlite3.connect(
            target,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
            uri=not create,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            self._enable_wal(conn)
            # WAL + NORMAL survives process crashes (only an OS crash may lose the last commit).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL; retried because the switch can report SQLITE_BUSY
        without consulting the busy handler when many processes open a fresh file."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if str(mode).lower() != "wal":
            raise ChainError(
                f"embedded chain at {self.path} cannot use WAL mode (got {mode!r}); "
                "put --chain.db on a local filesystem"
            )

    def init(self, genesis_time: float, block_time: float) -> tuple[float, float]:
        """Create the tables and, if this call creates the chain, fix its genesis and block time.

        Returns the file's ``(genesis_time, block_time)``: the first opener's, for every process.
        """
        with self.write() as db:
            for statement in SCHEMA:
                db.execute(statement)
            # INSERT OR IGNORE: only the creating process sets genesis.
            db.executemany(
                "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
                [("genesis_time", repr(float(genesis_time))), ("block_time", repr(float(block_time)))],
            )
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        return float(meta["genesis_time"]), float(meta["block_time"])

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ChainError(f"embedded chain at {self.path} is closed; open a new LocalChain")
        return self._conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db()
            try:
                db.execute(begin)
                yield db
                db.execute("COMMIT")
            except BaseException as error:
                # Roll back on any failure, COMMIT included, so the lock is never left held.
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise ChainError(
                        f"embedded chain at {self.path} failed: {error}; "
                        "check the file is not corrupt or held by a stuck process"
                    ) from None
                raise

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction holding the file's write lock from its first statement."""
        return self._transaction("BEGIN IMMEDIATE")

    def read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees one consistent snapshot."""
        return self._transaction("BEGIN")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
