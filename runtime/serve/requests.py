"""OpenAI chat-completion requests, checked: every problem is an ``ApiError`` that says
what is wrong and what to send instead (the app turns it into OpenAI's error JSON)."""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vispec.runtime.errors import VispecError
from vispec.runtime.sampling import Sampling

# Parameters of the API this server does not implement, accepted at their neutral values.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
           "top_logprobs": None, "logit_bias": None, "response_format": None, "tools": None,
           "tool_choice": None, "parallel_tool_calls": None, "user": ..., "metadata": ...,
           "store": False, "service_tier": ..., "reasoning_effort": None}
SUPPORTED = {"model", "messages", "stream", "stream_options", "max_tokens",
             "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n", "speculative"}
ROLES = ("system", "user", "assistant", "developer")
MAX_STOPS = 4


class ApiError(VispecError):
    """A request the server refuses: HTTP ``status``, OpenAI error ``kind`` and ``param``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: HF chat messages (``{"type": "image"}`` parts) and their images."""

    messages: list[dict]
    images: list[Image.Image]
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    speculative: bool


def parse_chat(body, model: str, allow_local_images: bool) -> ChatRequest:
    """Check a decoded JSON body against what this server serves."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object. Hint: send "
                       '{"model": ..., "messages": [...]}')
    for name, value in body.items():
        if name not in SUPPORTED and not (name in NEUTRAL and NEUTRAL[name] in (..., value)):
            raise ApiError(f"parameter {name!r} is not supported by this server. Hint: leave "
                           f"it out (supported: {', '.join(sorted(SUPPORTED))})", param=name)
    if body.get("model") != model:
        raise ApiError(f"model {body.get('model')!r} is not served here. Hint: use {model!r} "
                       f"(GET /v1/models)", status=404, param="model", code="model_not_found")
    if _number(body, "n", 1, integer=True) != 1:
        raise ApiError("n must be 1: one choice per request. Hint: send several requests",
                       param="n")
    images: list[Image.Image] = []
    messages = [_message(m, i, images, allow_local_images)
                for i, m in enumerate(_list(body, "messages"))]
    if not messages or messages[-1]["role"] == "assistant":
        raise ApiError("messages must end with a user (or system) message. Hint: append the "
                       "user's turn", param="messages")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    try:
        sampling = Sampling(temperature=_number(body, "temperature", 1.0),
                            top_p=_number(body, "top_p", 1.0),
                            seed=_number(body, "seed", None, integer=True))
    except ValueError as e:
        raise ApiError(f"{e}. Hint: temperature >= 0 (0 = greedy), 0 < top_p <= 1, "
                       f"seed >= 0") from None
    return ChatRequest(messages, images, _max_tokens(body), sampling, _stops(body),
                       _flag(body, "stream", False), _flag(options, "include_usage", False),
                       _flag(body, "speculative", True))


def _message(message, index: int, images: list, allow_local: bool) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(f"{where} must be an object with a role in {ROLES}. Hint: e.g. "
                       f'{{"role": "user", "content": "Hi"}}', param=where)
    content = message.get("content")
    role = "system" if message["role"] == "developer" else message["role"]
    if isinstance(content, str):
        return {"role": role, "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list) or not content:
        raise ApiError(f"{where}.content must be a string or a list of parts", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            images.append(load_image(part.get("image_url"), f"{where}.content[{j}]", allow_local))
            parts.append({"type": "image"})
        else:
            raise ApiError(f"{where}.content[{j}]: unsupported part {kind!r}. Hint: send "
                           f'{{"type": "text", "text": ...}} or, in user messages, '
                           f'{{"type": "image_url", "image_url": {{"url": "data:image/png;'
                           f'base64,..."}}}}', param=f"{where}.content[{j}]")
    return {"role": role, "content": parts}


def load_image(image_url, where: str, allow_local: bool) -> Image.Image:
    """The image of an ``image_url`` part: a data: URI, or a local path when allowed."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise ApiError(f"{where}: image_url needs a url. Hint: "
                       f'{{"url": "data:image/png;base64,..."}}', param=where)
    if url.startswith(("http://", "https://")):
        raise ApiError(f"{where}: this server does not fetch image URLs. Hint: send the image "
                       f"inline as a data: URI (data:image/png;base64,...)", param=where)
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(f"{where}: a data: URI must be base64 (data:image/png;base64,...)",
                           param=where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(f"{where}: the data: URI is not valid base64. Hint: encode the "
                           f"image file's bytes with base64", param=where) from None
        return _decode(io.BytesIO(raw), where)
    if not allow_local:
        raise ApiError(f"{where}: local image paths are refused. Hint: send a data: URI, or "
                       f"start the server with --allow-local-images", param=where)
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise ApiError(f"{where}: no image file at {path}", param=where)
    return _decode(path, where)


def _decode(source, where: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(f"{where}: cannot decode the image ({e}). Hint: send PNG or JPEG "
                       f"bytes", param=where) from None


def _list(body: dict, name: str) -> list:
    value = body.get(name)
    if not isinstance(value, list):
        raise ApiError(f"{name} must be a list", param=name)
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false", param=name)
    return value


def _number(body: dict, name: str, default, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ApiError(f"{name} must be {'an integer' if integer else 'a number'}, got "
                       f"{value!r}", param=name)
    return value


def _max_tokens(body: dict) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = _number(body, name, None, integer=True)
    if value is not None and value < 1:
        raise ApiError(f"{name} must be >= 1, got {value}", param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and s for s in stops):
        raise ApiError(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of "
                       f"them", param="stop")
    return tuple(stops)
