"""The embedded chain: one SQLite file shared by every process of a local cluster.

A real subtensor is unreachable in tests and overkill for a laptop cluster,
yet miners and validators must still agree on uids, endpoints, weights and
commitments across OS processes. ``sqlite.py`` keeps the file safe to share;
this module holds the chain's rules (who may write what, and what reads see).

Blocks are derived from wall time (``floor((now - genesis) / block_time)``)
rather than produced by a node, so every process sees the same block number
without any process having to stay alive to "mine".
"""

from __future__ import annotations

import math
import sqlite3
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Optional, Union

from ..config import EMBEDDED_NETWORK
from .base import (
    Chain,
    ChainError,
    Metagraph,
    NeuronInfo,
    WalletLike,
    check_commitment,
    check_endpoint,
    check_netuid,
    normalize_weights,
)
from .sqlite import DEFAULT_BUSY_TIMEOUT_S, ChainFile

# Subtensor's default tempo, so local runs mirror mainnet epoch pacing.
DEFAULT_TEMPO = 360


def _register_hint(db_path: Path, netuid: int) -> str:
    return (
        f"register it with `dt-chain --chain.db {db_path} register --netuid {netuid} "
        "--wallet.name W --wallet.hotkey H`"
    )


class LocalChain(Chain):
    """Chain backend over one SQLite file; safe to share between processes and threads."""

    network = EMBEDDED_NETWORK

    def __init__(
        self,
        db_path: Union[str, Path],
        block_time: float = 1.0,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        create: bool = True,
    ) -> None:
        """Open (creating if needed) the chain at ``db_path``.

        ``block_time`` only applies when this call creates the file: the first
        process fixes genesis and block time so all processes agree on blocks.
        ``clock`` is injectable so tests can advance time without sleeping.
        With ``create=False`` (the neurons) a missing file is a ChainError: a
        mistyped ``--chain.db`` must not become a new, empty chain.
        """
        if not (isinstance(block_time, (int, float)) and math.isfinite(block_time)) or block_time <= 0:
            raise ChainError(f"block_time must be a positive number of seconds, got {block_time!r}")
        self.db_path = Path(db_path).expanduser()
        self._clock = clock
        self._file: Optional[ChainFile] = None
        if not create and not self.db_path.is_file():
            raise ChainError(
                f"no embedded chain at {self.db_path}; check --chain.db, or create one with "
                f"`dt-chain --chain.db {self.db_path} create-subnet --netuid N`"
            )
        try:
            self._file = ChainFile(self.db_path, create=create, busy_timeout_s=busy_timeout_s)
            self.genesis_time, self.block_time = self._file.init(float(self._clock()), float(block_time))
        except ChainError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as error:
            self.close()
            raise ChainError(
                f"cannot open embedded chain at {self.db_path}: {error}; pass a writable --chain.db path"
            ) from None

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        if self._file is None:
            raise ChainError(f"embedded chain at {self.db_path} is closed; open a new LocalChain")
        return self._file.write()

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        if self._file is None:
            raise ChainError(f"embedded chain at {self.db_path} is closed; open a new LocalChain")
        return self._file.read()

    def _block_at(self, now: float) -> int:
        return max(0, math.floor((now - self.genesis_time) / self.block_time))

    def _require_subnet(self, db: sqlite3.Connection, netuid: int) -> None:
        if db.execute("SELECT 1 FROM subnets WHERE netuid = ?", (netuid,)).fetchone() is None:
            raise ChainError(
                f"subnet {netuid} does not exist on the embedded chain at {self.db_path}; "
                f"create it with `dt-chain --chain.db {self.db_path} create-subnet --netuid {netuid}`"
            )

    def _registered_uid(self, db: sqlite3.Connection, netuid: int, hotkey: str) -> int:
        row = db.execute(
            "SELECT uid FROM neurons WHERE netuid = ? AND hotkey = ?", (netuid, hotkey)
        ).fetchone()
        if row is None:
            raise ChainError(
                f"hotkey {hotkey} is not registered on netuid {netuid}; "
                + _register_hint(self.db_path, netuid)
            )
        return int(row[0])

    # --- admin (embedded only) ---------------------------------------------------

    def create_subnet(self, netuid: int, tempo: int = DEFAULT_TEMPO, exist_ok: bool = False) -> None:
        """Create ``netuid``; with ``exist_ok`` an existing subnet is left untouched."""
        check_netuid(netuid)
        if isinstance(tempo, bool) or not isinstance(tempo, int) or tempo <= 0:
            raise ChainError(f"tempo must be a positive integer of blocks, got {tempo!r}")
        with self._write() as db:
            if db.execute("SELECT 1 FROM subnets WHERE netuid = ?", (netuid,)).fetchone():
                if exist_ok:
                    return
                raise ChainError(
                    f"subnet {netuid} already exists on the embedded chain at {self.db_path}; "
                    "pick another --netuid, or pass --exist-ok to reuse it"
                )
            db.execute(
                "INSERT INTO subnets(netuid, genesis_time, block_time, tempo) VALUES (?, ?, ?, ?)",
                (netuid, self.genesis_time, self.block_time, tempo),
            )

    def netuids(self) -> list[int]:
        """Existing subnets, ascending."""
        with self._read() as db:
            return [int(r[0]) for r in db.execute("SELECT netuid FROM subnets ORDER BY netuid")]

    def register(
        self,
        netuid: int,
        hotkey: str,
        coldkey: str,
        stake: float = 0.0,
        validator_permit: bool = False,
    ) -> int:
        """Give ``hotkey`` the next free uid; an already-registered hotkey keeps its uid.

        Re-registering changes nothing (use ``set_stake`` for that), so several
        processes may race to register the same hotkey and all get one answer.
        """
        check_netuid(netuid)
        _check_key("hotkey", hotkey)
        _check_key("coldkey", coldkey)
        _check_stake(stake)
        with self._write() as db:
            self._require_subnet(db, netuid)
            row = db.execute(
                "SELECT uid, coldkey FROM neurons WHERE netuid = ? AND hotkey = ?", (netuid, hotkey)
            ).fetchone()
            if row is not None:
                if row[1] != coldkey:
                    raise ChainError(
                        f"hotkey {hotkey} is already registered on netuid {netuid} under "
                        f"coldkey {row[1]}; use that wallet's coldkey or a new hotkey"
                    )
                return int(row[0])
            uid = int(
                db.execute(
                    "SELECT COALESCE(MAX(uid) + 1, 0) FROM neurons WHERE netuid = ?", (netuid,)
                ).fetchone()[0]
            )
            db.execute(
                "INSERT INTO neurons(netuid, uid, hotkey, coldkey, stake, validator_permit,"
                " registered_block) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (netuid, uid, hotkey, coldkey, float(stake), int(bool(validator_permit)),
                 self._block_at(self._clock())),
            )
            return uid

    def set_stake(
        self, netuid: int, hotkey: str, stake: float, validator_permit: Optional[bool] = None
    ) -> None:
        """Set a registered hotkey's stake and, unless None, its validator permit."""
        check_netuid(netuid)
        _check_stake(stake)
        with self._write() as db:
            self._require_subnet(db, netuid)
            uid = self._registered_uid(db, netuid, hotkey)
            db.execute(
                "UPDATE neurons SET stake = ? WHERE netuid = ? AND uid = ?", (float(stake), netuid, uid)
            )
            if validator_permit is not None:
                db.execute(
                    "UPDATE neurons SET validator_permit = ? WHERE netuid = ? AND uid = ?",
                    (int(validator_permit), netuid, uid),
                )

    # --- Chain interface ---------------------------------------------------------

    def block(self) -> int:
        return self._block_at(self._clock())

    def metagraph(self, netuid: int) -> Metagraph:
        check_netuid(netuid)
        with self._read() as db:
            self._require_subnet(db, netuid)
            rows = db.execute(
                "SELECT uid, hotkey, coldkey, stake, validator_permit, ip, port FROM neurons"
                " WHERE netuid = ? ORDER BY uid",
                (netuid,),
            ).fetchall()
        neurons = [
            NeuronInfo(
                uid=int(uid), hotkey=hk, coldkey=ck, stake=float(stake),
                validator_permit=bool(permit), ip=ip, port=int(port),
            )
            for uid, hk, ck, stake, permit, ip, port in rows
        ]
        return Metagraph(netuid=netuid, block=self.block(), neurons=neurons)

    def uid_for(self, netuid: int, hotkey: str) -> Optional[int]:
        check_netuid(netuid)
        with self._read() as db:
            row = db.execute(
                "SELECT uid FROM neurons WHERE netuid = ? AND hotkey = ?", (netuid, hotkey)
            ).fetchone()
        return None if row is None else int(row[0])

    def serve_endpoint(self, wallet: WalletLike, netuid: int, ip: str, port: int) -> None:
        check_netuid(netuid)
        check_endpoint(ip, port)
        hotkey = wallet.hotkey.ss58_address
        with self._write() as db:
            self._require_subnet(db, netuid)
            uid = self._registered_uid(db, netuid, hotkey)
            db.execute(
                "UPDATE neurons SET ip = ?, port = ? WHERE netuid = ? AND uid = ?",
                (ip, port, netuid, uid),
            )

    def set_weights(
        self,
        wallet: WalletLike,
        netuid: int,
        uids: list[int],
        weights: list[float],
        version_key: int,
    ) -> None:
        check_netuid(netuid)
        dests, values = normalize_weights(uids, weights)
        hotkey = wallet.hotkey.ss58_address
        with self._write() as db:
            self._require_subnet(db, netuid)
            setter = self._registered_uid(db, netuid, hotkey)
            permit = db.execute(
                "SELECT validator_permit FROM neurons WHERE netuid = ? AND uid = ?", (netuid, setter)
            ).fetchone()[0]
            if not permit:
                raise ChainError(
                    f"hotkey {hotkey} (uid {setter}) has no validator permit on netuid {netuid}; "
                    f"grant one with `dt-chain --chain.db {self.db_path} set-stake --netuid {netuid} "
                    "--wallet.name W --wallet.hotkey H --stake S --validator`"
                )
            known = {int(r[0]) for r in db.execute("SELECT uid FROM neurons WHERE netuid = ?", (netuid,))}
            unknown = sorted(set(dests) - known)
            if unknown:
                raise ChainError(
                    f"uids {unknown} are not registered on netuid {netuid}; weight only uids from the metagraph"
                )
            block = self._block_at(self._clock())
            # Delete + insert inside one transaction: readers see the old row set or the new one.
            db.execute("DELETE FROM weights WHERE netuid = ? AND setter_uid = ?", (netuid, setter))
            db.executemany(
                "INSERT INTO weights(netuid, setter_uid, dest_uid, weight, version_key, block)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(netuid, setter, dest, value, int(version_key), block) for dest, value in zip(dests, values)],
            )

    def weights(self, netuid: int) -> dict[int, dict[int, float]]:
        check_netuid(netuid)
        with self._read() as db:
            self._require_subnet(db, netuid)
            rows = db.execute(
                "SELECT setter_uid, dest_uid, weight FROM weights WHERE netuid = ?"
                " ORDER BY setter_uid, dest_uid",
                (netuid,),
            ).fetchall()
        out: dict[int, dict[int, float]] = {}
        for setter, dest, weight in rows:
            out.setdefault(int(setter), {})[int(dest)] = float(weight)
        return out

    def commit(self, wallet: WalletLike, netuid: int, data: str) -> None:
        check_netuid(netuid)
        check_commitment(data)
        hotkey = wallet.hotkey.ss58_address
        with self._write() as db:
            self._require_subnet(db, netuid)
            self._registered_uid(db, netuid, hotkey)  # the Commitments pallet refuses strangers too
            db.execute(
                "INSERT OR REPLACE INTO commitments(netuid, hotkey, data, block) VALUES (?, ?, ?, ?)",
                (netuid, hotkey, data, self._block_at(self._clock())),
            )

    def commitments(self, netuid: int) -> dict[str, str]:
        check_netuid(netuid)
        with self._read() as db:
            self._require_subnet(db, netuid)
            rows = db.execute(
                "SELECT hotkey, data FROM commitments WHERE netuid = ? ORDER BY hotkey", (netuid,)
            ).fetchall()
        return {str(hotkey): str(data) for hotkey, data in rows}

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        return f"LocalChain(db_path={str(self.db_path)!r}, block_time={getattr(self, 'block_time', None)})"


def _check_key(kind: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ChainError(f"{kind} must be a non-empty SS58 address string, got {value!r}")


def _check_stake(stake: float) -> None:
    if isinstance(stake, bool) or not isinstance(stake, (int, float)) or not math.isfinite(stake) or stake < 0:
        raise ChainError(f"stake must be a finite non-negative number, got {stake!r}")
