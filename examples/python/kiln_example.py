#!/usr/bin/python3
"""Calls Kiln's public API (kiln.v1.ImageService) with stock gRPC for Python.

    /usr/bin/python3 examples/python/kiln_example.py "a red star" star.png   # an image
    /usr/bin/python3 examples/python/kiln_example.py --bad-key   # exits 0 only on UNAUTHENTICATED

Environment: KILN_GATEWAY (host:port, default 127.0.0.1:50051; an http:// prefix is accepted) and
KILN_API_KEY (default: the development key `kiln up` wrote to $KILN_DATA_DIR/dev-api-key, .kiln by
default). Exit status: 0 on success, 1 on a gRPC error, 2 on a usage or setup error.

Needs Debian's python3-grpcio and python3-protobuf, and protoc (protobuf-compiler). Message
classes are generated at run time from proto/kiln/v1/image.proto with the system protoc, which
matches the system protobuf runtime; RPCs go through grpcio's generic channel methods, so no gRPC
code generator (grpc_tools) is needed.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid

try:
    import google.protobuf  # noqa: F401 (the generated message classes need it)
    import grpc
except ImportError as missing:
    print(f"{missing}: on Debian, apt-get install python3-grpcio python3-protobuf and run this "
          "with /usr/bin/python3", file=sys.stderr)
    sys.exit(2)

REPO = pathlib.Path(__file__).resolve().parents[2]
SERVICE = "/kiln.v1.ImageService/"

# The google.rpc messages Kiln puts in `grpc-status-details-bin`, with the field numbers of
# googleapis' google/rpc/{status,error_details}.proto (not packaged for Debian). Only the wire
# format must match, so a private package name keeps them clear of the real ones.
RPC_SUBSET = """
syntax = "proto3";
package kiln_example.rpc;
message Any { string type_url = 1; bytes value = 2; }
message Duration { int64 seconds = 1; int32 nanos = 2; }
message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
message RetryInfo { Duration retry_delay = 1; }
message BadRequest {
  message FieldViolation { string field = 1; string description = 2; }
  repeated FieldViolation field_violations = 1;
}
message QuotaFailure {
  message Violation { string subject = 1; string description = 2; }
  repeated Violation violations = 1;
}
"""


def load_protos():
    """Generates and imports the message classes of image.proto and of the google.rpc subset."""
    with tempfile.TemporaryDirectory() as out:
        (pathlib.Path(out) / "rpc_subset.proto").write_text(RPC_SUBSET)
        for include, name in [(REPO / "proto", "kiln/v1/image.proto"), (out, "rpc_subset.proto")]:
            try:
                subprocess.run(["protoc", f"-I{include}", f"--python_out={out}", name], check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"cannot compile {name} with protoc (apt-get install protobuf-compiler): {e}",
                      file=sys.stderr)
                sys.exit(2)
        modules = []
        for path in ["kiln/v1/image_pb2.py", "rpc_subset_pb2.py"]:
            module_name = path[:-3].replace("/", "_")
            spec = importlib.util.spec_from_file_location(module_name, f"{out}/{path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules.append(module)
        return modules


pb, rpc = load_protos()


class Kiln:
    """The three RPCs of kiln.v1.ImageService on one channel, with the key sent on every call."""

    def __init__(self, address, api_key):
        # The gateway sends PNGs of up to 64 MiB; grpcio accepts 4 MiB by default.
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.metadata = [("authorization", f"Bearer {api_key}")]
        self._model_info = self._unary("GetModelInfo", pb.GetModelInfoRequest, pb.ModelInfo)
        self._quota = self._unary("GetQuota", pb.GetQuotaRequest, pb.QuotaStatus)
        self._generate = self.channel.unary_stream(
            SERVICE + "Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateEvent.FromString,
        )

    def _unary(self, method, request, response):
        call = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        return lambda: call.with_call(request(), metadata=self.metadata, timeout=10)

    def model_info(self):
        return self._model_info()[0]

    def quota(self):
        """The caller's quota, and the response's initial metadata (x-ratelimit-*)."""
        status, call = self._quota()
        return status, dict(call.initial_metadata())

    def generate(self, request, timeout):
        """The event stream; iterating it raises grpc.RpcError when the request fails. Cancelling it
        (`stream.cancel()`), or its deadline passing, cancels the request on the server."""
        return self._generate(request, metadata=self.metadata, timeout=timeout)


class Failure:
    """What a failed call says: code, message, and the google.rpc details Kiln attaches."""

    def __init__(self, error):
        self.code = error.code()
        self.message = error.details()
        self.reason, self.info, self.retry_after, self.violations = None, {}, None, []
        trailers = dict(error.trailing_metadata() or ())
        self.ratelimit = {k: v for k, v in trailers.items() if k.startswith("x-ratelimit-")}
        status = rpc.Status.FromString(trailers.get("grpc-status-details-bin", b""))
        for any_ in status.details:
            kind = any_.type_url.rsplit("/", 1)[-1]
            if kind == "google.rpc.ErrorInfo":
                info = rpc.ErrorInfo.FromString(any_.value)
                self.reason, self.info = info.reason, dict(info.metadata)
            elif kind == "google.rpc.RetryInfo":
                delay = rpc.RetryInfo.FromString(any_.value).retry_delay
                self.retry_after = delay.seconds + delay.nanos / 1e9
            elif kind == "google.rpc.BadRequest":
                for v in rpc.BadRequest.FromString(any_.value).field_violations:
                    self.violations.append(f"field {v.field}: {v.description}")
            elif kind == "google.rpc.QuotaFailure":
                for v in rpc.QuotaFailure.FromString(any_.value).violations:
                    self.violations.append(f"quota {v.subject}: {v.description}")

    def retryable(self, longest_wait):
        """Kiln's retry rule (docs/api.md): UNAVAILABLE; RESOURCE_EXHAUSTED when the cluster shed
        the request (SHED) or a quota limit is reached (QUOTA_EXHAUSTED); ABORTED
        DUPLICATE_IN_FLIGHT (the same key is still running). Nothing else, and only when the
        server's delay is at most `longest_wait` seconds: a daily window's reset is for a job
        queue to wait out, not this loop."""
        if self.retry_after is not None and self.retry_after > longest_wait:
            return False
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return True
        if self.code == grpc.StatusCode.ABORTED:
            return self.reason == "DUPLICATE_IN_FLIGHT"
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.reason in (
            "SHED",
            "QUOTA_EXHAUSTED",
        )

    def report(self):
        print(f"error: {self.code.name}: {self.message}", file=sys.stderr)
        if self.reason:
            print(f"  reason: {self.reason} {self.info}", file=sys.stderr)
        if self.retry_after is not None:
            print(f"  retry after: {self.retry_after:.1f} s", file=sys.stderr)
        for v in self.violations:
            print(f"  {v}", file=sys.stderr)
        if self.ratelimit:
            print(f"  {self.ratelimit}", file=sys.stderr)


def generate(kiln, request, attempts=3, deadline=300, longest_wait=60):
    """Runs one Generate call, printing its events, and returns the Completed event. Retries what
    Kiln says is retryable, after the server's RetryInfo delay, with the same request (and so the
    same idempotency key: a retry of a request that got its image is not charged again)."""
    for attempt in range(1, attempts + 1):
        stream = kiln.generate(request, timeout=deadline)
        try:
            for n, event in enumerate(stream):
                if n == 0:
                    # Initial metadata arrives before the first event. A replay of an earlier
                    # answer (same idempotency key) is not charged and carries none.
                    remaining = dict(stream.initial_metadata()).get("x-ratelimit-remaining")
                    print(f"x-ratelimit-remaining: {remaining}")
                kind = event.WhichOneof("event")
                if kind == "queued":
                    print(f"queued: position {event.queued.position}")
                elif kind == "started":
                    print(f"started: worker {event.started.worker}")
                elif kind == "progress":
                    p = event.progress
                    print(f"progress: {p.tokens_done}/{p.tokens_total} tokens")
                elif kind == "completed":
                    c = event.completed
                    print(
                        f"completed: {c.width}x{c.height}, {len(c.png)} bytes, "
                        f"seed {c.usage.seed}, queued {c.usage.queue_seconds:.2f} s, "
                        f"generated in {c.usage.generation_seconds:.2f} s"
                    )
                    return c
            raise RuntimeError("the stream ended without an image")
        except grpc.RpcError as error:
            failure = Failure(error)
            if attempt == attempts or not failure.retryable(longest_wait):
                raise
            delay = failure.retry_after if failure.retry_after is not None else 2.0 ** attempt
            print(f"{failure.code.name} ({failure.reason}); retrying in {delay:.1f} s",
                  file=sys.stderr)
            time.sleep(delay)


def api_key():
    key = os.environ.get("KILN_API_KEY")
    if key:
        return key.strip()
    path = pathlib.Path(os.environ.get("KILN_DATA_DIR", ".kiln")) / "dev-api-key"
    try:
        return path.read_text().strip()
    except OSError as e:
        print(f"no API key: set KILN_API_KEY or run `kiln up` here to create {path} ({e})",
              file=sys.stderr)
        sys.exit(2)


def gateway():
    address = os.environ.get("KILN_GATEWAY", "127.0.0.1:50051")
    return address.removeprefix("http://")


def run(prompt, output):
    kiln = Kiln(gateway(), api_key())
    info = kiln.model_info()
    print(f"model: {info.model}, sizes {list(info.sizes)}, default {info.default_size}")
    quota, metadata = kiln.quota()
    print(f"quota: user {quota.user}, tier {quota.tier}")
    for w in quota.windows:
        print(f"  {w.subject} {w.window_seconds} s: {w.remaining} of {w.limit} left")
    print(f"  x-ratelimit-remaining: {metadata.get('x-ratelimit-remaining')}")
    request = pb.GenerateRequest(
        prompt=prompt,
        width=min(info.sizes),
        height=min(info.sizes),
        idempotency_key=f"example-{uuid.uuid4()}",
    )
    completed = generate(kiln, request)
    pathlib.Path(output).write_bytes(completed.png)
    print(f"wrote {output}")


def bad_key():
    """Calls with a key the gateway does not know; success means UNAUTHENTICATED, on both a unary
    call and the stream."""
    kiln = Kiln(gateway(), "not-a-kiln-key")
    calls = [
        ("GetQuota", kiln.quota),
        ("Generate", lambda: list(kiln.generate(pb.GenerateRequest(prompt="a red star"), 10))),
    ]
    ok = True
    for name, call in calls:
        try:
            call()
            print(f"{name}: succeeded with a wrong key", file=sys.stderr)
            ok = False
        except grpc.RpcError as error:
            failure = Failure(error)
            print(f"{name}: {failure.code.name} ({failure.reason}): {failure.message}")
            ok = ok and failure.code == grpc.StatusCode.UNAUTHENTICATED
    return 0 if ok else 1


def main(argv):
    if argv[1:] == ["--bad-key"]:
        return bad_key()
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        run(argv[1], argv[2])
    except grpc.RpcError as error:
        Failure(error).report()
        return 1
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
