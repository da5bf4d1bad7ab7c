"""Federated rounds on a tiny fleet: ClientApp handlers on Flower Messages, publishing, losslessness, a simulation.

The fleet is three devices (numpy, setuptools, scipy sources) decoding through a verifier
on the tiny llama pair of tests/conftest.py; the starting bundle's gate is trained
centrally on the pooled logs, as ``tandem gate train`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata

from tandemspec.edge.bundle import load_bundle, sha256_file
from tandemspec.edge.devicelog import DeviceLog
from tandemspec.federated.fed.client_app import curve_reply, evaluate_reply, train_reply
from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.evaluate import EvalConfig
from tandemspec.federated.fed.fleet import FleetConfig, build_fleet, read_fleet
from tandemspec.federated.fed.publish import (
    CURRENT_NAME,
    RELEASE_NAME,
    VERSIONS_DIR,
    current_release,
    publish_version,
    stage_version,
)
from tandemspec.federated.fed.tasks import THRESHOLD_GRID, LocalTrainConfig
from tandemspec.federated.fed.weights import flat_numpy, from_arrays
from tandemspec.net import free_port

NUM_DEVICES = 3
TINY_DRAFTER_NOISE = 0.05  # tests/conftest.py's DRAFTER_NOISE: the drafter tiny_bundle_dir("llama") exports


@pytest.fixture(scope="module")
def fed_pair(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[..., Path],
             tiny_bundle_dir: Callable[..., Path]) -> Path:  # fmt: skip
    """target/, drafter/ and edge/ (with a gate trained on a first fleet's pooled logs)."""
    from tandemspec.federated.gate import TrainConfig, read_logs, train_gate, write_gate

    pair = tmp_path_factory.mktemp("fed-pair")
    (pair / "target").symlink_to(tiny_model_dir("llama", 0))
    (pair / "drafter").symlink_to(tiny_model_dir("llama", 1, TINY_DRAFTER_NOISE))
    shutil.copytree(tiny_bundle_dir("llama"), pair / "edge")
    seed_fleet = tmp_path_factory.mktemp("seed-fleet")
    devices = build_fleet(_fleet_config(seed_fleet, pair, seed=7, gated_share=0.0))  # no gate yet
    features, labels, groups = read_logs([d.log_path(seed_fleet) for d in devices])
    write_gate(train_gate(features, labels, groups, TrainConfig(steps=100, hidden_units=8)), pair / "edge")
    return pair


def _fleet_config(out: Path, pair: Path, seed: int = 0, gated_share: float = 0.25) -> FleetConfig:
    return FleetConfig(
        out_dir=out, target_dir=pair / "target", bundle_dir=pair / "edge", num_devices=NUM_DEVICES, num_prompts=4,
        num_heldout=2, gated_share=gated_share, max_new_tokens=16, return_top_k=8, seed=seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, fed_pair: Path) -> Path:
    out = tmp_path_factory.mktemp("fleet")
    build_fleet(_fleet_config(out, fed_pair))
    return out


def _config(fleet: Path, pair: Path, out: Path) -> FedConfig:
    return FedConfig(
        fleet_dir=fleet,
        out_dir=out,
        pair_dir=pair,
        local=LocalTrainConfig(gate_steps=30, distill_steps=3, distill_batch=4),
        evaluation=EvalConfig(max_new_tokens=12),
    )


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(
        run_id=1, message_id="in", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=600.0, message_type=message_type,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def _context(config: FedConfig, partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition, "num-partitions": NUM_DEVICES},
        state=RecordDict(),
        run_config=config.to_run_config(),
    )


def test_fleet_is_non_iid_and_logs_what_training_needs(fleet: Path) -> None:
    """Devices of two clusters, each with its own log holding labels, top-k and contexts, and held-out prompts."""
    devices = read_fleet(fleet)
    assert len(devices) == NUM_DEVICES and len({d.cluster for d in devices}) == 2
    assert len({d.package for d in devices}) == NUM_DEVICES
    for device in devices:
        with DeviceLog(device.log_path(fleet)) as log:
            rounds = list(log.iter_rounds())
            assert log.count() == device.num_tokens
        assert {r.mode for r in rounds} == {"lossless", "gated"}
        assert all(r.context_ids is not None and len(r.context_ids) >= r.position for r in rounds)
        assert all(t.target_top_k is not None for r in rounds for t in r.tokens)
        heldout = [json.loads(line)["prompt"] for line in device.heldout_path(fleet).read_text().splitlines()]
        assert len(heldout) == 2


def test_client_handlers_on_messages(fleet: Path, fed_pair: Path, tmp_path: Path) -> None:
    """train/curve/evaluate replies, built from Flower Messages and Contexts as Flower tests its own apps."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.federated.fed.server_app import initial_arrays

    config = _config(fleet, fed_pair, tmp_path / "out")
    arrays = initial_arrays(config)
    device = read_fleet(fleet)[1]
    with DeviceLog(device.log_path(fleet)) as log:
        num_tokens = log.count()

    train = train_reply(
        _message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), "train"),
        _context(config, 1),
        config,
    )
    metrics = train.content["metrics"]
    assert metrics["num-examples"] == num_tokens
    assert metrics["gate-loss-after"] < metrics["gate-loss-before"]
    assert np.isfinite(metrics["distill-loss-last"]) and metrics["num-distill-examples"] > 0
    assert train.content["device"]["name"] == device.name
    updated = flat_numpy(train.content["arrays"])
    assert set(updated) == set(flat_numpy(arrays))
    assert any(not np.array_equal(updated[k], v) for k, v in flat_numpy(arrays).items() if k.startswith("drafter."))

    curve = curve_reply(
        _message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), "evaluate.curve"),
        _context(config, 1),
        config,
    ).content["metrics"]
    assert len(curve["missed"]) == len(THRESHOLD_GRID) and curve["num-examples"] == num_tokens
    assert curve["checks"][0] < curve["checks"][-1]  # t = 0 trusts (almost) all, t = 1 doubts (almost) all

    server = serve_in_thread(CloudConfig(model_dir=fed_pair / "target", host="127.0.0.1", port=0))
    try:
        settings = ConfigRecord(
            {"bundle-dir": str(fed_pair / "edge"), "cloud": server.address, "thresholds": json.dumps({"": 0.5})}
        )
        evaluation = evaluate_reply(
            _message(RecordDict({"config": settings}), "evaluate"), _context(config, 1), config
        ).content["metrics"]
    finally:
        server.stop()
    assert evaluation["num_prompts"] == 2 and evaluation["lossless_tokens"] == 2 * 12
    assert evaluation["gated_tokens"] == 2 * 12 and evaluation["threshold"] == 0.5
    assert 1 <= evaluation["lossless_committed"] / evaluation["lossless_rounds"] <= 5  # k = 4 plus the bonus
    # scored by the pair's target (the drafter alone may stop early at its end-of-text token)
    assert 0 < evaluation["local_tokens"] <= 2 * 12
    assert all(np.isfinite(evaluation[k]) and evaluation[k] > 0 for k in ("nll_lossless", "nll_gated", "nll_local"))


def test_refreshed_features_follow_the_drafter(fleet: Path, fed_pair: Path, tmp_path: Path) -> None:
    """The logging drafter reproduces the logged features; a distilled one moves them; the apps use them."""
    from safetensors.numpy import load_file

    from tandemspec.federated.fed.server_app import initial_arrays
    from tandemspec.federated.fed.tasks import read_local, refresh_features

    device = read_fleet(fleet)[0]
    data = read_local(device.log_path(fleet))
    state = load_file(str(fed_pair / "drafter" / "model.safetensors"))
    same = refresh_features(device.log_path(fleet), fed_pair / "drafter", state, data)
    assert same.features.shape == data.features.shape and np.array_equal(same.labels, data.labels)
    np.testing.assert_allclose(same.features, data.features, atol=1e-3)  # ONNX Runtime vs eager torch
    moved = {k: v * 1.5 if v.ndim == 2 else v for k, v in state.items()}
    assert np.abs(refresh_features(device.log_path(fleet), fed_pair / "drafter", moved, data).features
                  - data.features).max() > 1e-2  # fmt: skip

    config = _config(fleet, fed_pair, tmp_path / "out")
    config = replace(config, local=replace(config.local, refresh_features=True))
    arrays = initial_arrays(config)
    train = train_reply(
        _message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), "train"),
        _context(config, 0),
        config,
    ).content["metrics"]
    assert train["gate-loss-after"] < train["gate-loss-before"]
    curve = curve_reply(
        _message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), "evaluate.curve"),
        _context(config, 0),
        config,
    ).content["metrics"]
    assert curve["num-examples"] == len(data.labels)
    gate_only = type(arrays)({k: v for k, v in arrays.items() if k.startswith("gate.")})
    with pytest.raises(ValueError, match="no drafter weights"):
        curve_reply(_message(RecordDict({"arrays": gate_only, "config": ConfigRecord({"server-round": 1})}),
                             "evaluate.curve"), _context(config, 0), config)  # fmt: skip


def test_sweep_compares_bundles_at_equal_measured_quality(fleet: Path, fed_pair: Path, tmp_path: Path) -> None:
    """``fed sweep``: trusting nothing reproduces the target (match 1, quality recovered 1) at the most passes."""
    from tandemspec.cli import main

    out = tmp_path / "sweep"
    args = ["fed", "sweep", "--fleet", str(fleet), "--bundle", f"start={fed_pair / 'edge'}", "--thresholds",
            "0,0.5,1", "--match-floor", "0.999", "--pair", str(fed_pair), "--out", str(out),
            "--max-new-tokens", "12"]  # fmt: skip
    assert main(args) == 0
    points = json.loads((out / "sweep.json").read_text())["bundles"]["start"]
    trust_all, doubt_all = points["0.0000"], points["1.0000"]
    assert doubt_all["gated-match"] == 1.0 and doubt_all["quality-recovered"] == pytest.approx(1.0)
    assert trust_all["gated-passes-per-token"] < doubt_all["gated-passes-per-token"]
    assert trust_all["accepted-length"] == doubt_all["accepted-length"]  # one lossless decoding per bundle
    assert "1.00 (cheapest at the floor)" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0
    assert main([*args[:7], "0.5,x", *args[8:]]) == 2  # a malformed grid is refused, not a traceback


def test_published_versions_chain_and_stay_lossless(fleet: Path, fed_pair: Path, tmp_path: Path) -> None:
    """Two versions: parent chain, current symlink, hashes; the published drafter decodes the target's greedy text."""
    import torch
    from transformers import AutoModelForCausalLM

    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.edge.decoder import GenerationRequest
    from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime
    from tandemspec.federated.fed.server_app import initial_arrays

    config = _config(fleet, fed_pair, tmp_path / "out")
    model = from_arrays(initial_arrays(config))
    # A changed drafter (as after a round), so the published one is not the one the pair shipped.
    rng = np.random.default_rng(0)
    model = replace(model, drafter={k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                                    for k, v in model.drafter.items()})  # fmt: skip
    out = config.out_dir
    for round_number in (0, 1):
        staged = stage_version(out, model, fed_pair / "edge", fed_pair / "drafter", None, {"": 0.5})
        publish_version(out, staged, round_number, {"accepted-length": 2.0}, {"": 0.5})
    release = current_release(out)
    assert release is not None and release.version == "v0002" and release.parent == "v0001"
    assert (out / CURRENT_NAME).resolve() == (out / VERSIONS_DIR / "v0002").resolve()
    for name, digest in release.files.items():
        assert sha256_file(out / CURRENT_NAME / name) == digest
    assert load_bundle(out / CURRENT_NAME).manifest.model_version == "v0002"  # verifies the manifest's hashes
    # A later run on the same --out starts from current's weights, not the pair's.
    resumed = from_arrays(initial_arrays(config))
    for key, value in model.drafter.items():
        np.testing.assert_array_equal(resumed.drafter[key], value)

    target = AutoModelForCausalLM.from_pretrained(fed_pair / "target", dtype=torch.float32).eval()
    server = serve_in_thread(CloudConfig(model_dir=fed_pair / "target", host="127.0.0.1", port=0, dtype="float32"))
    prompts = [json.loads(line)["prompt"] for d in read_fleet(fleet)[:2] for line in d.heldout_path(fleet).open()]
    try:
        edge = EdgeConfig(cloud=server.address, bundle=out / CURRENT_NAME, mode="lossless", draft_length=4,
                          pipeline=False)  # fmt: skip
        with EdgeRuntime(edge) as runtime:
            for prompt in prompts:
                ids = runtime.tokenizer.encode_prompt(prompt)
                got = runtime.decoder.generate(GenerationRequest(ids, max_new_tokens=16)).token_ids
                with torch.no_grad():  # transformers' own greedy decoding, stopping at end-of-text as the edge does
                    want = target.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
                assert list(got) == want[0, len(ids) :].tolist()
    finally:
        server.stop()


_PUBLISH_FOREVER = """
import sys
from pathlib import Path
from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.publish import clear_staging, publish_version, stage_version
from tandemspec.federated.fed.server_app import initial_arrays
from tandemspec.federated.fed.weights import from_arrays
pair, out = Path(sys.argv[1]), Path(sys.argv[2])
model = from_arrays(initial_arrays(FedConfig(pair_dir=pair, out_dir=Path(sys.argv[3]))))
clear_staging(out)
for round_number in range(100):
    staged = stage_version(out, model, pair / "edge", pair / "drafter", None, {"": 0.5})
    publish_version(out, staged, round_number, {}, {"": 0.5})
    print(round_number, flush=True)
"""


def _assert_complete(out: Path) -> None:
    for version in sorted((out / VERSIONS_DIR).iterdir()):
        release = json.loads((version / RELEASE_NAME).read_text())
        for name, digest in release["files"].items():
            assert sha256_file(version / name) == digest, f"{version.name}/{name}"
        load_bundle(version)
    if (out / CURRENT_NAME).exists():
        assert (out / CURRENT_NAME / RELEASE_NAME).is_file()


def test_killed_publisher_leaves_complete_versions_only(fed_pair: Path, tmp_path: Path) -> None:
    """SIGKILL a publisher at several moments: every version folder is complete, current names a complete one."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = [sys.executable, "-c", _PUBLISH_FOREVER, str(fed_pair), str(out), str(tmp_path / "unused")]
    for delay_s in (0.2, 1.3):
        child = subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        try:
            assert child.stdout is not None
            child.stdout.readline()  # one version published by this child: the next one is in flight
            time.sleep(delay_s)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        _assert_complete(out)
    assert current_release(out) is not None


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    yield home


def test_two_rounds_on_the_simulation_engine(fleet: Path, fed_pair: Path, tmp_path: Path, flwr_home: Path) -> None:
    """Round 0 and two rounds with 3 devices on Flower's simulation engine (Ray): history, versions, bytes."""
    from tandemspec.federated.fed.commands import simulate
    from tandemspec.federated.fed.server_app import HISTORY_NAME

    config = replace(_config(fleet, fed_pair, tmp_path / "out"), num_rounds=2, max_acceptance_drop=1.0)
    simulate(config, NUM_DEVICES)
    history = json.loads((config.out_dir / HISTORY_NAME).read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(r["accepted"] for r in history)  # the guard's tolerance is wide open here
    assert [r["version"] for r in history] == ["v0001", "v0002", "v0003"]
    assert all(r["num_updates"] == NUM_DEVICES and r["bytes_up_per_client"] > 0 for r in history[1:])
    assert all(r["metrics"]["num-prompts"] == 2 * NUM_DEVICES for r in history)
    assert set(history[1]["thresholds"]) == {"", "numeric", "tooling"}
    release = current_release(config.out_dir)
    assert release is not None and release.version == "v0003" and release.parent == "v0002"
    from tandemspec.federated.fed.report import write_report

    table = write_report(config.out_dir, plot=False).read_text().splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| 0 | v0001 | yes |")


@pytest.mark.slow
def test_flwr_run_on_a_local_superlink(fleet: Path, fed_pair: Path, tmp_path: Path, flwr_home: Path) -> None:
    """``flwr run .`` (pyproject's [tool.flwr.app]) on a simulation-mode SuperLink started and stopped here."""
    from tandemspec.federated.fed.server_app import HISTORY_NAME

    port, control = free_port(), free_port()
    flwr_home.mkdir(parents=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\noptions.num-supernodes = {NUM_DEVICES}\n'
        "options.backend.client-resources.num-cpus = 1\n"
    )
    superlink = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
         "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
         "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        _wait_healthy(port)
        settings = (
            f"fleet-dir='{fleet}' out-dir='{out}' pair-dir='{fed_pair}' num-rounds=1 local-distill-steps=2 "
            "local-gate-steps=20 evaluation-max-new-tokens=8"
        )
        repo = Path(__file__).parents[2]
        run = subprocess.run(
            ["flwr", "run", str(repo), "local", "--stream", "--run-config", settings],
            capture_output=True, text=True, timeout=540,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    finally:
        _stop(superlink)
    history = json.loads((out / HISTORY_NAME).read_text())
    assert [r["round"] for r in history] == [0, 1] and history[0]["version"] == "v0001"


def test_centralised_bound_trains_on_the_pooled_logs(fleet: Path, fed_pair: Path, tmp_path: Path) -> None:
    """``fed central``: round 0 and one pooled round, every device's held-out prompts decoded, nothing published."""
    from tandemspec.federated.fed.centralised import run_central

    config = replace(_config(fleet, fed_pair, tmp_path / "central"), num_rounds=1)
    history = run_central(config)
    assert [r.round for r in history] == [0, 1]
    assert all(r.metrics["num-prompts"] == 2 * NUM_DEVICES for r in history)
    assert set(history[1].cluster_metrics) == {"numeric", "tooling"}
    assert current_release(config.out_dir) is None


def _wait_healthy(port: int, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"nothing healthy on port {port}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_deployment_on_loopback(fleet: Path, fed_pair: Path, tmp_path: Path, flwr_home: Path) -> None:
    """SuperLink + one SuperNode per device on loopback; each SuperNode names its own log in --node-config."""
    from tandemspec.federated.fed.server_app import HISTORY_NAME

    devices = read_fleet(fleet)[:2]
    port = free_port()
    flwr_home.mkdir(parents=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    processes = [
        subprocess.Popen(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--control-api-address", f"127.0.0.1:{free_port()}", "--disable-runtime-dependency-installation",
             "--database", ":flwr-in-memory:"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    out = tmp_path / "out"
    try:
        _wait_healthy(port)
        for d in devices:
            node_config = (
                f"log-db='{d.log_path(fleet)}' heldout='{d.heldout_path(fleet)}' cluster='{d.cluster}' name='{d.name}'"
            )
            processes.append(
                subprocess.Popen(
                    ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                     "--port", str(free_port()), "--node-config", node_config],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        settings = (
            f"fleet-dir='{tmp_path / 'no-fleet'}' out-dir='{out}' pair-dir='{fed_pair}' num-rounds=1 "
            "local-distill-steps=2 local-gate-steps=20 evaluation-max-new-tokens=8"
        )
        run = subprocess.run(
            ["flwr", "run", str(Path(__file__).parents[2]), "local", "--stream", "--run-config", settings],
            capture_output=True, text=True, timeout=540,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    finally:
        for process in reversed(processes):
            _stop(process)
    history = json.loads((out / HISTORY_NAME).read_text())
    assert [r["round"] for r in history] == [0, 1] and history[1]["num_updates"] == len(devices)
    assert history[0]["metrics"]["num-prompts"] == 2 * len(devices)
