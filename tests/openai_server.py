"""A small OpenAI-compatible chat-completions server for tests (real HTTP on 127.0.0.1, a free port).

Its behaviour per request is chosen by a marker in the last user message (``[[429]]``, ``[[500]]``,
``[[timeout]]``, ``[[malformed]]``, ``[[refusal]]``, ``[[400]]``, ``[[quote]]``, ``[[shape]]``: a 200 whose JSON has
no ``choices``, ``[[html]]``: a 200 that is not JSON at all); ``fail_first`` makes a marked request fail that many
times before it succeeds. ``always`` gives every request one behaviour (a broken server: ``"500"``, ``"404"``,
``"html"``, ``"shape"``) until it is set back to ``None``. Every request is recorded.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, fail_first: int = 2, delay: float = 0.0, always: str | None = None):
        self.fail_first = fail_first
        self.always = always
        self.delay = delay
        self.requests: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, handler, body: dict) -> None:
        user = body["messages"][-1]["content"]
        marker = self.always or (re.search(r"\[\[(\w+)\]\]", user) or [None, "ok"])[1]
        with self.lock:
            self.requests.append(body)
            count = self.attempts[user] = self.attempts.get(user, 0) + 1
        if self.delay:
            time.sleep(self.delay)
        transient = marker in ("429", "500", "timeout") and count <= self.fail_first
        if marker == "429" and transient:
            return self._send(handler, 429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                              {"Retry-After": "0.05"})
        if marker == "500" and transient:
            return self._send(handler, 500, {"error": {"message": "boom", "type": "server_error"}})
        if marker == "timeout" and transient:
            time.sleep(1.5)
            return self._send(handler, 500, {"error": {"message": "late"}})
        if marker == "404":
            return self._send(handler, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        if marker == "shape":
            return self._send(handler, 200, {"detail": "this is not a chat completion"})
        if marker == "html":
            return self._send(handler, 200, b"<html><body>Welcome to nginx!</body></html>", content_type="text/html")
        if marker == "400":
            return self._send(handler, 400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
        if marker == "401":
            return self._send(handler, 401, {"error": {"message": "bad key", "type": "invalid_api_key"}})
        caption = user.split("Figure Caption:\n", 1)[-1].split("\n")[0]
        text = {
            "malformed": "Here are some thoughts about the picture without any turns.",
            "refusal": "I'm sorry, but I can't help with that.",
            "quote": f"User: What is shown?\nAssistant: {caption}",
        }.get(marker, "User: What kind of image is this?\nAssistant: It is a medical image of the region shown.\n"
                      "User: Is anything unusual visible?\nAssistant: An area stands out from its surroundings.")
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
        self._send(handler, 200, {
            "id": f"chatcmpl-{count}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 40, "total_tokens": prompt_tokens + 40}})

    @staticmethod
    def _send(handler, status: int, payload: dict | bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
