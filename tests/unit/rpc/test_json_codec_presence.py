"""the prpc JSON codec keeps field presence as upstream's prost/serde does: an unset singular
message is `null` (an `Option<Message>` that is `None`), never a default-filled object."""

from __future__ import annotations

import json

from pydstack.rpc.json_codec import json_to_message, message_to_json, message_to_obj
from pydstack.rpc.proto import kms_rpc_pb2 as kpb
from pydstack.rpc.proto import vmm_rpc_pb2 as pb


def test_an_unset_message_field_is_null():
    assert json.loads(message_to_json(pb.GetInfoResponse(found=False))) == {
        "found": False,
        "info": None,
    }
    brief = message_to_obj(pb.VmInfo(id="x", status="stopped"))
    assert brief["configuration"] is None
    assert message_to_obj(kpb.GetMetaResponse())["bootstrap_info"] is None


def test_a_set_message_field_is_an_object_even_when_empty():
    info = pb.VmInfo(id="x")
    info.configuration.SetInParent()
    obj = message_to_obj(pb.GetInfoResponse(found=True, info=info))
    assert obj["info"]["id"] == "x"
    assert obj["info"]["configuration"]["name"] == ""
    assert obj["info"]["configuration"]["gpus"] is None  # nested presence too
    assert obj["info"]["configuration"]["networking"] is None


def test_optional_scalars_and_repeated_fields_are_unchanged():
    obj = message_to_obj(pb.VmInfo(id="x"))
    assert obj["instance_id"] is None and obj["app_url"] is None
    assert obj["events"] == [] and obj["interfaces"] == []
    assert message_to_obj(pb.VmInfo(instance_id=""))["instance_id"] == ""


def test_null_round_trips_to_unset():
    msg = json_to_message(message_to_json(pb.GetInfoResponse(found=False)), pb.GetInfoResponse())
    assert not msg.HasField("info")
    info = pb.VmInfo(id="x")
    info.configuration.name = "web"
    back = json_to_message(message_to_json(info), pb.VmInfo())
    assert back.HasField("configuration") and back.configuration.name == "web"
    assert not back.configuration.HasField("gpus")


def test_a_map_is_a_json_object_with_text_keys() -> None:
    from pydstack.rpc.proto import gateway_rpc_pb2 as gpb

    msg = gpb.GlobalConnectionsStats(total_connections=3, node_connections={2: 1, 1: 2})
    assert message_to_obj(msg) == {"total_connections": 3, "node_connections": {"1": 2, "2": 1}}
    assert message_to_obj(gpb.GlobalConnectionsStats()) == {
        "total_connections": 0,
        "node_connections": {},
    }
