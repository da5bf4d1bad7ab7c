#!/usr/bin/env python3
"""Container health checks: ``tandem-healthcheck grpc HOST:PORT [SERVICE]`` or ``tandem-healthcheck http URL``.

Exit 0 when the gRPC health service answers SERVING (or the URL answers 2xx), else 1.
Installed into every image as ``/usr/local/bin/tandem-healthcheck``; the Dockerfiles'
HEALTHCHECK lines call it with the address the container's service listens on.
"""

from __future__ import annotations

import sys
import urllib.request


def check_grpc(address: str, service: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=3)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as reply:
        return 200 <= reply.status < 300


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "grpc":
        ok = check_grpc(argv[1], argv[2] if len(argv) > 2 else "")
    elif len(argv) == 2 and argv[0] == "http":
        ok = check_http(argv[1])
    else:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as error:  # any failure to get an answer is "unhealthy", said on stderr
        print(f"unhealthy: {error}", file=sys.stderr)
        sys.exit(1)
