"""The Open Inference Protocol (KServe V2) on the wire: its JSON bodies as pydantic models, the
binary tensor data extension, and errors as the protocol's `{"error": "..."}`.

Every task is a model with one input, `image` (BYTES: one encoded jpeg/png/webp per element), and
two outputs of shape [images, top_k]: `labels` (BYTES) and `scores` (FP32), best first. In JSON a
BYTES element is a base64 string; with the binary extension (`Inference-Header-Content-Length`
header, `binary_data_size` parameter) the JSON header is followed by raw bytes, each BYTES element
a 4-byte little-endian length and its bytes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import struct
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, NonNegativeInt, PrivateAttr, ValidationError

from app.errors import AppError, BadRequest, UnsupportedMediaType, status_of
from app.payloads import parse_count
from app.tasks import TopK

log = logging.getLogger("app")

INPUT, LABELS, SCORES = "image", "labels", "scores"
HEADER_LENGTH = "Inference-Header-Content-Length"
DEFAULT_TOP_K, MAX_TOP_K = 5, 1000
Parameters = dict[str, Any]


class ErrorBody(BaseModel):
    """Every error of the protocol's routes."""

    error: str


class TensorMetadata(BaseModel):
    """Name, datatype and shape of a model input or output (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """Answer to GET /v2/models/{task}: a task as a model."""

    name: str
    versions: list[str] = Field(description="The served adapter version (first 12 hex digits of its sha256).")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    """Answer to GET /v2."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    """Answer to GET /v2/health/live."""

    live: bool


class ServerReady(BaseModel):
    """Answer to GET /v2/health/ready."""

    ready: bool


class ModelReady(BaseModel):
    """Answer to GET /v2/models/{task}/ready."""

    name: str
    ready: bool


class RequestInput(BaseModel):
    """One input tensor of an inference request."""

    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """An output the client asks for (`binary_data`: true for the binary extension)."""

    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferRequest(BaseModel):
    """POST /v2/models/{task}/infer; `parameters.top_k` sets the classes per image."""

    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None
    _binary: bytes = PrivateAttr(default=b"")

    def top_k(self) -> int:
        """The requested classes per image (`parameters.top_k`, default 5)."""
        k = self.parameters.get("top_k", DEFAULT_TOP_K)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise BadRequest(f"parameter top_k must be an integer from 1 to {MAX_TOP_K}, got {k!r}")
        return k

    def images(self) -> list[bytes]:
        """The encoded images of the `image` input, from base64 JSON data or the binary section."""
        if len(self.inputs) != 1 or self.inputs[0].name != INPUT:
            raise BadRequest(f"expected one input named {INPUT!r}, got {[t.name for t in self.inputs]}")
        tensor = self.inputs[0]
        if tensor.datatype != "BYTES":
            raise BadRequest(f"input {INPUT!r} must be BYTES (encoded jpeg, png or webp images), got {tensor.datatype}")
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            elements = self._binary_elements(size, tensor.data is not None)
        elif self._binary:
            raise BadRequest(f"{len(self._binary)} bytes follow the JSON header but no input has binary_data_size")
        elif tensor.data is None:
            raise BadRequest(f"input {INPUT!r} has neither data nor parameters.binary_data_size")
        else:
            elements = [_from_base64(i, item) for i, item in enumerate(_flatten(tensor.data))]
        expected = math.prod(tensor.shape)
        if expected == 0:
            raise BadRequest(f"input {INPUT!r} has shape {tensor.shape}: no image; send at least one")
        if len(elements) != expected:
            raise BadRequest(f"input {INPUT!r} has shape {tensor.shape} ({expected} elements) "
                             f"but {len(elements)} element(s) of data")
        return elements

    def _binary_elements(self, size: Any, has_json_data: bool) -> list[bytes]:
        if has_json_data:
            raise BadRequest(f"input {INPUT!r} has both data and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size != len(self._binary):
            raise BadRequest(f"binary_data_size {size!r} does not match the {len(self._binary)} bytes "
                             "after the JSON header")
        return split_bytes(self._binary)


class ResponseOutput(BaseModel):
    """One output tensor of an inference response; `data` is absent when sent as binary."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    """Answer to POST /v2/models/{task}/infer."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def model_metadata(name: str, version: str) -> ModelMetadata:
    """A task as the protocol describes a model.

    Args:
        name: Task name.
        version: Served adapter version.
    """
    return ModelMetadata(
        name=name, versions=[version], platform="rlrr-serve",
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=LABELS, datatype="BYTES", shape=[-1, -1]),
                 TensorMetadata(name=SCORES, datatype="FP32", shape=[-1, -1])])


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` inlined (for an OpenAPI body not tied to a parameter).

    Args:
        model: A pydantic model without recursive fields.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            return resolve(defs[node["$ref"].rsplit("/", 1)[-1]]) if "$ref" in node else {
                k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def parse_request(body: bytes, headers: Mapping[str, str]) -> InferRequest:
    """An inference request from its body: JSON, or a JSON header and binary tensor data.

    Args:
        body: The whole (already size-limited) body.
        headers: The request headers (`Inference-Header-Content-Length`, `Content-Encoding`).
    """
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} not accepted; send the request uncompressed")
    declared = headers.get(HEADER_LENGTH)
    length = len(body) if declared is None else _header_length(declared, len(body))
    try:
        request = InferRequest.model_validate_json(body[:length])
    except ValidationError as exc:
        raise BadRequest(f"invalid inference request: {_first_error(exc)}") from exc
    request._binary = body[length:]
    _requested(request)  # refuse unknown outputs before any image is decoded
    return request


def infer_response(request: InferRequest, name: str, version: str, labels: Mapping[int, str] | Sequence[str],
                   predictions: list[TopK]) -> Response:
    """The protocol's answer for the engine's (index, score) lists, JSON or binary as asked.

    Args:
        request: The request (its `id`, requested outputs and binary flags).
        name: Task name.
        version: Adapter version that answered.
        labels: The task's class names by class index.
        predictions: One best-first list per image, all of the same length.
    """
    shape = [len(predictions), len(predictions[0]) if predictions else 0]
    values = {LABELS: ("BYTES", [labels[i] for row in predictions for i, _ in row]),
              SCORES: ("FP32", [score for row in predictions for _, score in row])}
    outputs, chunks = [], []
    for wanted in _requested(request):
        datatype, data = values[wanted.name]
        if wanted.parameters.get("binary_data", request.parameters.get("binary_data_output", False)):
            raw = _to_binary(datatype, data)
            chunks.append(raw)
            outputs.append(ResponseOutput(name=wanted.name, shape=shape, datatype=datatype,
                                          parameters={"binary_data_size": len(raw)}))
        else:
            outputs.append(ResponseOutput(name=wanted.name, shape=shape, datatype=datatype, data=data))
    header = InferResponse(model_name=name, model_version=version, id=request.id, outputs=outputs)
    json_part = header.model_dump_json(exclude_none=True).encode()
    if not chunks:
        return Response(json_part, media_type="application/json")
    return Response(json_part + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(json_part))})


def split_bytes(raw: bytes) -> list[bytes]:
    """BYTES elements from the binary extension's encoding (4-byte little-endian length, bytes).

    Args:
        raw: One input's binary data.
    """
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"malformed BYTES data: {len(raw) - offset} byte(s) left where a 4-byte length belongs")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BadRequest(f"malformed BYTES data: element {len(elements)} declares {size} bytes, "
                             f"{len(raw) - offset} left")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    """The binary extension's encoding of BYTES elements (inverse of `split_bytes`).

    Args:
        elements: The elements.
    """
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


class OIPRoute(APIRoute):
    """A route whose errors are the protocol's `{"error": "..."}`, with the status /classify uses."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except AppError as exc:
                return JSONResponse({"error": exc.detail}, status_code=status_of(exc), headers=exc.headers)
            except RequestValidationError as exc:
                reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                return JSONResponse({"error": f"invalid request: {reasons}"}, status_code=400)
            except Exception:  # a bug, not a client error: log it, never leak it
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": "internal error"}, status_code=500)

        return handle


def _header_length(declared: str, body_size: int) -> int:
    length = parse_count(declared)
    if length is None or length > body_size:
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count within the {body_size}-byte body, got {declared!r}")
    return length


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(map(str, error["loc"]))
    message = error["msg"]
    if "recursion limit exceeded" in message:  # the JSON parser's own words for a bomb of nested arrays
        message = message.replace("recursion limit exceeded", "arrays or objects nested too deeply")
    return f"{where}: {message}" if where else message


def _flatten(data: list[Any]) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _from_base64(index: int, item: Any) -> bytes:
    if not isinstance(item, str):
        raise BadRequest(f"element {index} of input {INPUT!r} must be a base64 string, got {type(item).__name__}")
    try:
        return base64.b64decode(item, validate=True)
    except binascii.Error as exc:
        raise BadRequest(f"element {index} of input {INPUT!r} is not valid base64: {exc}") from exc


def _requested(request: InferRequest) -> list[RequestOutput]:
    if request.outputs is None:
        return [RequestOutput(name=LABELS), RequestOutput(name=SCORES)]
    names = [o.name for o in request.outputs]
    if not names:
        raise BadRequest(f"outputs is empty: name at least one of {[LABELS, SCORES]}, or leave it out for both")
    unknown = sorted(set(names) - {LABELS, SCORES})
    if unknown or len(set(names)) != len(names):
        raise BadRequest(f"outputs must be distinct names among {[LABELS, SCORES]}, got {names}")
    return request.outputs


def _to_binary(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        return join_bytes([label.encode() for label in data])
    return struct.pack(f"<{len(data)}f", *data)
