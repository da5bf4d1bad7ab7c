"""Bundle hot-swap: watch the bundle location, verify a newly published version, hand it over.

``tandem fed run`` publishes versions under ``OUT/versions/`` and moves the ``OUT/current``
link last (:mod:`tandemspec.federated.fed.publish`); ``tandem fed rollback`` moves it back.
An edge serving ``--bundle OUT/current`` polls where that link points (a stat of one link
and one manifest per poll). When it names another version folder, the candidate is
verified before a single request sees it:

1. *hashes*: every file against its sha256 in the manifest (:func:`~tandemspec.edge.bundle.load_bundle`);
2. *tokenizer*: the manifest's fingerprint against the connected verifier's (``Info``); a
   verifier that cannot be reached leaves the candidate unverified, and it is tried again
   at the next poll;
3. *smoke test*: the drafter and gate load in ONNX Runtime, a short greedy decode of a fixed
   prompt gives finite logits and hidden states, and the gate finite probabilities in [0, 1].

A verified candidate goes to ``on_swap`` (the API switches between requests; a request in
flight finishes on the version it started with). A refused one goes to ``on_refusal`` and
is kept as :attr:`BundleWatcher.refusal` (shown by ``/health``) until the location moves
again; the old version keeps serving, and a refused folder is not re-checked while the
location still names it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandemspec.edge.bundle import MANIFEST_NAME, BundleError, BundleManifest, load_bundle
from tandemspec.edge.client import CloudRefused, CloudUnavailable
from tandemspec.edge.features import token_features
from tandemspec.edge.gate import OnnxGate
from tandemspec.edge.runtime import EdgeRuntime, LoadedBundle

logger = logging.getLogger(__name__)

# Why a candidate was refused: a metric label each.
RefusalReason = Literal["bundle", "tokenizer", "smoke_test", "unverified"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = ("bundle", "tokenizer", "smoke_test", "unverified")
SMOKE_PROMPT = "def main():\n"
SMOKE_TOKENS = 4


class BundleRefused(Exception):
    """A candidate bundle failed one of the checks."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason
        self.message = message


@dataclass(frozen=True)
class Refusal:
    """A refused candidate: where it was, what it called itself, why, and when (Unix time)."""

    path: str
    version: str
    reason: RefusalReason
    message: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smoke_test(loaded: LoadedBundle) -> None:
    """A short greedy decode on the candidate's drafter (and its gate): raises ValueError on bad outputs."""
    drafter = loaded.drafter.fork()  # a cache of its own: the candidate's drafter stays warm and empty
    ids = list(loaded.tokenizer.encode_prompt(SMOKE_PROMPT))
    logits, hidden = drafter.reset(ids)  # [vocab], [hidden]
    rows_logits, rows_hidden = [logits], [hidden]
    for _ in range(SMOKE_TOKENS - 1):
        step_logits, step_hidden = drafter.extend([int(np.argmax(rows_logits[-1]))])
        rows_logits.append(step_logits[-1])
        rows_hidden.append(step_hidden[-1])
    all_logits, all_hidden = np.stack(rows_logits), np.stack(rows_hidden)  # [SMOKE_TOKENS, vocab / hidden]
    if not (np.isfinite(all_logits).all() and np.isfinite(all_hidden).all()):
        raise ValueError(f"the drafter gives non-finite outputs in a {SMOKE_TOKENS}-token greedy decode")
    gate_path = loaded.bundle.gate_path
    if gate_path is not None:
        features = token_features(all_logits, all_hidden, np.arange(SMOKE_TOKENS))
        p_accept = OnnxGate(gate_path).predict(features)  # [SMOKE_TOKENS]
        if not (np.isfinite(p_accept).all() and (p_accept >= 0).all() and (p_accept <= 1).all()):
            raise ValueError(f"the gate gives probabilities outside [0, 1]: {p_accept.tolist()}")


def verify_bundle(runtime: EdgeRuntime, path: Path) -> LoadedBundle:
    """Load and check the bundle at ``path`` for ``runtime``; raises :class:`BundleRefused`."""
    try:
        bundle = load_bundle(path)  # every file's sha256 against the manifest
    except BundleError as error:
        raise BundleRefused("bundle", str(error)) from error
    fingerprint = bundle.manifest.tokenizer_fingerprint
    if runtime.client is not None:
        try:
            info = runtime.client.ensure_connected()
        except (CloudUnavailable, CloudRefused) as error:
            raise BundleRefused("unverified", f"the verifier cannot be asked for its tokenizer: {error}") from error
        if info.tokenizer_fingerprint != fingerprint:
            raise BundleRefused(
                "tokenizer",
                f"its tokenizer {fingerprint} is not the verifier's {info.tokenizer_fingerprint} ({info.model_name})",
            )
    try:
        loaded = LoadedBundle(bundle, runtime.config, runtime.client, runtime.log)
        smoke_test(loaded)
    except Exception as error:  # ONNX Runtime's load errors are plain Exceptions: any failure refuses
        raise BundleRefused("smoke_test", f"smoke test failed: {error}") from error
    return loaded


def _version_of(path: Path) -> str:
    """What a candidate calls itself (its manifest's version), else its folder's name."""
    try:
        return BundleManifest.from_json((path / MANIFEST_NAME).read_text(encoding="utf-8")).version_label
    except (OSError, UnicodeDecodeError, BundleError):
        return path.name


_Key = tuple[str, int, int]


def _key(path: Path) -> _Key:
    """What identifies the bundle at ``path`` for the watcher: the folder and its manifest's mtime and size."""
    try:
        stat = (path / MANIFEST_NAME).stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), stat.st_mtime_ns, stat.st_size)


class BundleWatcher:
    """Polls ``runtime.bundle_location`` and verifies each new version it names (see the module docstring)."""

    def __init__(
        self,
        runtime: EdgeRuntime,
        serving: Path,
        on_swap: Callable[[LoadedBundle], None],
        on_refusal: Callable[[Refusal], None],
        interval_s: float,
    ) -> None:
        self.runtime = runtime
        self.location = runtime.bundle_location
        self.interval_s = interval_s
        self._on_swap = on_swap
        self._on_refusal = on_refusal
        self._serving = _key(serving)  # the folder being served
        self._seen = self._serving  # the folder last checked (served or refused)
        self.refusal: Refusal | None = None  # the last refusal, while the location still names it
        self._lock = threading.Lock()  # one check at a time (the thread and a test may both call check)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> LoadedBundle | Refusal | None:
        """Look once: a verified bundle (handed to ``on_swap``), a refusal, or None when nothing changed."""
        with self._lock:
            target = self.location.resolve()
            key = _key(target)
            if key == self._seen:
                return None
            if key == self._serving:  # back to what is served (e.g. a rollback past a refused version)
                self._seen, self.refusal = key, None
                return None
            try:
                loaded = verify_bundle(self.runtime, target)
            except BundleRefused as refused:
                refusal = Refusal(str(target), _version_of(target), refused.reason, refused.message, time.time())
                if refused.reason != "unverified":
                    self._seen = key  # checked again only once the location names another folder
                elif self.refusal is not None and self.refusal.path == refusal.path:
                    return self.refusal  # still unverified: reported once, tried again each poll
                self.refusal = refusal
                self._on_refusal(refusal)
                return refusal
            self._seen = self._serving = key
            self.refusal = None
            self._on_swap(loaded)
            return loaded

    def start(self) -> None:
        """Poll every ``interval_s`` on a daemon thread until :meth:`stop`."""
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tandem-bundle-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watcher's boundary: log, keep serving, look again next time
                logger.exception("checking the bundle location %s failed", self.location)
