"""Load and faults on loopback: N edges through the link emulator against a pool of verifier replicas.

Starts ``--replicas`` ``tandem cloud serve`` processes on the reference target, one link
emulator in front of each (``--rtt-ms``), and ``--edges`` edge threads (each its own
drafter and its own pooled channel ``LINK1,LINK2,...``) generating the bench prompts back
to back in lossless greedy mode. Scenarios run one after the other, each ``--scenario-s``
long (the long stall's scenario lasts as long as the stall plus ten seconds):

- ``steady``: no fault; an edge *process* with a SQLite device log runs beside the load and
  is ``kill -9``-ed mid-write (the ``edge kill -9`` row: the log must reopen intact);
- ``replica kill -9 + restart``: replica 0 is killed at 25 % and restarted at 50 %;
- ``link stall 2 s`` and ``link stall 30 s``: every link holds its traffic (the second
  is longer than the edges' 20 s receive timeout: keepalive must find the dead link first);
- ``link resets``: every connection is reset at 25, 50 and 75 %;
- ``poisoned update``: the federated guard rails (federated/fed/guard.py) screen honest
  updates of the reference pair's gate and drafter with a NaN one and two out-of-norm ones.

Every generation is checked against an independent reference: the tokens up to the switch
to local must be the target's own greedy continuation (transformers ``generate``), the
tokens after it the drafter's greedy continuation of that prefix, and what was streamed
must be what was returned. Prints a Markdown table (and ``--out FILE.json``).

    python scripts/ops_faults.py --edges 16 --scenario-s 20
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ops_replicas import Replica

from tandemspec.bench.link import LinkConfig, LinkThread, run_in_thread
from tandemspec.bench.prompts import load_prompts
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.devicelog import DeviceLog
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.models import reference_dir

RECV_TIMEOUT_S = 20.0  # the edges' per-frame receive timeout (EdgeConfig's default)


@dataclass
class Generation:
    """One generation as an edge saw it."""

    edge: int
    prompt: int
    started: float
    ended: float
    token_ids: tuple[int, ...] = ()
    streamed_ok: bool = True
    finish_reason: str = ""
    fell_back: bool = False
    fallback_kind: str = ""
    fallback_reason: str = ""
    fallback_at: int = -1
    fallback_time: float | None = None  # when the first token after the switch arrived
    error: str = ""
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens so far)

    @property
    def tpot_s(self) -> float | None:
        if len(self.arrivals) < 2 or self.arrivals[-1][1] < 2:
            return None
        (t0, n0), (t1, n1) = self.arrivals[0], self.arrivals[-1]
        return (t1 - t0) / max(1, n1 - n0)


class Edge:
    """One device: a drafter, a pooled channel, generating until told to stop."""

    def __init__(self, index: int, address: str, prompts: list[tuple[int, ...]], max_new: int) -> None:
        bundle = load_bundle(reference_dir() / "edge")
        self.tokenizer = EdgeTokenizer.from_bundle(bundle)
        drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=1))
        self.client = VerifierClient(ClientConfig(address=address, recv_timeout_s=RECV_TIMEOUT_S))
        self.decoder = HybridDecoder(drafter, self.tokenizer, self.client, DecoderConfig(mode="lossless"))
        self.index = index
        self.prompts = prompts
        self.max_new = max_new
        self.turn = index

    def run(self, until: threading.Event, out: list[Generation]) -> None:
        while not until.is_set():
            prompt = self.turn % len(self.prompts)
            self.turn += 1
            out.append(self.generate_one(prompt))

    def generate_one(self, prompt: int) -> Generation:
        record = Generation(edge=self.index, prompt=prompt, started=time.monotonic(), ended=0.0)
        streamed: list[int] = []

        def on_tokens(ids: list[int], text: str) -> None:
            streamed.extend(ids)
            record.arrivals.append((time.monotonic(), len(streamed)))

        request = GenerationRequest(prompt_ids=self.prompts[prompt], max_new_tokens=self.max_new)
        try:
            result = self.decoder.generate(request, on_tokens)
        except Exception as error:  # counted by kind in the table; the edge goes on
            record.error = type(error).__name__
            record.ended = time.monotonic()
            return record
        s = result.stats
        record.ended = time.monotonic()
        record.token_ids = result.token_ids
        record.streamed_ok = tuple(streamed) == result.token_ids
        record.finish_reason = result.finish_reason
        record.fell_back = s.fell_back_to_local
        record.fallback_kind = s.fallback_kind
        record.fallback_reason = s.fallback_reason
        record.fallback_at = s.fallback_at_token
        if s.fell_back_to_local:
            record.fallback_time = next((t for t, n in record.arrivals if n > s.fallback_at_token), record.ended)
        return record


def error_kind(g: Generation) -> str | None:
    """A short name for what went wrong in a generation (None: nothing)."""
    if g.error:
        return f"exception {g.error}"
    if not g.fell_back:
        return None
    reason = g.fallback_reason
    if g.fallback_kind == "busy":
        return "busy"
    if "next attempt" in reason:
        return "backing off"
    if "no answer from the verifier" in reason:
        return "receive timeout"
    if "cannot reach" in reason:
        return "connect failed"
    match = re.search(r"stream broke: (\w+)", reason)
    return f"stream broke {match.group(1)}" if match else "unavailable"


class Reference:
    """Independent expected outputs: the target's greedy continuation (transformers) and the drafter's."""

    def __init__(self, prompts: list[tuple[int, ...]], max_new: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(reference_dir() / "target", dtype=torch.float32).eval()
        self.prompts = prompts
        self.max_new = max_new
        self.target = [self._greedy(p, max_new) for p in prompts]
        bundle = load_bundle(reference_dir() / "edge")
        drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=1))
        self.local = HybridDecoder(drafter, EdgeTokenizer.from_bundle(bundle), None, DecoderConfig(mode="local"))

    def _greedy(self, prompt: tuple[int, ...], max_new: int) -> tuple[int, ...]:
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
        return tuple(int(t) for t in out[0, len(prompt) :])

    def bad_tokens(self, g: Generation) -> int:
        """Tokens lost, duplicated or wrong in ``g`` against the reference (0 = exact)."""
        if g.error:
            return 0  # no output to judge; counted as an error
        k = g.fallback_at if g.fell_back else len(g.token_ids)
        expected = list(self.target[g.prompt][:k])
        if g.fell_back:
            rest = self.local.generate(
                GenerationRequest(prompt_ids=self.prompts[g.prompt] + g.token_ids[:k], max_new_tokens=self.max_new - k)
            )
            expected += rest.token_ids
        got = list(g.token_ids)
        if g.finish_reason == "stop":  # an end-of-text: compare what was produced
            expected = expected[: len(got)]
        wrong = sum(a != b for a, b in zip(got, expected, strict=False)) + abs(len(got) - len(expected))
        return wrong + (0 if g.streamed_ok else len(got))


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(values, q)), 1) if values else None


def summarise(name: str, gens: list[Generation], reference: Reference, rss: tuple[list, list], note: str) -> dict:
    kinds = collections.Counter(k for g in gens if (k := error_kind(g)) is not None)
    tpots = [t for g in gens if (t := g.tpot_s) is not None]
    return {
        "scenario": name,
        "generations": len(gens),
        "errors": dict(kinds),
        "fallbacks": sum(g.fell_back for g in gens),
        "bad_tokens": sum(reference.bad_tokens(g) for g in gens),
        "tokens": sum(len(g.token_ids) for g in gens),
        "rss_start_mb": rss[0],
        "rss_end_mb": rss[1],
        "tpot_p50_ms": percentile_ms(tpots, 50),
        "tpot_p99_ms": percentile_ms(tpots, 99),
        "note": note,
    }


def peak_concurrency(gens: list[Generation]) -> int:
    """The most generations in flight at one moment."""
    events = sorted([(g.started, 1) for g in gens] + [(g.ended, -1) for g in gens])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def total_row(rows: list[dict[str, Any]], gens: list[Generation], load_s: float, edges: int) -> dict[str, Any]:
    """All load scenarios together: how long the edges ran and how many at once."""
    load_rows = [r for r in rows if isinstance(r["bad_tokens"], int)]
    errors: collections.Counter[str] = collections.Counter()
    for r in load_rows:
        errors.update(r["errors"])
    tpots = [t for g in gens if (t := g.tpot_s) is not None]
    return {
        "scenario": "all load scenarios", "generations": len(gens), "errors": dict(errors),
        "fallbacks": sum(r["fallbacks"] for r in load_rows), "bad_tokens": sum(r["bad_tokens"] for r in load_rows),
        "tokens": sum(r["tokens"] for r in load_rows), "rss_start_mb": load_rows[0]["rss_start_mb"],
        "rss_end_mb": load_rows[-1]["rss_end_mb"], "tpot_p50_ms": percentile_ms(tpots, 50),
        "tpot_p99_ms": percentile_ms(tpots, 99),
        "note": f"{edges} edges under load for {load_s:.0f} s; at most {peak_concurrency(gens)} generations at once",
    }  # fmt: skip


def run_load(edges: list[Edge], duration_s: float, faults: list[tuple[float, Any]]) -> list[Generation]:
    """Every edge generates for ``duration_s``; ``faults`` are (fraction of the duration, action)."""
    stop = threading.Event()
    outs: list[list[Generation]] = [[] for _ in edges]
    threads = [threading.Thread(target=e.run, args=(stop, outs[i]), daemon=True) for i, e in enumerate(edges)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for at, action in sorted(faults, key=lambda f: f[0]):
        time.sleep(max(0.0, start + at * duration_s - time.monotonic()))
        action()
    time.sleep(max(0.0, start + duration_s - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join()
    return [g for out in outs for g in out]


def edge_child_main(address: str, log_path: Path, max_new: int) -> None:
    """The ``edge kill -9`` subject: generate with a device log until killed; one line per generation."""
    bundle = load_bundle(reference_dir() / "edge")
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    client = VerifierClient(ClientConfig(address=address, recv_timeout_s=RECV_TIMEOUT_S))
    log = DeviceLog(log_path)
    decoder = HybridDecoder(
        OnnxDrafter(bundle, DrafterOptions(intra_op_threads=1)), tokenizer, client, DecoderConfig(), log
    )
    prompts = [tokenizer.encode_prompt(p) for p in load_prompts()]
    for turn in range(10**6):
        decoder.generate(GenerationRequest(prompt_ids=prompts[turn % len(prompts)], max_new_tokens=max_new))
        print("generated", flush=True)


def count_rounds(log_path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{log_path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:
        return 0


def check_killed_log(log_path: Path) -> dict[str, Any]:
    """Reopen a log whose writer was killed: integrity, rounds without tokens, and that it takes writes again."""
    with sqlite3.connect(str(log_path)) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rounds = db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
        tokens = db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]
        empty = db.execute(
            "SELECT COUNT(*) FROM rounds r WHERE NOT EXISTS (SELECT 1 FROM tokens t WHERE t.round_id = r.id)"
        ).fetchone()[0]
    with DeviceLog(log_path) as log:
        readable = sum(1 for _ in log.iter_rounds())
    return {"integrity": integrity, "rounds": rounds, "tokens": tokens, "rounds_without_tokens": empty,
            "rounds_read_back": readable}  # fmt: skip


def edge_kill_scenario(address: str, max_new: int, workdir: Path, min_rounds: int = 20) -> dict[str, Any]:
    """Start the edge child, wait until it has logged ``min_rounds``, ``kill -9`` it while it writes."""
    log_path = workdir / "device-log.sqlite"
    command = [sys.executable, __file__, "edge-child", "--address", address, "--log", str(log_path)]
    command += ["--max-new-tokens", str(max_new)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    generations = [0]

    def count() -> None:
        assert child.stdout is not None
        for _ in child.stdout:
            generations[0] += 1

    threading.Thread(target=count, daemon=True).start()
    deadline = time.monotonic() + 120
    while count_rounds(log_path) < min_rounds and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    before = count_rounds(log_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    result = check_killed_log(log_path)
    result.update(generations_before_kill=generations[0], rounds_seen_before_kill=before)
    return result


def poisoned_update_scenario(factor: float) -> dict[str, Any]:
    """The guard rails on the reference pair's real weights: 3 honest updates, NaN, x100 gate, x100 drafter."""
    from safetensors.numpy import load_file

    from tandemspec.federated.fed.guard import screen_updates
    from tandemspec.federated.fed.weights import DRAFTER_PREFIX, GATE_PREFIX, gate_arrays, read_gate_onnx, trainable

    reference = {GATE_PREFIX + k: v for k, v in gate_arrays(read_gate_onnx(reference_dir() / "edge/gate.onnx")).items()}
    drafter = load_file(str(reference_dir() / "drafter/model.safetensors"))
    reference.update({DRAFTER_PREFIX + k: v.astype(np.float32) for k, v in drafter.items()})
    rng = np.random.default_rng(0)

    def honest() -> dict[str, np.ndarray]:  # a local step's change: 0.1 % of each trained tensor's scale
        return {
            k: v + 1e-3 * (np.abs(v).mean() + 1e-8) * rng.standard_normal(v.shape, np.float32) if trainable(k) else v
            for k, v in reference.items()
        }

    updates = [honest() for _ in range(3)]
    nan = honest()
    key = next(k for k in nan if k.startswith(DRAFTER_PREFIX))
    nan[key] = nan[key].copy()
    nan[key].flat[0] = np.nan
    gate_blown, drafter_blown = honest(), honest()
    for blown, prefix in ((gate_blown, GATE_PREFIX), (drafter_blown, DRAFTER_PREFIX)):
        for k in blown:
            if k.startswith(prefix) and trainable(k):
                blown[k] = reference[k] + 100 * (blown[k] - reference[k])
    screening = screen_updates([*updates, nan, gate_blown, drafter_blown], reference, factor)
    return {"kept": list(screening.kept), "rejected": {str(k): v for k, v in screening.rejected.items()}}


def static_row(name: str, generations: Any, failed: bool, note: str) -> dict[str, Any]:
    """A table row for a scenario that is not a load run."""
    return {
        "scenario": name, "generations": generations, "errors": {"failed": 1} if failed else {}, "fallbacks": "-",
        "bad_tokens": "-", "rss_start_mb": [], "rss_end_mb": [], "tpot_p50_ms": None, "tpot_p99_ms": None,
        "note": note,
    }  # fmt: skip


def edge_kill_row(k: dict[str, Any]) -> dict[str, Any]:
    note = (
        f"SQLite integrity_check {k['integrity']}; {k['rounds']} rounds / {k['tokens']} tokens survive, "
        f"{k['rounds_without_tokens']} rounds without tokens, {k['rounds_read_back']} read back by DeviceLog"
    )
    damaged = k["integrity"] != "ok" or k["rounds_without_tokens"] > 0 or k["rounds_read_back"] != k["rounds"]
    return static_row("edge kill -9 mid-write (device log)", k["generations_before_kill"], damaged, note)


def poisoned_row(p: dict[str, Any]) -> dict[str, Any]:
    rejected = "; ".join(f"{k}: {v}" for k, v in p["rejected"].items())
    note = f"guard.screen_updates kept {p['kept']} of 0-5 (0-2 honest); rejected {rejected}"
    return static_row("poisoned federated update", "-", p["kept"] != [0, 1, 2], note)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("edge-child")
    child.add_argument("--address", required=True)
    child.add_argument("--log", type=Path, required=True)
    child.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--edges", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--scenario-s", type=float, default=20.0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--long-stall-s", type=float, default=30.0)  # longer than RECV_TIMEOUT_S
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--norm-factor", type=float, default=10.0)  # FedConfig's norm-factor default
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def fmt_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | generations | errors by kind | fallbacks | tokens lost or duplicated"
        " | verifier RSS MB start → end | TPOT p50 / p99 ms | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sides = (r["rss_start_mb"], r["rss_end_mb"])
        rss = (
            " → ".join("/".join("-" if m is None else f"{m:.0f}" for m in side) for side in sides) if sides[0] else "-"
        )
        tpot = "-" if r["tpot_p50_ms"] is None else f"{r['tpot_p50_ms']} / {r['tpot_p99_ms']}"
        lines.append(
            f"| {r['scenario']} | {r['generations']} | {fmt_errors(r['errors'])} | {r['fallbacks']} "
            f"| {r['bad_tokens']} | {rss} | {tpot} | {r['note']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.command == "edge-child":
        edge_child_main(args.address, args.log, args.max_new_tokens)
        return
    started = time.monotonic()
    tokenizer = EdgeTokenizer.from_bundle(load_bundle(reference_dir() / "edge"))
    prompts = [tokenizer.encode_prompt(p) for p in load_prompts()[: args.prompts]]
    reference = Reference(prompts, args.max_new_tokens)
    replicas = [Replica(reference_dir() / "target") for _ in range(args.replicas)]
    links: list[LinkThread] = []
    rows: list[dict[str, Any]] = []
    try:
        for replica in replicas:
            replica.start()
            links.append(run_in_thread("127.0.0.1", replica.port, LinkConfig(rtt_ms=args.rtt_ms)))
        pool = ",".join(link.address for link in links)
        edges = [Edge(i, pool, prompts, args.max_new_tokens) for i in range(args.edges)]

        def rss() -> list[float | None]:
            return [r.rss_mb() for r in replicas]

        every: list[Generation] = []
        load_s = 0.0

        def scenario(name: str, duration_s: float, faults: list[tuple[float, Any]], note: str = "") -> list[Generation]:
            nonlocal load_s
            before, start = rss(), time.monotonic()
            gens = run_load(edges, duration_s, faults)
            load_s += time.monotonic() - start
            every.extend(gens)
            rows.append(summarise(name, gens, reference, (before, rss()), note))
            print(json.dumps(rows[-1]), flush=True)
            return gens

        with tempfile.TemporaryDirectory() as workdir:
            killed: dict[str, Any] = {}

            def kill_edge() -> None:
                killed.update(edge_kill_scenario(pool, args.max_new_tokens, Path(workdir)))

            scenario("steady", args.scenario_s, [(0.1, kill_edge)])
        rows.append(edge_kill_row(killed))

        restart: dict[str, float] = {}
        scenario(
            "replica kill -9 + restart",
            args.scenario_s,
            [(0.25, replicas[0].kill), (0.5, lambda: restart.update(s=replicas[0].start()))],
            note="replica 0 killed at 25 %, restarted at 50 %",
        )
        rows[-1]["note"] += f" (ready again after {restart.get('s', float('nan')):.1f} s)"

        def stall_all(duration_ms: float) -> None:
            for link in links:
                link.stall(duration_ms)

        def reset_all() -> None:
            for link in links:
                link.reset()

        scenario("link stall 2 s", args.scenario_s, [(0.3, lambda: stall_all(2_000))])
        stall_at: dict[str, float] = {}

        def long_stall() -> None:
            stall_at["t"] = time.monotonic()
            for link in links:
                link.stall(args.long_stall_s * 1e3)

        gens = scenario(
            f"link stall {args.long_stall_s:.0f} s", args.long_stall_s + 10 + args.scenario_s * 0.3, [(0.2, long_stall)]
        )
        t = stall_at["t"]
        detect = sorted(
            g.fallback_time - t
            for g in gens
            if g.fell_back and g.fallback_time is not None and g.started < t < g.fallback_time and g.fallback_at > 0
        )
        if detect:
            rows[-1]["note"] = (
                f"dead link detected by {len(detect)} open sessions after {detect[0]:.1f} / "
                f"{detect[len(detect) // 2]:.1f} / {detect[-1]:.1f} s (min / median / max); receive timeout "
                f"{RECV_TIMEOUT_S:.0f} s"
            )
        scenario("link resets", args.scenario_s, [(f, reset_all) for f in (0.25, 0.5, 0.75)])
        rows.append(total_row(rows, every, load_s, args.edges))
        rows.append(poisoned_row(poisoned_update_scenario(args.norm_factor)))
        for edge in edges:
            edge.client.close()
    finally:
        for link in links:
            link.stop()
        for replica in replicas:
            replica.stop()
    command = "python scripts/ops_faults.py " + " ".join(sys.argv[1:])
    print(f"\n{command}  ({args.edges} edges, {args.replicas} replicas, rtt {args.rtt_ms:g} ms, "
          f"{time.monotonic() - started:.0f} s)\n")  # fmt: skip
    print(markdown(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"command": command, "args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                       indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
