"""A small S3 reader for ``s3://pmc-oa-opendata`` or any S3-compatible store (MinIO, Ceph, a lab mirror).

Why boto3 rather than s3fs: the work is many small whole-object GETs from worker threads, and boto3 gives
exactly what that needs with no event loop — a thread-safe client whose connection pool is sized to the
concurrency (``max_pool_connections``), connect/read timeouts, and botocore's *standard* retry mode
(exponential backoff with jitter on 500/502/503/504, throttling and connection errors); unsigned requests
are one ``Config(signature_version=UNSIGNED)``, which is how the PMC page and pmc-toolkit access the
bucket. s3fs would add aiobotocore (and its tight botocore pin) and an async loop for no gain here.

botocore does not retry an error while *reading the body* of a response; ``get`` retries those itself
with the same backoff. Sizes are checked from ``ContentLength`` before the body is read (``--max-image-mb``),
MD5s from PMC's metadata URLs (``...?md5=``) are verified, and every request, retry and byte is counted.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .packages import FileMissing, FileTooLarge


class FetchError(RuntimeError):
    """A request that still failed after its retries (network, 5xx, bad checksum): retry the run later."""


@dataclass
class S3Options:
    endpoint_url: str | None = None     # e.g. http://minio.lab:9000; None: AWS
    signed: bool = False                # PMC's bucket is world-readable: unsigned by default
    concurrency: int = 16
    timeout: float = 30.0               # seconds, connect and read
    retries: int = 5                    # retries after the first try, botocore standard mode + body reads
    region: str = "us-east-1"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``); the prefix may be empty."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"{url!r}: expected s3://BUCKET[/PREFIX], e.g. s3://pmc-oa-opendata")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store:
    """GET/LIST on one bucket (and key prefix), counting requests and bytes; safe to share between threads."""

    def __init__(self, url: str, options: S3Options | None = None):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        self.options = options or S3Options()
        self.bucket, self.prefix = parse_s3_url(url)
        config = Config(connect_timeout=self.options.timeout, read_timeout=self.options.timeout,
                        retries={"max_attempts": self.options.retries, "mode": "standard"},
                        max_pool_connections=max(10, self.options.concurrency),
                        # MinIO and most S3-compatible servers want path-style URLs
                        s3={"addressing_style": "path" if self.options.endpoint_url else "auto"},
                        **({} if self.options.signed else {"signature_version": UNSIGNED}))
        self.client = boto3.session.Session().client("s3", endpoint_url=self.options.endpoint_url,
                                                     region_name=self.options.region, config=config)
        self.stats: Counter = Counter()
        self._lock = threading.Lock()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self.stats.update(amounts)

    def get(self, key: str, limit: int | None = None, md5: str | None = None) -> bytes:
        """The object's bytes; ``FileMissing`` (404), ``FileTooLarge`` (before reading), ``FetchError``."""
        from botocore.exceptions import BotoCoreError, ClientError

        attempts = self.options.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as exc:
                self._count(requests=1 + _retries(exc.response), retries=_retries(exc.response))
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    raise FileMissing(self.url(key)) from exc
                raise FetchError(f"{self.url(key)}: {exc}") from exc
            except BotoCoreError as exc:  # connection refused / timeouts after botocore's own retries
                raise FetchError(f"{self.url(key)}: {exc}") from exc
            self._count(requests=1 + _retries(response), retries=_retries(response))
            size = response.get("ContentLength") or 0
            if limit is not None and size > limit:
                response["Body"].close()
                raise FileTooLarge(self.url(key), size, limit)
            try:
                data = response["Body"].read()
            except BotoCoreError as exc:  # a body cut mid-read: botocore does not retry these
                if attempt == attempts:
                    raise FetchError(f"{self.url(key)}: {exc}") from exc
                self._count(retries=1)
                time.sleep(random.uniform(0, min(2 ** attempt, 20)))
                continue
            self._count(bytes=len(data))
            if md5 and hashlib.md5(data).hexdigest() != md5:
                raise FetchError(f"{self.url(key)}: MD5 differs from PMC's metadata (object changed or corrupted)")
            return data
        raise FetchError(f"{self.url(key)}: failed after {attempts} attempts")

    def check(self) -> None:
        """One small listing before a run, so a wrong bucket or endpoint is one clear error, not a
        failure per article."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise FetchError(f"s3://{self.bucket}/{self.prefix}: cannot list the bucket ({exc}); check the bucket "
                             f"name and --endpoint-url{'' if self.options.signed else ' (requests are unsigned; --signed uses your AWS credentials)'}") from exc

    def list_prefixes(self, prefix: str) -> list[str]:
        """Sub-"folders" directly under ``prefix`` (``PMC123.`` → ``PMC123.1``, ``PMC123.2``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/")
            for page in pages:
                self._count(requests=1 + _retries(page))
                found += [p["Prefix"][len(self.prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except (ClientError, BotoCoreError) as exc:
            raise FetchError(f"{self.url(prefix)}*: listing failed ({exc})") from exc
        return found


def _retries(response: dict) -> int:
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
