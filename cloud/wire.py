"""Parsing edge frames from raw bytes, so that malformed input is INVALID_ARGUMENT, not INTERNAL.

``Decode`` is registered with no request deserializer: a protobuf ``DecodeError`` raised
inside gRPC's own deserializer would end the call with INTERNAL and no message the edge can
act on. A known field sent with the wrong wire type does not fail protobuf parsing (it is
kept as an unknown field), so that is checked here too. Unknown field *numbers* are
allowed: newer edges may send fields this server does not know.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from tandemspec.cloud.session import invalid
from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2 as pb


def parse_edge_frame(raw: bytes) -> codec.EdgeMessage:
    """Bytes -> a domain edge message; raises ``SessionError`` (INVALID_ARGUMENT) on bad input."""
    try:
        frame = pb.EdgeFrame.FromString(raw)
    except DecodeError as error:
        raise invalid(f"malformed EdgeFrame ({len(raw)} bytes): {error}") from error
    wrong = wrongly_typed_fields(frame)
    if wrong:
        raise invalid(f"field {wrong[0]} has the wrong wire type")
    try:
        return codec.decode_edge_frame(frame)
    except codec.CodecError as error:
        raise invalid(f"invalid EdgeFrame: {error}") from error


def wrongly_typed_fields(message: Message, path: str = "") -> list[str]:
    """Known fields that arrived with a wrong wire type (kept by protobuf as unknown), recursively."""
    descriptor = message.DESCRIPTOR
    path = path or descriptor.name
    found = [
        f"{path}.{descriptor.fields_by_number[field.field_number].name}"
        for field in UnknownFieldSet(message)
        if field.field_number in descriptor.fields_by_number
    ]
    for field_descriptor, value in message.ListFields():
        if field_descriptor.message_type is None:
            continue
        children = value if field_descriptor.is_repeated else [value]
        for child in children:
            found.extend(wrongly_typed_fields(child, f"{path}.{field_descriptor.name}"))
    return found
