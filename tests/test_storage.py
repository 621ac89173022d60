"""Storage against a local folder and the real S3 HTTP server on 127.0.0.1."""
import hashlib
import os

import pytest

import torch

from pnet_dist.storage import HashingWriter, RetryPolicy, Storage, open_storage, split_s3, with_retries

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"{bucket}/some/prefix")


def test_roundtrip_list_delete(storage, tmp_path):
    storage.put_bytes(b"hello", "a/one.txt")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    storage.put_file(src, "a/b/two.bin")
    storage.put_bytes(b"z", "c.txt")
    assert storage.list() == ["a/b/two.bin", "a/one.txt", "c.txt"]
    assert storage.list("a/") == ["a/b/two.bin", "a/one.txt"]
    assert storage.get_bytes("a/one.txt") == b"hello"
    assert storage.size("a/b/two.bin") == 1000
    storage.get_file("a/b/two.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 1000
    assert storage.exists("c.txt") and not storage.exists("nope.txt")
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("nope.txt")
    storage.delete_prefix("a/")
    assert storage.list() == ["c.txt"]


def test_bad_s3_uri():
    with pytest.raises(ValueError, match="bucket"):
        split_s3("s3:///key")


def test_retries_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("transient")
        return "ok"

    assert with_retries(flaky, "flaky call", RetryPolicy(base_delay_s=0.01)) == "ok"
    assert len(calls) == 3


def test_retries_give_up_with_named_error():
    def broken():
        raise ConnectionError("down")

    with pytest.raises(RuntimeError, match="upload x failed after 2 attempts"):
        with_retries(broken, "upload x", RetryPolicy(max_attempts=2, base_delay_s=0.01))


def test_missing_key_is_not_retried(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("absent")


def test_upload_returns_the_sha256_of_what_it_read_and_move_removes_the_source(storage, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(1 << 20) * 19  # 19 MiB: three multipart parts on S3, read in order while hashed
    src.write_bytes(data)
    assert storage.put_file(src, "big.bin") == hashlib.sha256(data).hexdigest()
    assert storage.move_file(src, "moved.bin") == hashlib.sha256(data).hexdigest() and not src.exists()
    storage.get_file("moved.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    storage.delete("moved.bin")
    storage.delete("moved.bin")  # already gone: no error
    assert storage.list() == ["big.bin"]


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_file_hashed_as_torch_save_wrote_it_uploads_with_that_digest(storage, tmp_path, zipfile):
    """The asynchronous checkpoint writes its files through HashingWriter and uploads them with the
    digest it took (no second hashing pass); that digest is the written file's, in both of
    torch.save's formats, and the upload carries the file's bytes."""
    state = {"w": torch.randn(3 << 20), "step": 7}  # 12 MiB of tensor: two multipart parts on S3
    src = tmp_path / "state.pt"
    with open(src, "wb") as f:
        writer = HashingWriter(f)
        torch.save(state, writer, _use_new_zipfile_serialization=zipfile)
    data = src.read_bytes()
    assert writer.hexdigest() == hashlib.sha256(data).hexdigest() and writer.num_bytes == len(data)
    assert torch.equal(torch.load(src)["w"], state["w"])
    assert storage.move_file(src, "state.pt", writer.hexdigest()) == writer.hexdigest() and not src.exists()
    storage.get_file("state.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == data


def test_create_exclusive_lets_one_writer_win(storage):
    assert storage.create_exclusive(b"first", "fence/g1")
    assert not storage.create_exclusive(b"second", "fence/g1")
    assert storage.get_bytes("fence/g1") == b"first" and storage.list() == ["fence/g1"]


def test_redaction_of_uris_in_logs_and_errors():
    import logging

    from pnet_dist import cli
    from pnet_dist.log import get_logger, redact_uris
    assert redact_uris("put s3://KEY:SE/CRET@bucket/a failed; s3://bucket/dir/a@b ok") == \
        "put s3://***@bucket/a failed; s3://bucket/dir/a@b ok"
    assert cli.one_line(ValueError("cannot read https://user:pw@host/x")) == "cannot read https://***@host/x"
    get_logger("pnet_dist.test_storage")
    handler = next(h for h in logging.getLogger("pnet_dist").handlers if h.filters)  # ours: with the rank filter
    record = logging.LogRecord("pnet_dist.x", logging.WARNING, __file__, 1, "upload to %s failed",
                               ("s3://KEY:SECRET@bucket/x",), None)
    handler.filter(record)  # sets the rank the format shows
    line = handler.format(record)
    assert line.endswith("upload to s3://***@bucket/x failed") and "SECRET" not in line


def test_storage_refuses_a_root_with_credentials():
    with pytest.raises(ValueError, match=r"s3://\*\*\*@bucket carries credentials") as info:
        open_storage("s3://KEY:SECRET@bucket")
    assert "SECRET" not in str(info.value)


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("code,status,retried", [("InternalError", 500, True), ("SlowDown", 503, True),
                                                 ("RequestTimeout", 400, True), ("TooManyRequests", 429, True),
                                                 ("InvalidArgument", 400, False), ("NoSuchBucket", 404, False),
                                                 ("MalformedXML", 400, False)])
def test_only_errors_a_retry_can_fix_are_retried(code, status, retried):
    from pnet_dist.storage import RequestRejected
    calls = []

    def fails():
        calls.append(1)
        raise _client_error(code, status)

    policy = RetryPolicy(max_attempts=3, base_delay_s=0.01)
    if retried:
        with pytest.raises(RuntimeError, match="failed after 3 attempts"):
            with_retries(fails, "put x", policy)
    else:
        with pytest.raises(RequestRejected, match=f"put x was rejected \\({code}, HTTP {status}; not retried"):
            with_retries(fails, "put x", policy)
    assert len(calls) == (3 if retried else 1)


def test_s3_client_errors_fail_at_once(s3_server, s3_bucket, caplog):
    """Against the real S3 server: a request for a missing bucket and one with an invalid bucket name
    each fail on the first attempt, without a retry, although the policy would keep trying for ten minutes."""
    from pnet_dist.storage import RequestRejected
    patient = RetryPolicy(max_attempts=50, base_delay_s=5.0, timeout_s=600)
    with pytest.raises(RequestRejected, match=r"put s3://no-such-bucket-here/k was rejected \(NoSuchBucket, HTTP 404"):
        Storage("s3://no-such-bucket-here", patient).put_bytes(b"x", "k")
    with pytest.raises(RequestRejected, match="invalid request parameters"):
        Storage("s3://not;a;bucket/p", patient).put_bytes(b"x", "k")  # botocore refuses the name before sending
    assert "retrying" not in caplog.text
