"""Drive the real Azure Functions Python worker library (azure-functions-runtime) against function_app.py.

Run by tests/test_real_worker.py in the Python 3.13 venv .venv-worker/, never imported by the suite:

    .venv-worker/bin/python tests/worker_harness.py result.json < request.json

It plays the proxy worker's part: it hands the library the host's messages (WorkerInitRequest,
FunctionsMetadataRequest, InvocationRequest) through the library's own entry points, so the
library indexes the app, builds each function's metadata and decodes every input with its own
converters. The proxy worker (which owns the gRPC channel and the generated protobuf classes) is
not on PyPI, so the protobuf messages are stood in for by the small classes below: the library
only builds them with keyword arguments, reads their fields and asks `WhichOneof`.

The proxy worker sets the root logger to INFO and sends every record that reaches it to the host
as an RpcLog, whatever the logger's name; `HostLogs` below is that handler, and what it kept
during each invocation is in the result.

Request (JSON on stdin): {"app_dir": str, "invocations": [{"function": name,
  "input_data": [{"name": str, "data": TypedData}], "trigger_metadata": {str: TypedData}}]},
a TypedData being {"string": str} | {"json": str} | {"bytes": base64} | {"http": RpcHttp}.
Result (JSON, to the file named on the command line): the init status, the metadata, and per
invocation the status, the exception message, the return value and the host's log lines.
"""

import asyncio
import base64
import importlib
import json
import logging
import sys
from typing import Any, ClassVar

ONEOFS: dict[str, tuple[str, ...]] = {
    "data": (
        "string",
        "json",
        "bytes",
        "stream",
        "http",
        "int",
        "double",
        "collection_bytes",
        "collection_string",
        "collection_double",
        "collection_sint64",
        "model_binding_data",
        "collection_model_binding_data",
    ),
    "rpc_data": ("data", "rpc_shared_memory"),
}


class Message:
    """A protobuf message as the library uses one: keyword construction, fields, WhichOneof."""

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **fields: Any) -> None:
        for name, value in {**self.defaults, **fields}.items():
            setattr(self, name, value)

    def WhichOneof(self, group: str) -> str | None:  # protobuf's name
        return next((f for f in ONEOFS[group] if getattr(self, f, None) is not None), None)


class TypedData(Message):
    pass


class RpcHttp(Message):
    defaults: ClassVar[dict[str, Any]] = {"headers": {}, "params": {}, "query": {}, "body": None}


class BindingInfo(Message):
    # enum Direction { in = 0; out = 1; inout = 2; }  enum DataType { undefined = 0; ... }
    out = 1
    inout = 2
    undefined = 0


class StatusResult(Message):
    Failure = 0
    Success = 1


class SameSite:
    ExplicitNone = 3
    Lax = 1
    Strict = 2


class RpcHttpCookie(Message):
    SameSite = SameSite


def _message(name: str) -> type[Message]:
    return type(name, (Message,), {})


class Protos:
    TypedData = TypedData
    RpcHttp = RpcHttp
    RpcHttpCookie = RpcHttpCookie
    BindingInfo = BindingInfo
    StatusResult = StatusResult
    ParameterBinding = _message("ParameterBinding")
    RpcFunctionMetadata = _message("RpcFunctionMetadata")
    RpcRetryOptions = _message("RpcRetryOptions")
    RpcException = _message("RpcException")
    WorkerMetadata = _message("WorkerMetadata")
    WorkerInitResponse = _message("WorkerInitResponse")
    FunctionMetadataResponse = _message("FunctionMetadataResponse")
    FunctionLoadResponse = _message("FunctionLoadResponse")
    InvocationResponse = _message("InvocationResponse")
    FunctionEnvironmentReloadResponse = _message("FunctionEnvironmentReloadResponse")
    NullableString = _message("NullableString")
    NullableBool = _message("NullableBool")
    NullableDouble = _message("NullableDouble")
    NullableTimestamp = _message("NullableTimestamp")


class Envelope:
    """What the proxy worker hands the library: the StreamingMessage and its own properties."""

    def __init__(self, **content: Any) -> None:
        self.request = Message(**content)
        self.properties = {"host": "127.0.0.1", "protos": Protos}


class HostLogs(logging.Handler):
    """The proxy worker's log handler: every record that reaches the root logger goes to the host."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.lines: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append({"logger": record.name, "level": record.levelname, "message": record.getMessage()})


def typed_data(spec: dict[str, Any] | None) -> TypedData | None:
    if spec is None:
        return None
    ((kind, value),) = spec.items()
    if kind == "bytes":
        return TypedData(bytes=base64.b64decode(value))
    if kind == "http":
        return TypedData(http=RpcHttp(**{**value, "body": typed_data(value.get("body"))}))
    return TypedData(**{kind: value})


def invocation_request(function_id: str, invocation_id: str, spec: dict[str, Any]) -> Envelope:
    return Envelope(
        invocation_request=Message(
            invocation_id=invocation_id,
            function_id=function_id,
            input_data=[
                Message(name=item["name"], data=typed_data(item["data"]), rpc_shared_memory=None)
                for item in spec["input_data"]
            ],
            trigger_metadata={k: typed_data(v) for k, v in spec.get("trigger_metadata", {}).items()},
            trace_context=Message(trace_parent="", trace_state="", attributes={}),
            retry_context=Message(retry_count=0, max_retry_count=0, exception=None),
        )
    )


def describe_metadata(metadata: Any) -> dict[str, Any]:
    return {
        "name": metadata.name,
        "function_id": metadata.function_id,
        "script_file": metadata.script_file,
        "entry_point": metadata.entry_point,
        "directory": metadata.directory,
        "language": metadata.language,
        "bindings": {
            name: {"type": b.type, "direction": b.direction, "data_type": b.data_type}
            for name, b in metadata.bindings.items()
        },
        "raw_bindings": list(metadata.raw_bindings),
        "retry_options": None if metadata.retry_options is None else vars(metadata.retry_options),
        "properties": dict(metadata.properties),
    }


def describe_return(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.WhichOneof("data")
    if kind != "http":
        return {"kind": kind, "value": getattr(value, kind)}
    http = value.http
    body = http.body
    raw = getattr(body, body.WhichOneof("data")) if body is not None else b""
    return {
        "kind": "http",
        "status_code": str(http.status_code),
        "headers": dict(http.headers),
        "body": raw.decode() if isinstance(raw, bytes) else str(raw),
    }


async def run(request: dict[str, Any], host_logs: HostLogs) -> dict[str, Any]:
    runtime: Any = importlib.import_module("azure_functions_runtime")
    runtime.start_threadpool_executor()
    init = await runtime.worker_init_request(
        Envelope(worker_init_request=Message(capabilities={}, function_app_directory=request["app_dir"]))
    )
    result: dict[str, Any] = {
        "init_status": init.result.status,
        "init_error": getattr(getattr(init.result, "exception", None), "message", None),
        "capabilities": dict(init.capabilities),
    }
    if init.result.status != StatusResult.Success:
        return result
    response = await runtime.functions_metadata_request(Envelope(functions_metadata_request=Message()))
    metadata = list(response.function_metadata_results or [])
    result["use_default_metadata_indexing"] = response.use_default_metadata_indexing
    result["metadata"] = [describe_metadata(m) for m in metadata]
    ids = {m.name: m.function_id for m in metadata}
    result["invocations"] = []
    for number, spec in enumerate(request.get("invocations", [])):
        for function_id in ids.values():
            await runtime.function_load_request(
                Envelope(function_load_request=Message(function_id=function_id))
            )
        if spec["function"] not in ids:
            result["invocations"].append({"function": spec["function"], "status": "NotIndexed"})
            continue
        host_logs.lines = []
        answer = await runtime.invocation_request(
            invocation_request(ids[spec["function"]], f"invocation-{number}", spec)
        )
        exception = getattr(answer.result, "exception", None)
        result["invocations"].append(
            {
                "function": spec["function"],
                "status": "Success" if answer.result.status == StatusResult.Success else "Failure",
                "exception": None if exception is None else exception.message,
                "return_value": describe_return(getattr(answer, "return_value", None)),
                "host_logs": host_logs.lines,
            }
        )
    runtime.stop_threadpool_executor()
    return result


def main() -> None:
    request = json.load(sys.stdin)
    sys.path.insert(0, request["app_dir"])  # as the proxy worker does with the app's directory
    root = logging.getLogger()
    root.setLevel(logging.INFO)  # the proxy worker's level (DEBUG only with PYTHON_ENABLE_DEBUG_LOGGING)
    host_logs = HostLogs()
    root.addHandler(host_logs)
    result = asyncio.run(run(request, host_logs))
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(result, out, default=str)


if __name__ == "__main__":
    main()
