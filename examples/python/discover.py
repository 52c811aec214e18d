#!/usr/bin/python3
"""Discovers Kiln's public API through gRPC server reflection and draws an image, with no .proto file.

    /usr/bin/python3 examples/python/discover.py "a red star" star.png

It uses grpcio's own reflection client (`grpcio-reflection`, which speaks grpc.reflection.v1alpha):
it lists the services, reads kiln.v1.ImageService's descriptors from the server, builds the
request and event classes from them, and calls Generate. Prints one `service: NAME` line per
service, then `completed: WIDTHxHEIGHT, N bytes` once the image is written.

Environment: KILN_GATEWAY (host:port, default 127.0.0.1:50051) and KILN_API_KEY (default: the
development key `kiln up` wrote to $KILN_DATA_DIR/dev-api-key, .kiln by default). Exit status: 0 on
success, 1 on a gRPC error, 2 on a usage or setup error.

Needs Debian's python3-grpcio and python3-protobuf, and `pip install --no-deps
grpcio-reflection==1.51.1` (the version of Debian's grpcio).
"""

import os
import pathlib
import sys

try:
    import grpc
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as missing:
    print(f"{missing}: apt-get install python3-grpcio python3-protobuf, then "
          "pip install --no-deps grpcio-reflection==1.51.1", file=sys.stderr)
    sys.exit(2)

SERVICE = "kiln.v1.ImageService"


def api_key():
    if os.environ.get("KILN_API_KEY"):
        return os.environ["KILN_API_KEY"]
    path = pathlib.Path(os.environ.get("KILN_DATA_DIR", ".kiln")) / "dev-api-key"
    try:
        return path.read_text().strip()
    except OSError:
        print(f"no KILN_API_KEY and no {path}: start `kiln up` first", file=sys.stderr)
        sys.exit(2)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    prompt, out = sys.argv[1], pathlib.Path(sys.argv[2])
    address = os.environ.get("KILN_GATEWAY", "127.0.0.1:50051").removeprefix("http://")
    channel = grpc.insecure_channel(address)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    for name in services:
        print(f"service: {name}")
    if SERVICE not in services:
        print(f"{SERVICE} is not among the services the server lists", file=sys.stderr)
        return 1
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName(SERVICE).methods_by_name["Generate"]
    factory = message_factory.MessageFactory(pool)
    request_class = factory.GetPrototype(method.input_type)
    event_class = factory.GetPrototype(method.output_type)
    generate = channel.unary_stream(
        f"/{SERVICE}/Generate",
        request_serializer=request_class.SerializeToString,
        response_deserializer=event_class.FromString,
    )
    metadata = [("authorization", f"Bearer {api_key()}")]
    for event in generate(request_class(prompt=prompt), metadata=metadata, timeout=120):
        if event.WhichOneof("event") == "completed":
            done = event.completed
            out.write_bytes(done.png)
            print(f"completed: {done.width}x{done.height}, {len(done.png)} bytes")
            return 0
    print("the stream ended without an image", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        sys.exit(1)
