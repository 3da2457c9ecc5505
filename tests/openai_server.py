"""A small OpenAI-compatible HTTP server on loopback, answering with a real model.

It implements the subset of vLLM's server that :mod:`visa.backends.openai_api` uses:
``GET /v1/models`` and ``POST /v1/chat/completions`` with greedy generation, ``prompt_logprobs``
(vLLM's response shape: a top-level list with ``null`` for the first prompt token, then one
``{"<token id>": {"logprob", "rank", "decoded_token"}}`` entry per prompt token, decoded
incrementally), ``add_generation_prompt`` and ``return_token_ids`` (``prompt_token_ids``: the ids the
model read, image tokens expanded). :class:`OpenAICompatibleServer` serves a text-only causal LM (a
request with an image part gets HTTP 400 after its data URI is checked);
:class:`VisionLanguageServer` serves a vision-language model through its transformers processor and
accepts ``image_url`` parts (base64 data URIs), as ``vllm serve`` does for a multimodal model.

Tests inject faults: ``server.faults`` is a list consumed one per request; an ``int`` answers with that
HTTP status, a ``float`` delays the response by that many seconds.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


class OpenAICompatibleServer:
    def __init__(self, model: Any, tokenizer: Any, name: str = "smollm2"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.faults: list[int | float] = []
        self.bodies: list[dict[str, Any]] = []
        self.images_seen: list[tuple[int, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "code": 404}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                status, payload = server.answer(self.path, lambda: self.rfile.read(length))
                if status:
                    self._send(status, payload)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def answer(self, path: str, read: Any) -> tuple[int, dict[str, Any]]:
        """Status and JSON payload for a POST to ``path`` whose body ``read()`` returns; injected
        faults (a delay, or an HTTP status) apply in order; status 0: the client went away."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self.faults.pop(0) if self.faults else None
        try:
            raw = read()
            if isinstance(fault, float):
                time.sleep(fault)
            elif isinstance(fault, int):
                return fault, {"error": {"message": f"injected failure {fault}", "code": fault}}
            if path.rstrip("/") != "/v1/chat/completions":
                raise BadRequest(f"no route {path}", 404)
            try:
                body = json.loads(raw)
            except ValueError:
                raise BadRequest("request body is not JSON") from None
            with self._lock:
                self.bodies.append(body)
            return 200, self.chat_completion(body)
        except BadRequest as error:
            return error.status, {"error": {"message": str(error), "type": "BadRequestError"}}
        except (BrokenPipeError, ConnectionResetError):
            return 0, {}
        finally:
            with self._lock:
                self.in_flight -= 1

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- the API --------------------------------------------------------------------------------
    def _encode(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The model inputs of a request and its prompt token ids."""
        import torch

        text = self.tokenizer.apply_chat_template(
            self._messages(body), tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True)
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": torch.tensor([ids])}, ids

    def _messages(self, body: dict[str, Any]) -> list[dict[str, str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        result = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") == "image_url":
                        url = part["image_url"]["url"]
                        header, _, data = url.partition(",")
                        if not header.startswith("data:image/") or not header.endswith(";base64"):
                            raise BadRequest("image_url must be a base64 data URI")
                        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
                            self.images_seen.append(image.size)
                        raise BadRequest(f"model '{self.name}' is text-only: image inputs are not supported")
                    texts.append(part.get("text", ""))
                content = "".join(texts)
            if not isinstance(content, str):
                raise BadRequest("message content must be a string or a list of parts")
            result.append({"role": message.get("role", "user"), "content": content})
        return result

    def chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        import torch

        if body.get("model") != self.name:
            raise BadRequest(f"The model `{body.get('model')}` does not exist.", 404)
        inputs, ids = self._encode(body)
        max_tokens = int(body.get("max_tokens") or 16)
        skip_special = body.get("skip_special_tokens", True)
        with self._model_lock, torch.inference_mode():
            input_ids = inputs["input_ids"]
            prompt_logprobs = None
            k = body.get("prompt_logprobs")
            if k is not None:
                logprobs = torch.log_softmax(self.model(**inputs).logits[0].float(), dim=-1)
                prompt_logprobs = [None]
                previous = self.tokenizer.decode(ids[:1], skip_special_tokens=skip_special)
                for j in range(1, len(ids)):
                    current = self.tokenizer.decode(ids[: j + 1], skip_special_tokens=skip_special)
                    row = logprobs[j - 1]
                    entry = {
                        str(ids[j]): {
                            "logprob": float(row[ids[j]]),
                            "rank": int((row > row[ids[j]]).sum()) + 1,
                            "decoded_token": current[len(previous) :],
                        }
                    }
                    for rank, other in enumerate(torch.topk(row, int(k)).indices.tolist(), start=1):
                        entry.setdefault(
                            str(other),
                            {
                                "logprob": float(row[other]),
                                "rank": rank,
                                "decoded_token": self.tokenizer.decode([other]),
                            },
                        )
                    prompt_logprobs.append(entry)
                    previous = current
            generated = self.model.generate(
                **{"attention_mask": torch.ones_like(input_ids), **inputs},
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )[0, len(ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "stop" if eos in generated else "length"
        if eos in generated:
            generated = generated[: generated.index(eos)]
        response: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.bodies)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": self.tokenizer.decode(generated, skip_special_tokens=True),
                    },
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(generated),
                "total_tokens": len(ids) + len(generated),
            },
            "prompt_logprobs": prompt_logprobs,
        }
        if body.get("return_token_ids"):
            response["prompt_token_ids"] = ids
        return response


class VisionLanguageServer(OpenAICompatibleServer):
    """The same API over a vision-language model: ``image_url`` parts become the model's images.

    The conversation is rendered by the processor's chat template with an image part where each
    image was, and encoded by the processor (image placeholders expanded into image tokens), as
    vLLM's server does with the checkpoint's own processor.
    """

    def __init__(self, model: Any, processor: Any, name: str = "tiny-vlm"):
        super().__init__(model, processor.tokenizer, name)
        self.processor = processor

    def _encode(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        messages, images = self._parts(body)
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True)
        )
        encoding = self.processor(
            text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=False
        )
        encoding.pop("text_replacement_offsets", None)
        return dict(encoding), encoding["input_ids"][0].tolist()

    def _parts(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        result: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise BadRequest("message content must be a string or a list of parts")
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    images.append(self._image(part["image_url"]["url"]))
                    parts.append({"type": "image"})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    raise BadRequest(f"unsupported content part {part.get('type')!r}")
            result.append({"role": message.get("role", "user"), "content": parts})
        return result, images

    def _image(self, url: str) -> Image.Image:
        header, _, data = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise BadRequest("image_url must be a base64 data URI")
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            self.images_seen.append(image.size)
            return image.convert("RGB")
