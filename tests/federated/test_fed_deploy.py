"""Deployment: rollback of published versions, and a round on a SuperLink with TLS and SuperNode authentication.

The TLS test follows Flower 1.41's recipe (docs: how-to-enable-tls-connections,
how-to-authenticate-supernodes): a CA and a server certificate for 127.0.0.1 made here with
``cryptography``; the SuperLink serves TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``)
with ``--enable-supernode-auth``; each device's SuperNode has an ECDSA P-384 key in OpenSSH
format, registered with ``flwr supernode register`` and given by ``--auth-supernode-private-key``,
and trusts the CA with ``--root-certificates``. A SuperNode whose key was not registered
takes no part.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_fed_apps import fed_pair, fleet, flwr_home  # noqa: F401  (fixtures)

from tandemspec.edge.bundle import DRAFTER_NAME, load_bundle
from tandemspec.federated.fed.fleet import read_fleet
from tandemspec.federated.fed.publish import (
    CURRENT_NAME,
    VERSIONS_DIR,
    current_release,
    publish_version,
    published_versions,
    rollback,
)
from tandemspec.net import free_port

REPO = Path(__file__).parents[2]


# -- rollback -------------------------------------------------------------------------------


def _publish(out: Path, bundle: Path, work: Path, round_number: int) -> str:
    staged = work / f"build-{round_number}" / "bundle"
    shutil.copytree(bundle, staged)
    return publish_version(out, staged, round_number, {"accepted-length": float(round_number)}, {}).version


def test_rollback_repoints_current_and_the_next_version_names_it_as_parent(
    tiny_bundle_dir: Callable[..., Path], tmp_path: Path
) -> None:
    from tandemspec.cli import main

    out, bundle = tmp_path / "out", tiny_bundle_dir("llama")
    versions = [_publish(out, bundle, tmp_path, n) for n in (1, 2, 3)]
    assert versions == ["v0001", "v0002", "v0003"] == published_versions(out)
    assert main(["fed", "rollback", "--out", str(out), "--to", "v0002"]) == 0
    assert (out / CURRENT_NAME).resolve() == (out / VERSIONS_DIR / "v0002").resolve()
    assert not (out / CURRENT_NAME).readlink().is_absolute()  # the folder can move as a whole
    assert load_bundle(out / CURRENT_NAME).manifest.model_version == "v0002"
    assert _publish(out, bundle, tmp_path, 4) == "v0004"
    release = current_release(out)
    assert release is not None and (release.version, release.parent) == ("v0004", "v0002")
    assert [p.name for p in out.iterdir() if p.name.startswith(f".{CURRENT_NAME}")] == []  # no link left aside


def test_rollback_refuses_unknown_and_damaged_versions(
    tiny_bundle_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tandemspec.cli import main

    out, bundle = tmp_path / "out", tiny_bundle_dir("llama")
    for n in (1, 2):
        _publish(out, bundle, tmp_path, n)
    assert main(["fed", "rollback", "--out", str(out), "--to", "v0009"]) == 1
    assert "no published version 'v0009' (published: v0001, v0002)" in capsys.readouterr().err
    drafter = out / VERSIONS_DIR / "v0001" / DRAFTER_NAME
    drafter.write_bytes(drafter.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"cannot be served again.*sha256"):
        rollback(out, "v0001")
    assert (out / CURRENT_NAME).resolve().name == "v0002"  # current did not move
    assert main(["fed", "rollback", "--out", str(out)]) == 0  # no --to: the list
    assert capsys.readouterr().out.split("\n")[:2] == ["v0001", "v0002  <- current"]


# -- TLS and SuperNode authentication on loopback ------------------------------------------------


def _write_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandemspec test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def _write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair in OpenSSH format (as ``ssh-keygen -t ecdsa -b 384`` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def _wait_healthy_tls(port: int, ca: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", timeout=0.5, verify=str(ca)).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"nothing healthy over TLS on port {port}")


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A Flower process in a session of its own, so that stopping it also stops the SuperExec it starts."""
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this test started (then SIGKILL); the group id is the process id."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            os.killpg(process.pid, 0)  # children still running?
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
        time.sleep(1)


@pytest.mark.slow
def test_one_round_with_tls_and_supernode_auth_publishes_a_bundle(
    fleet: Path,  # noqa: F811
    fed_pair: Path,  # noqa: F811
    tmp_path: Path,
    flwr_home: Path,  # noqa: F811
) -> None:
    """SuperLink (TLS, SuperNode auth) + 2 registered SuperNodes, one unregistered: one round, v0001 published."""
    from tandemspec.federated.fed.server_app import HISTORY_NAME

    devices = read_fleet(fleet)[:2]
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, server_cert, server_key = _write_tls(certs)
    port = free_port()
    flwr_home.mkdir(parents=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n'
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = [
        _start(
            ["flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(server_cert),
             "--ssl-keyfile", str(server_key), "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
             "--control-api-address", f"127.0.0.1:{free_port()}", "--disable-runtime-dependency-installation",
             "--database", ":flwr-in-memory:"],
            logs / "superlink.log",
        )
    ]  # fmt: skip
    out = tmp_path / "out"
    try:
        _wait_healthy_tls(port, ca)
        keys = [_write_node_key(certs, f"node{i}") for i in range(len(devices) + 1)]
        for _, public in keys[: len(devices)]:  # the last key stays unregistered
            registered = subprocess.run(
                ["flwr", "supernode", "register", str(public), "local"], capture_output=True, text=True, timeout=120
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr
        nodes = [(d, key) for d, (key, _) in zip(devices, keys, strict=False)] + [(devices[0], keys[-1][0])]
        for i, (d, key) in enumerate(nodes):
            node_config = (
                f"log-db='{d.log_path(fleet)}' heldout='{d.heldout_path(fleet)}' cluster='{d.cluster}' name='{d.name}'"
            )
            processes.append(
                _start(
                    ["flower-supernode", "--root-certificates", str(ca), "--superlink", f"127.0.0.1:{port}",
                     "--auth-supernode-private-key", str(key), "--host", "127.0.0.1", "--port", str(free_port()),
                     "--node-config", node_config],
                    logs / f"supernode{i}.log",
                )
            )  # fmt: skip
        unregistered = processes[-1]
        settings = (
            f"fleet-dir='{tmp_path / 'no-fleet'}' out-dir='{out}' pair-dir='{fed_pair}' num-rounds=1 "
            "local-distill-steps=2 local-gate-steps=20 evaluation-max-new-tokens=8"
        )
        run = subprocess.run(
            ["flwr", "run", str(REPO), "local", "--stream", "--run-config", settings],
            capture_output=True, text=True, timeout=540,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        listed = subprocess.run(
            ["flwr", "supernode", "list", "local", "--format", "json"], capture_output=True, text=True, timeout=120
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        unregistered_exit = unregistered.wait(timeout=60)  # it gave up long ago: the SuperLink refused its key
    finally:
        for process in reversed(processes):
            _stop_group(process)
    history = json.loads((out / HISTORY_NAME).read_text())
    assert [r["round"] for r in history] == [0, 1] and history[1]["num_updates"] == len(devices)
    assert history[0]["metrics"]["num-prompts"] == 2 * len(devices)  # the unregistered node evaluated nothing
    # Round 0 publishes the starting model, round 1 its update unless the guard kept the previous one.
    newest = history[1]["version"] if history[1]["accepted"] else history[0]["version"]
    assert published_versions(out) == ["v0001", "v0002"][: 1 + history[1]["accepted"]]
    assert (out / CURRENT_NAME).resolve().name == newest
    assert load_bundle(out / CURRENT_NAME).manifest.model_version == newest  # every file matches its hash
    assert unregistered_exit != 0
    assert "Failed to activate SuperNode" in (logs / f"supernode{len(devices)}.log").read_text(errors="replace")
    superlink_log = (logs / "superlink.log").read_text(errors="replace")
    assert "Uvicorn running on https://127.0.0.1" in superlink_log, superlink_log[-2000:]
    nodes_listed = json.loads(listed.stdout)["nodes"]  # what the SuperLink admitted: the registered two
    assert len(nodes_listed) == len(devices) and {n["status"] for n in nodes_listed} == {"online"}
