"""The device log: what the cloud said about each drafted token, kept on the device (SQLite).

Per verified token it stores the gate features (float32 blob), the cloud's label (would
standard verification have accepted it?), whether the edge had committed it, and, for
rounds where the target's top-k distribution came back, that distribution plus the
context ids before the round - the data federated gate training and drafter distillation
learn from. Raw text never leaves the device; this file is the device's own.

Durability: WAL journal, one transaction per round, so a crash (even ``kill -9``) loses at
most the round being written and never corrupts the file. Size: at most ``max_rows``
token rows; the oldest are pruned (with their rounds) in the same transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from tandemspec.types import SparseDist

SCHEMA_VERSION = 1
DEFAULT_MAX_ROWS = 200_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    session TEXT NOT NULL,
    position INTEGER NOT NULL,
    mode TEXT NOT NULL,
    temperature REAL NOT NULL,
    bundle_version TEXT NOT NULL,
    context_ids BLOB
);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    offset INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    committed INTEGER NOT NULL,
    label INTEGER NOT NULL,
    feature_dim INTEGER NOT NULL,
    features BLOB NOT NULL,
    top_k_ids BLOB,
    top_k_probs BLOB
);
CREATE INDEX IF NOT EXISTS tokens_by_round ON tokens(round_id);
"""


@dataclass(frozen=True)
class TokenRecord:
    """One token the target judged."""

    token_id: int
    committed: bool  # committed by the gate (True) or drafted for verification (False)
    label: bool  # the cloud's SPRINTER label: would standard verification accept it?
    features: np.ndarray  # [feature_dim] float32, see tandemspec.edge.features
    target_top_k: SparseDist | None = None  # the target's top-k at this position, when sampled


@dataclass(frozen=True)
class RoundRecord:
    """One verified frame: its tokens in order (committed first, then draft)."""

    session: str
    position: int  # absolute position of the first token
    mode: str
    tokens: tuple[TokenRecord, ...]
    temperature: float = 0.0
    bundle_version: str = ""
    context_ids: tuple[int, ...] | None = None  # ids before ``position``, for sampled rounds


class DeviceLog:
    """A bounded, crash-safe SQLite log of verified tokens (thread-safe)."""

    def __init__(self, path: Path, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows <= 0:
            raise ValueError("max_rows must be positive")
        self.path = Path(path)
        self.max_rows = max_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a process crash loses nothing committed; power loss at most the last rounds.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def record_round(self, record: RoundRecord) -> None:
        """Append one round and prune beyond ``max_rows``, in a single transaction."""
        context = None if record.context_ids is None else np.asarray(record.context_ids, np.int32).tobytes()
        with self._lock, self._transaction():
            cursor = self._db.execute(
                "INSERT INTO rounds (created_at, session, position, mode, temperature, bundle_version, context_ids)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    record.session,
                    record.position,
                    record.mode,
                    record.temperature,
                    record.bundle_version,
                    context,
                ),
            )
            round_id = cursor.lastrowid
            self._db.executemany(
                "INSERT INTO tokens (round_id, offset, token_id, committed, label, feature_dim, features,"
                " top_k_ids, top_k_probs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_token_row(round_id, offset, token) for offset, token in enumerate(record.tokens)],
            )
            self._prune()

    def _prune(self) -> None:
        (newest,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM tokens").fetchone()
        if newest > self.max_rows:
            self._db.execute("DELETE FROM tokens WHERE id <= ?", (newest - self.max_rows,))
            self._db.execute("DELETE FROM rounds WHERE id < (SELECT COALESCE(MIN(round_id), 0) FROM tokens)")

    def count(self) -> int:
        """Token rows currently stored."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM tokens").fetchone()
        return int(n)

    def iter_rounds(self) -> Iterator[RoundRecord]:
        """Every stored round with its tokens, oldest first."""
        with self._lock:
            rounds = self._db.execute(
                "SELECT id, session, position, mode, temperature, bundle_version, context_ids FROM rounds ORDER BY id"
            ).fetchall()
            tokens = self._db.execute(
                "SELECT round_id, token_id, committed, label, features, top_k_ids, top_k_probs FROM tokens ORDER BY id"
            ).fetchall()
        by_round: dict[int, list[TokenRecord]] = {}
        for round_id, token_id, committed, label, features, top_ids, top_probs in tokens:
            by_round.setdefault(round_id, []).append(
                TokenRecord(
                    token_id,
                    bool(committed),
                    bool(label),
                    np.frombuffer(features, np.float32),
                    _dist(top_ids, top_probs),
                )
            )
        for round_id, session, position, mode, temperature, version, context in rounds:
            if round_id in by_round:
                yield RoundRecord(
                    session=session,
                    position=position,
                    mode=mode,
                    tokens=tuple(by_round[round_id]),
                    temperature=temperature,
                    bundle_version=version,
                    context_ids=None if context is None else tuple(int(i) for i in np.frombuffer(context, np.int32)),
                )

    def close(self) -> None:
        """Checkpoint the WAL and close the file."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def __enter__(self) -> DeviceLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _token_row(round_id: int | None, offset: int, token: TokenRecord) -> tuple[object, ...]:
    features = np.ascontiguousarray(token.features, dtype=np.float32)
    top = token.target_top_k
    return (
        round_id,
        offset,
        token.token_id,
        int(token.committed),
        int(token.label),
        int(features.size),
        features.tobytes(),
        None if top is None else np.asarray(top.ids, np.int32).tobytes(),
        None if top is None else np.asarray(top.probs, np.float32).tobytes(),
    )


def _dist(ids: bytes | None, probs: bytes | None) -> SparseDist | None:
    if ids is None or probs is None:
        return None
    return SparseDist(
        ids=tuple(int(i) for i in np.frombuffer(ids, np.int32)),
        probs=tuple(float(p) for p in np.frombuffer(probs, np.float32)),
    )


def records_from_sequences(
    token_ids: Sequence[int], labels: Sequence[bool], features: np.ndarray, num_committed: int
) -> tuple[TokenRecord, ...]:
    """Token records for one round: ``features`` [n, dim] aligned with ``token_ids``."""
    return tuple(
        TokenRecord(token_id=int(t), committed=i < num_committed, label=bool(ok), features=features[i])
        for i, (t, ok) in enumerate(zip(token_ids, labels, strict=True))
    )
