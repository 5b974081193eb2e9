"""Protobuf messages as the JSON documents `--json` prints.

Unlike `json_format.MessageToDict`: 64-bit integers stay numbers, enums print as their short
lower-case names (RPC_SERVER_STATE_RUNNING → "running"), and every field is present.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message


def enum_short_name(enum: EnumDescriptor, number: int) -> str:
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper() + "_"
    return value.name.removeprefix(prefix).lower()


def _value(field: Any, value: Any) -> Any:  # a FieldDescriptor of either protobuf backend
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_short_name(field.enum_type, value)
    return value


def message_to_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_value(field, item) for item in value]
        elif field.has_presence and field.type != FieldDescriptor.TYPE_MESSAGE and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out
