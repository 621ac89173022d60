"""Object storage: one small interface over local folders and s3:// URIs.

boto3 lives here and nowhere else. S3 endpoints come from the standard AWS configuration
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, profiles, instance roles); credentials are never taken
as arguments, so they cannot end up in a config file or a log; a URI that carries them
(s3://KEY:SECRET@bucket) is refused with a message that does not repeat them. S3 calls that fail
for a transient reason (no connection, time-outs, 5xx, throttling: 429, SlowDown, RequestTimeout)
are retried with exponential backoff, bounded by a total time-out, because transient S3 errors must
not kill a month-long run (ray #47939). A request S3 (or botocore) rejects for what it is -- invalid
parameters, any other 4xx -- fails at once: no retry can fix it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from pnet_dist.log import get_logger, has_userinfo, redact_uris

log = get_logger(__name__)
T = TypeVar("T")
_READ_CHUNK = 8 << 20
_TRANSFER_LOCK = threading.Lock()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def refuse_credentials(uri: str, where: str) -> None:
    """ValueError (naming `where`, not the secret) if the URI carries user info."""
    if has_userinfo(uri):
        raise ValueError(f"{where}: {redact_uris(uri)} carries credentials before '@'; remove them from the URI: "
                         "credentials come from the standard AWS chain (environment variables, ~/.aws, the "
                         "instance role), never from a URI, which is written into logs, config.yaml and checkpoints")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {redact_uris(uri)!r}")
    refuse_credentials(uri, "s3 URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}; write s3://BUCKET/prefix")
    return bucket, key


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try an S3 call: attempts with exponential backoff inside a total time-out."""
    max_attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    timeout_s: float = 600.0


class RequestRejected(ValueError):
    """S3 (or botocore, before sending) rejected a request for what it is: not retried."""


# Client errors (4xx) that a later attempt can get past: throttling and time-outs.
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "RequestThrottled",
                    "TooManyRequestsException", "RequestLimitExceeded", "OperationAborted"}
_TRANSIENT_STATUS = {408, 429}


def rejection(exc: BaseException) -> str | None:
    """Why no retry can fix `exc` (e.g. 'InvalidBucketName, HTTP 400'), or None if it may be transient."""
    from botocore.exceptions import ClientError, ParamValidationError
    if isinstance(exc, ParamValidationError):
        return "invalid request parameters"
    if isinstance(exc, (TypeError, ValueError)):  # botocore checks of the endpoint, region, arguments
        return type(exc).__name__
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if 400 <= status < 500 and status not in _TRANSIENT_STATUS and code not in _TRANSIENT_CODES:
            return f"{code or 'client error'}, HTTP {status}"
    return None


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = RetryPolicy()) -> T:
    """Call fn until it succeeds, the attempts run out, or the time-out passes; an error no retry
    can fix (see `rejection`) raises RequestRejected at once (PermissionError for access denied)."""
    start = time.monotonic()
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError):  # no retry fixes a missing key or a denied read
            raise
        except Exception as exc:  # noqa: BLE001 -- any transport error is worth a retry
            reason = rejection(exc)
            if reason is not None:
                if reason.endswith("HTTP 403"):
                    raise PermissionError(f"{what}: access denied ({reason})") from exc
                raise RequestRejected(f"{what} was rejected ({reason}; not retried, no retry can fix it): "
                                      f"{exc}") from exc
            elapsed = time.monotonic() - start
            delay = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
            if attempt == policy.max_attempts or elapsed + delay > policy.timeout_s:
                raise RuntimeError(f"{what} failed after {attempt} attempts in {elapsed:.1f}s: {exc}") from exc
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", what, attempt, policy.max_attempts, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Storage:
    """Files under a root that is a local folder or an s3:// prefix. Keys are '/'-separated."""

    def __init__(self, root: str, retry: RetryPolicy = RetryPolicy()):
        refuse_credentials(root, "storage root")
        self.root = root.rstrip("/")
        self.retry = retry
        self._client = None
        self._transfer = None
        if is_s3(root):
            self.bucket, self.prefix = split_s3(self.root)

    # -- S3 plumbing ---------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    @property
    def transfer(self):
        """One s3transfer manager for all uploads of this Storage, with boto3's default
        TransferConfig (8 MiB parts, 10 threads) -- what a raw upload_file gets. Files uploaded at
        once share its threads instead of starting 10 more each (client.upload_fileobj makes a
        manager per call)."""
        with _TRANSFER_LOCK:
            if self._transfer is None:
                from boto3.s3.transfer import TransferConfig, create_transfer_manager
                self._transfer = create_transfer_manager(self.client, TransferConfig())
        return self._transfer

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".lstrip("/") if self.prefix else key

    def uri(self, key: str = "") -> str:
        return join(self.root, key) if key else self.root

    def _local(self, key: str) -> Path:
        return Path(self.root) / key

    def _s3_read(self, fn: Callable[[], T], key: str, what: str) -> T:
        """fn (one S3 request about `key`), retried; a missing key raises FileNotFoundError at once."""
        def call():
            try:
                return fn()
            except self._client_error() as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(self.uri(key)) from exc
                if code in ("403", "AccessDenied"):
                    raise PermissionError(f"{self.uri(key)}: access denied") from exc
                raise
        return with_retries(call, f"{what} {self.uri(key)}", self.retry)

    def _write_local(self, key: str, write: Callable[[Path], None]) -> None:
        """write(tmp) into key's .partial sibling, then renamed over key: readers never see half a file."""
        dest = self._local(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        write(tmp)
        os.replace(tmp, dest)

    # -- interface -----------------------------------------------------------------------
    def put_file(self, local_path: str | os.PathLike, key: str, sha256: str | None = None) -> str:
        """Upload (or copy) a local file to key; returns its sha256. Without `sha256` it is computed
        from the bytes as they are read for the upload -- one pass over the file, not a second one
        for the checksum. A caller that took the digest from the bytes as it wrote the file passes
        it as `sha256`: the upload then reads the file in parts from several threads, as boto3's
        upload_file does, and hashes nothing."""
        if is_s3(self.root):
            def upload() -> str:
                if sha256 is not None:
                    self.transfer.upload(str(local_path), self.bucket, self._key(key)).result()
                    return sha256
                with open(local_path, "rb") as f:
                    reader = _HashingReader(f)
                    self.transfer.upload(reader, self.bucket, self._key(key)).result()
                return reader.hexdigest()
            return with_retries(upload, f"upload {local_path} -> {self.uri(key)}", self.retry)
        if sha256 is not None:
            self._write_local(key, lambda tmp: shutil.copyfile(local_path, tmp))
            return sha256
        digest = hashlib.sha256()

        def copy(tmp: Path) -> None:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_READ_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
        self._write_local(key, copy)
        return digest.hexdigest()

    def move_file(self, local_path: str | os.PathLike, key: str, sha256: str | None = None) -> str:
        """put_file, then the local file is gone; a local root on the same file system renames it
        (nothing copied; the checksum read, unless `sha256` is given, is the only pass). Returns
        its sha256."""
        if not is_s3(self.root):
            dest = self._local(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            digest = sha256 if sha256 is not None else sha256_file(local_path)
            try:
                os.replace(local_path, dest)
                return digest
            except OSError:  # another file system: copy below
                pass
        digest = self.put_file(local_path, key, sha256)
        os.unlink(local_path)
        return digest

    def create_exclusive(self, data: bytes, key: str) -> bool:
        """Write key only if it does not exist yet (S3 conditional write If-None-Match, an exclusive
        link on a local folder); False if it exists. Two writers racing for one key: one wins."""
        if is_s3(self.root):
            def put() -> bool:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                    return True
                except self._client_error() as exc:
                    if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                        return False
                    raise
            return with_retries(put, f"create {self.uri(key)}", self.retry)
        dest = self._local(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
        tmp.write_bytes(data)
        try:
            os.link(tmp, dest)  # fails if dest exists, atomically (also on NFS)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        if is_s3(self.root):
            self._s3_read(lambda: self.client.download_file(self.bucket, self._key(key), str(local_path)),
                          key, "download")
        else:
            if not self._local(key).exists():
                raise FileNotFoundError(self.uri(key))
            shutil.copyfile(self._local(key), local_path)

    def put_bytes(self, data: bytes, key: str) -> None:
        if is_s3(self.root):
            with_retries(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
                         f"put {self.uri(key)}", self.retry)
        else:
            self._write_local(key, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes:
        if is_s3(self.root):
            return self._s3_read(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read(),
                                 key, "get")
        path = self._local(key)
        if not path.exists():
            raise FileNotFoundError(self.uri(key))
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        if is_s3(self.root):
            return self._s3_read(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"],
                                 key, "head")
        path = self._local(key)
        if not path.is_file():
            raise FileNotFoundError(self.uri(key))
        return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        """Every key under prefix (recursive), relative to the root, sorted."""
        return sorted(self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} for every key under prefix (recursive), keys relative to the root:
        one listing, where size() per key would be one request each."""
        if is_s3(self.root):
            def list_all():
                sizes = {}
                paginator = self.client.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                    for obj in page.get("Contents", []):
                        sizes[obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]] = obj["Size"]
                return sizes
            return with_retries(list_all, f"list {self.uri(prefix)}", self.retry)
        base = Path(self.root)
        start = base / prefix
        if not start.exists():
            return {}
        if start.is_file():
            return {prefix: start.stat().st_size}
        sizes = {}
        for path in start.rglob("*"):
            if path.name.endswith(".partial"):
                continue
            try:
                if path.is_file():
                    sizes[str(path.relative_to(base))] = path.stat().st_size
            except FileNotFoundError:  # removed while listed (another rank pruning)
                continue
        return sizes

    def delete(self, key: str) -> None:
        """Delete one key (no error if it is already gone)."""
        if is_s3(self.root):
            with_retries(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)),
                         f"delete {self.uri(key)}", self.retry)
        else:
            self._local(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under prefix."""
        if is_s3(self.root):
            keys = self.list(prefix)
            for i in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
                with_retries(lambda: self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch}),
                             f"delete {self.uri(prefix)}", self.retry)
        else:
            target = self._local(prefix)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    @staticmethod
    def _client_error():
        from botocore.exceptions import ClientError
        return ClientError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingReader:
    """A read-only, non-seekable view of a file that hashes what is read through it. Non-seekable
    on purpose: s3transfer then reads the parts in order, one thread, so the digest is the file's."""

    def __init__(self, f):
        self._f = f
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._digest.update(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class HashingWriter:
    """A write-only file object that hashes what is written through it (torch.save accepts it):
    the file's sha256 and size without reading the file back."""

    def __init__(self, f):
        self._f = f
        self._digest = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data) -> int:
        self._digest.update(data)
        self.num_bytes += memoryview(data).nbytes
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def s3_client():
    """A boto3 S3 client from the standard AWS chain (endpoint from AWS_ENDPOINT_URL_S3 if set)."""
    import boto3
    from botocore.config import Config
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60))


def open_storage(uri: str, retry: RetryPolicy = RetryPolicy()) -> Storage:
    return Storage(uri, retry)


def check_s3_access(uri: str, *, write: bool, timeout_s: float = 10.0) -> None:
    """Fail in bounded time, with one clear ValueError, unless the bucket of `uri` answers to this
    process's credentials -- and, with write=True, takes and deletes a probe object under `uri`.

    For a launcher's pre-flight: one attempt per request and short time-outs instead of the
    retries of Storage (made for transient errors in a month-long run), so a missing bucket, a
    missing credential or an endpoint that does not answer is reported in seconds, not minutes.
    Nothing is left behind: the probe is deleted (a failed start changes nothing).
    """
    import uuid

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = split_s3(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    where = f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=timeout_s,
                      read_timeout=timeout_s))
    probe = f"{prefix.rstrip('/')}/.pnet_dist_write_probe_{uuid.uuid4().hex}".lstrip("/")
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        if write:
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
    except NoCredentialsError:
        raise ValueError(f"{uri}: no AWS credentials found (environment, ~/.aws, or the node's instance profile); "
                         "give this machine credentials that may read" + (" and write" if write else "") +
                         f" {where}") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("NoSuchBucket", "404"):
            raise ValueError(f"{uri}: bucket {bucket!r} does not exist{' at ' + endpoint if endpoint else ''}; "
                             "create it or fix the URI") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                    "InvalidToken", "AllAccessDisabled"):
            raise ValueError(f"{uri}: {where} refused these credentials ({code}); the role or keys need "
                             f"s3:ListBucket{', s3:PutObject and s3:DeleteObject' if write else ''} on it") from None
        raise ValueError(f"{uri}: {where} answered {code}: {exc}") from None
    except BotoCoreError as exc:  # endpoint unreachable, time-out, bad endpoint URL, ...
        raise ValueError(f"{uri}: cannot reach {where} within {timeout_s:g}s ({type(exc).__name__}: {exc}); "
                         "check AWS_ENDPOINT_URL_S3 / the network") from None
