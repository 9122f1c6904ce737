"""A real local S3-compatible server for tests and benchmarks: moto's standalone server
(``ThreadedMotoServer`` on 127.0.0.1, a free port) behind a small HTTP proxy that counts every request by
path and can answer chosen paths with 503 a given number of times, or delay them.

    with LocalS3() as s3:
        s3.upload_tree(root)            # every file under root, keyed by its relative path
        s3.fail("/pmc-oa-opendata/PMC1.1/PMC1.1.xml", times=2)
        ingest_pmc(["s3://pmc-oa-opendata"], out, IngestOptions(endpoint_url=s3.url, pmcids=...))
        s3.requests[("GET", "/pmc-oa-opendata/PMC1.1/gr1.jpg")]
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

BUCKET = "pmc-oa-opendata"


class LocalS3:
    """``own_process=True`` runs moto as ``python -m moto.server`` (benchmarks: the server does not share
    the client's interpreter lock); the default is ``ThreadedMotoServer`` in this process (tests)."""

    def __init__(self, bucket: str = BUCKET, delay_s: float = 0.0, own_process: bool = False):
        self.bucket, self.delay_s, self.own_process = bucket, delay_s, own_process
        self.requests: Counter = Counter()
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> "LocalS3":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        if self.own_process:
            self.backend = self._start_process()
        else:
            self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.moto.start()
            self.backend = "%s:%d" % self.moto.get_host_and_port()
        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.proxy.daemon_threads = True
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d" % self.proxy.server_address[1]
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def _start_process(self) -> str:
        import socket
        import subprocess
        import sys

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return f"127.0.0.1:{port}"
            except OSError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("moto server did not start within 30 s")

    def __exit__(self, *exc) -> None:
        self.proxy.shutdown()
        self.proxy.server_close()
        if self.own_process:
            self.process.terminate()
            self.process.wait(timeout=10)
        else:
            self.moto.stop()

    def client(self):
        """A signed boto3 client straight to moto (uploads do not go through the counting proxy)."""
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.backend}", region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def upload_tree(self, root: str | Path) -> int:
        client, count = self.client(), 0
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            client.put_object(Bucket=self.bucket, Key=path.relative_to(root).as_posix(), Body=path.read_bytes(),
                              ACL="public-read")  # world-readable, as PMC's bucket
            count += 1
        return count

    def fail(self, path: str, times: int) -> None:
        """Answer the next ``times`` requests for ``path`` (e.g. ``/bucket/key``) with 503 SlowDown."""
        with self.lock:
            self.failures[path] = times

    def gets(self, suffix: str = "") -> Counter:
        """GET counts by key for keys ending in ``suffix`` (listing requests excluded)."""
        prefix = f"/{self.bucket}/"
        return Counter({path[len(prefix):]: n for (method, path), n in self.requests.items()
                        if method == "GET" and path.startswith(prefix) and path.endswith(suffix) and n})


def _handler(server: LocalS3):
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _relay(self) -> None:
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with server.lock:
                server.requests[(self.command, path)] += 1
                failing = server.failures.get(path, 0)
                if failing:
                    server.failures[path] = failing - 1
            if failing:
                payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if server.delay_s:
                time.sleep(server.delay_s)
            upstream = http.client.HTTPConnection(server.backend, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

    return Proxy
