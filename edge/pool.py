"""A pool of verifier replicas behind one gRPC channel: client-side ``round_robin`` with health checks.

A session is one ``Decode`` stream, and gRPC keeps a stream on the connection it started
on, so spreading *sessions* over replicas is exactly what gRPC's own client-side load
balancing does: the channel holds one connection per replica and each new call goes to
the next ready one. No proxy sits in the data path.

- ``--cloud 127.0.0.1:50051,127.0.0.1:50052`` (IP literals, comma-separated) becomes the
  static target ``ipv4:127.0.0.1:50051,127.0.0.1:50052``; ``[::1]:50051,[::1]:50052``
  becomes ``ipv6:...``. A single ``HOST:PORT`` and any other gRPC target
  (``dns:///verifiers.example:50051``, whose every address record is used) pass unchanged.
- ``healthCheckConfig`` turns on gRPC's client-side health checking: the channel watches
  each replica's ``grpc.health.v1`` status for the Verifier service, so a replica that
  reports ``NOT_SERVING`` (it is draining, cloud/server.py) gets no new sessions while its
  running ones finish; the GOAWAY its stop sends does the same for edges that have not
  heard yet, and a call refused by it is retried transparently on another replica.
- A replica that dies mid-session breaks only that stream: the decoder continues locally
  (edge/decoder.py) and, after the client's backoff, the next session goes to a live replica.
"""

from __future__ import annotations

import ipaddress
import json

from tandemspec.protos import tandem_pb2 as pb

VERIFIER_SERVICE = pb.DESCRIPTOR.services_by_name["Verifier"].full_name  # "tandemspec.v1.Verifier"
SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": VERIFIER_SERVICE}}
)


def channel_target(address: str) -> str:
    """The gRPC target for ``address``: one ``HOST:PORT``, a gRPC target URI, or a comma-separated list of IPs."""
    parts = [part.strip() for part in address.split(",")]
    if len(parts) == 1:
        if not parts[0]:
            raise ValueError("the verifier address is empty")
        return parts[0]
    families = {_ip_family(part, address) for part in parts}
    if len(families) > 1:
        raise ValueError(f"verifier pool {address!r} mixes IPv4 and IPv6 addresses: list one family")
    return f"{families.pop()}:{','.join(parts)}"


def channel_options() -> list[tuple[str, str]]:
    """Channel arguments that make one channel a pool: round_robin over replicas, health-checked."""
    return [("grpc.service_config", SERVICE_CONFIG)]


def _ip_family(part: str, address: str) -> str:
    host, sep, port = part.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"verifier pool {address!r}: {part!r} is not IP:PORT")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError as error:
        raise ValueError(
            f"verifier pool {address!r}: {host!r} is not an IP address; a list takes IP literals, "
            "for a host name whose records name the replicas use dns:///NAME:PORT"
        ) from error
    return "ipv4" if ip.version == 4 else "ipv6"
