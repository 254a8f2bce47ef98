#!/usr/bin/env python3
"""Read-only API load from outside Rust: many threads calling one AgentService method at once.

    load.py HOST:PORT METHOD THREADS SECONDS [REQUEST_JSON]

METHOD is a unary method (ListJobs, GetStatus, GetJob: called in a loop by each thread) or a
streaming one (WatchJobs, WatchJob: each thread holds one stream open until the end); REQUEST_JSON
its request in proto3 JSON (default {}).
Message types come from server reflection (nothing generated). Prints one JSON object: calls,
errors by status code, and latency percentiles in milliseconds.
"""
import json
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main() -> int:
    target, method_name, threads, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    request_json = sys.argv[5] if len(sys.argv) > 5 else "{}"
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=10)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("hyperfarm.v1.AgentService").FindMethodByName(method_name)
    request_cls = GetMessageClass(method.input_type)
    response_cls = GetMessageClass(method.output_type)
    request = json_format.Parse(request_json, request_cls())
    call = channel.unary_unary(
        f"/hyperfarm.v1.AgentService/{method_name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    lock = threading.Lock()
    latencies = []
    errors = {}
    deadline = time.monotonic() + seconds

    streaming = method.server_streaming

    def watcher():
        # One stream per thread, held open until the deadline (a watch-stream flood).
        try:
            t0 = time.monotonic()
            stream = channel.unary_stream(
                f"/hyperfarm.v1.AgentService/{method_name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )(request, timeout=seconds + 30)
            next(stream)
            with lock:
                latencies.append((time.monotonic() - t0) * 1000)
            for _ in stream:
                if time.monotonic() >= deadline:
                    break
            stream.cancel()
        except grpc.RpcError as e:
            with lock:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    def worker():
        if streaming:
            return watcher()
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                call(request, timeout=60)
                with lock:
                    latencies.append((time.monotonic() - t0) * 1000)
            except grpc.RpcError as e:
                with lock:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1

    pool_threads = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool_threads:
        t.start()
    for t in pool_threads:
        t.join(timeout=seconds + 90)
    latencies.sort()

    def pct(p):
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))], 1) if latencies else None

    print(json.dumps({
        "calls": len(latencies),
        "errors": errors,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1], 1) if latencies else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
