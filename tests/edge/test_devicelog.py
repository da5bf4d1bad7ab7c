"""The device log: round trip, bounded size, and integrity after a writer is killed mid-way."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from tandemspec.edge.devicelog import DeviceLog, RoundRecord, TokenRecord
from tandemspec.types import SparseDist


def _round(position: int, n: int = 3, dim: int = 6, top_k: bool = False) -> RoundRecord:
    tokens = tuple(
        TokenRecord(
            token_id=position + i,
            committed=i == 0,
            label=i % 2 == 0,
            features=np.full(dim, position + i, np.float32),
            target_top_k=SparseDist((position + i, 7), (0.75, 0.25)) if top_k else None,
        )
        for i in range(n)
    )
    return RoundRecord(
        session="s1",
        position=position,
        mode="lossless",
        tokens=tokens,
        temperature=0.5,
        context_ids=tuple(range(position)) if top_k else None,
    )


def test_round_trip(tmp_path: Path) -> None:
    with DeviceLog(tmp_path / "log.db") as log:
        log.record_round(_round(10))
        log.record_round(_round(13, top_k=True))
        assert log.count() == 6
        rounds = list(log.iter_rounds())
    tokens = [t for r in rounds for t in r.tokens]
    features = np.stack([t.features for t in tokens])
    labels = np.array([t.label for t in tokens])
    committed = np.array([t.committed for t in tokens])
    assert features.shape == (6, 6) and features.dtype == np.float32
    assert features[:, 0].tolist() == [10, 11, 12, 13, 14, 15]
    assert labels.tolist() == [True, False, True] * 2
    assert committed.tolist() == [True, False, False] * 2
    assert rounds[0].context_ids is None and rounds[0].tokens[0].target_top_k is None
    assert rounds[1].context_ids == tuple(range(13))
    assert rounds[1].tokens[2].target_top_k == SparseDist((15, 7), (0.75, 0.25))
    assert rounds[1].temperature == 0.5 and rounds[1].position == 13


def test_retention_keeps_the_newest_rows(tmp_path: Path) -> None:
    with DeviceLog(tmp_path / "log.db", max_rows=10) as log:
        for r in range(20):
            log.record_round(_round(3 * r))
        assert log.count() == 10
        rounds = list(log.iter_rounds())
        features = np.stack([t.features for r in rounds for t in r.tokens])
        assert features[-1, 0] == 3 * 19 + 2 and features[0, 0] == 3 * 19 + 2 - 9
    assert len(rounds) == 4  # the oldest surviving round is partial
    with sqlite3.connect(tmp_path / "log.db") as db:
        (orphans,) = db.execute("SELECT COUNT(*) FROM rounds WHERE id NOT IN (SELECT round_id FROM tokens)").fetchone()
    assert orphans == 0


def test_reopening_appends(tmp_path: Path) -> None:
    with DeviceLog(tmp_path / "log.db") as log:
        log.record_round(_round(0))
    with DeviceLog(tmp_path / "log.db") as log:
        log.record_round(_round(3))
        assert log.count() == 6


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from pathlib import Path
    from tandemspec.edge.devicelog import DeviceLog, RoundRecord, TokenRecord
    log = DeviceLog(Path(sys.argv[1]), max_rows=500)
    r = 0
    while True:
        tokens = tuple(TokenRecord(i, False, True, np.full(64, r, np.float32)) for i in range(4))
        log.record_round(RoundRecord("s", r, "lossless", tokens, context_ids=tuple(range(200))))
        r += 1
        if r == 50:
            print("ready", flush=True)
    """
)


def test_killed_writer_leaves_an_intact_database(tmp_path: Path) -> None:
    """SIGKILL a process that is committing rounds in a loop: the file opens, passes
    ``integrity_check``, and holds whole rounds only."""
    path = tmp_path / "log.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let it write (and prune) for a while
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with DeviceLog(path, max_rows=500) as log:
        count = log.count()
        rounds = list(log.iter_rounds())
        log.record_round(_round(0, n=4, dim=64))  # and it stays writable
        assert log.count() == min(count + 4, 500)
    assert 200 <= count <= 500 and count % 4 == 0  # whole rounds: 4 tokens each
    assert all(len(r.tokens) == 4 and r.context_ids == tuple(range(200)) for r in rounds)
