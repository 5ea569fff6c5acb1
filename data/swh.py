"""Contents of smollm-corpus python-edu rows, which carry only a Software Heritage blob id: fetched
from the public `softwareheritage` S3 bucket (`content/<blob_id>`, gzip), unsigned, cached on disk.
Failures are counted and the document skipped; if nothing at all can be fetched the run stops with a
message instead of training on an empty source. Needs the optional `boto3` extra."""

from __future__ import annotations

import gzip
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from .sources import DataError

logger = logging.getLogger(__name__)

BUCKET = "softwareheritage"


class SoftwareHeritageFetcher:
    def __init__(self, cache_dir: str | os.PathLike, client=None, max_workers: int = 16, give_up_after: int = 64):
        self.cache_dir = Path(cache_dir)
        self._client = client
        self.max_workers = max_workers
        self.give_up_after = give_up_after  # consecutive failures with no success at all
        self.fetched = 0
        self.failed = 0
        self.cached = 0

    @property
    def client(self):
        if self._client is None:
            try:
                import boto3
                from botocore import UNSIGNED
                from botocore.config import Config
            except ImportError as exc:
                raise DataError(
                    "python-edu needs boto3 to fetch file contents from Software Heritage: pip install "
                    "'smolpretrain[swh]' (or boto3), or use a local copy of python-edu with a `text` column"
                ) from exc
            config = Config(signature_version=UNSIGNED, connect_timeout=5, read_timeout=20, retries={"max_attempts": 2})
            self._client = boto3.client("s3", config=config)
        return self._client

    def _path(self, blob_id: str) -> Path:
        return self.cache_dir / blob_id[:2] / f"{blob_id}.gz"

    def _one(self, blob_id: str) -> Optional[str]:
        path = self._path(blob_id)
        try:
            if path.is_file():
                self.cached += 1
                return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            body = self.client.get_object(Bucket=BUCKET, Key=f"content/{blob_id}")["Body"].read()
            text = gzip.decompress(body).decode("utf-8", errors="replace")
        except DataError:
            raise
        except Exception as exc:  # network, missing object, corrupt gzip: skip this document
            self.failed += 1
            logger.debug("software heritage blob %s: %s", blob_id, exc)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        self.fetched += 1
        return text

    def fetch(self, blob_ids: list[str]) -> list[Optional[str]]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            texts = list(pool.map(self._one, blob_ids))
        if self.fetched + self.cached == 0 and self.failed >= min(self.give_up_after, len(blob_ids)):
            raise DataError(
                f"python-edu: none of {self.failed} Software Heritage blobs could be fetched from s3://{BUCKET} "
                f"(offline, or S3 unreachable). Use a local copy of python-edu with a `text` column, or drop the "
                f"source (weight 0)."
            )
        return texts
