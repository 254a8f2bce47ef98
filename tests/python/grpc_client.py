#!/usr/bin/env python3
"""A gRPC client outside Rust: Python's grpcio, with nothing generated from our .proto.

It lists the agent's services through server reflection, asks the standard health service,
then calls hyperfarm.v1.AgentService/GetStatus with message types built at run time from the
descriptors that reflection returned. Prints one JSON object.

    grpc_client.py HOST:PORT
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def list_services_v1(channel) -> list:
    """Ask the v1 reflection service (same messages as v1alpha, another package)."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return [s.name for r in responses for s in r.list_services_response.service]


def main() -> int:
    target = sys.argv[1]
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)

    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(set(db.get_services()) | set(list_services_v1(channel)))

    health = health_pb2_grpc.HealthStub(channel)
    overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    agent = health.Check(health_pb2.HealthCheckRequest(service="hyperfarm.v1.AgentService"), timeout=5)

    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("hyperfarm.v1.AgentService").FindMethodByName("GetStatus")
    request_cls = GetMessageClass(method.input_type)
    response_cls = GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/hyperfarm.v1.AgentService/GetStatus",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    status = call(request_cls(), timeout=5)

    print(json.dumps({
        "services": services,
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(overall.status),
        "health_agent_service": health_pb2.HealthCheckResponse.ServingStatus.Name(agent.status),
        "status": json_format.MessageToDict(status),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
