"""Build folders in object storage: URIs, the filesystems pyarrow opens for them, and
whole-object reads and writes that retry what a network drops (docs/design.md, "Remote
build folders").

A build folder may be any URI `pyarrow.fs.FileSystem.from_uri` opens (`s3://`, `gs://`,
`hdfs://`, `file://`), options in its query (`?endpoint_override=host:port&scheme=http`).
Credentials come from the environment, as pyarrow's clients find them; when there are
none, or they are refused, the user gets one line saying so, not a stack of SDK errors.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from alexprep.imagenet_prep.errors import DataError

RETRIES = 5  # attempts per object before a dropped connection is the user's problem
BACKOFF_S = 0.5  # first wait between attempts; doubles each time (0.5, 1, 2, 4 s)
CHUNK = 8 << 20  # bytes per read or write: one ranged GET per 8 MiB on S3
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403",
           "EXPIRED_TOKEN", "Unauthorized", "Permission denied", "PERMISSION_DENIED")
_AWS_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
OBJECT_STORES = ("s3", "gcs")  # filesystems whose objects appear whole when their upload completes
_METADATA_HOST = ("169.254.169.254", 80)  # the instance-role endpoint of EC2 and GCE


def is_uri(root) -> bool:
    """Whether `root` names a remote build folder (a str with a scheme), not a local path.
    A pathlib.Path never is: it collapses the `//`."""
    return isinstance(root, str) and "://" in root


def display(uri: str) -> str:
    """The URI without its query (options such as an endpoint, never shown twice)."""
    return uri.split("?", 1)[0].rstrip("/")


def credential_problem(uri: str) -> str | None:
    """Why `uri` cannot be read for lack of credentials, or None when some source exists
    (the environment, a credentials file, an instance role) or none is needed."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    if query.get("anonymous", [""])[0].lower() in ("true", "1") or "access_key" in query:
        return None
    if parts.scheme == "s3":
        files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
                 os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
        if any(os.environ.get(v) for v in _AWS_SOURCES) or any(os.path.exists(os.path.expanduser(f)) for f in files):
            return None
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true" and _metadata_reachable():
            return None
        return ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                "~/.aws/credentials, an instance role), or add ?anonymous=true for a public bucket")
    if parts.scheme == "gs":
        adc = os.path.expanduser("~/.config/gcloud/application_default_credentials.json")
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or os.path.exists(adc) or _metadata_reachable():
            return None
        return ("no Google Cloud credentials found: set GOOGLE_APPLICATION_CREDENTIALS (or run "
                "`gcloud auth application-default login`), or add ?anonymous=true for a public bucket")
    return None


def _metadata_reachable() -> bool:
    """Whether a cloud instance's metadata endpoint (instance-role credentials) answers."""
    try:
        with socket.create_connection(_METADATA_HOST, timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def remote_errors(uri: str):
    """Credential refusals as one DataError line naming the build folder."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or not any(mark in str(exc) for mark in _DENIED):
            raise
        first = str(exc).splitlines()[0][:300]
        raise DataError(f"{display(uri)}: access denied ({first}): check the credentials in the environment "
                        f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)") from None


def retrying(action, what: str, attempts: int | None = None):
    """`action()`, tried again after an OSError (a dropped connection, a 5xx) with
    exponential backoff; the last failure becomes a DataError naming `what`. A missing
    object or refused credentials are not retried."""
    attempts = attempts or RETRIES
    for attempt in range(attempts):
        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if any(mark in str(exc) for mark in _DENIED):
                raise
            if attempt == attempts - 1:
                raise DataError(f"{what}: failed {attempts} times, last with: {str(exc).splitlines()[0][:300]} "
                                "(check the network, then run the same command again)") from None
            time.sleep(BACKOFF_S * 2 ** attempt)


@dataclass
class RemoteFolder:
    """A folder in some filesystem pyarrow speaks, addressed by paths relative to it."""

    uri: str  # as given, options included
    fs: pafs.FileSystem
    base: str  # the folder's path inside fs

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def name(self, rel: str) -> str:
        """`rel` as a URI, for messages."""
        return f"{display(self.uri)}/{rel}" if rel else display(self.uri)

    def sizes(self) -> dict[str, int]:
        """{relative path: bytes} of every file under the folder (one listing)."""
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        with remote_errors(self.uri):
            infos = retrying(lambda: self.fs.get_file_info(selector), f"listing {self.name('')}")
        cut = len(self.base.rstrip("/")) + 1
        return {i.path[cut:]: i.size for i in infos if i.type == pafs.FileType.File}

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        with remote_errors(self.uri):
            return retrying(read, f"reading {self.name(rel)}")

    def open_input(self, rel: str):
        """A sequential stream of one object (what downloads read; tests wrap it to fail)."""
        with remote_errors(self.uri):
            return self.fs.open_input_stream(self.path(rel))

    @contextlib.contextmanager
    def open_output(self, rel: str):
        """A stream into a new object that appears whole when the block ends, never in part:
        S3 and GCS publish an object when its upload completes; elsewhere (a local or HDFS
        folder) it is written under a temporary name and renamed."""
        target = self.path(rel)
        whole = self.fs.type_name in OBJECT_STORES
        tmp = target if whole else f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
        with remote_errors(self.uri):
            if not whole:
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            try:
                with self.fs.open_output_stream(tmp) as out:
                    yield out
                if not whole:
                    self.fs.move(tmp, target)
            except BaseException:
                if not whole:
                    with contextlib.suppress(OSError):
                        self.fs.delete_file(tmp)
                raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write() -> None:
            with self.open_output(rel) as f:
                f.write(data)

        with remote_errors(self.uri):
            retrying(write, f"writing {self.name(rel)}")

    def delete(self, rel: str) -> None:
        with remote_errors(self.uri), contextlib.suppress(FileNotFoundError):
            retrying(lambda: self.fs.delete_file(self.path(rel)), f"deleting {self.name(rel)}")


def open_folder(uri: str) -> RemoteFolder:
    """The folder `uri` names, or one DataError line: an unknown scheme or option, missing
    credentials."""
    problem = credential_problem(uri)
    if problem:
        raise DataError(f"{display(uri)}: {problem}")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except ValueError as exc:  # pyarrow.ArrowInvalid: the URI itself
        raise DataError(f"{display(uri)} is not a build folder URI pyarrow can open ({exc}); "
                        "expected s3://bucket/path, gs://, hdfs:// or file:// with options as ?key=value") from None
    except OSError as exc:  # a well-formed URI whose store did not answer (S3 looks up the bucket's region)
        raise DataError(f"cannot reach {display(uri)} ({exc}): check the network and the endpoint "
                        "(?endpoint_override=host:port&scheme=http for a private store); ?region=NAME skips "
                        "S3's region lookup") from None
    return RemoteFolder(uri, fs, path.rstrip("/"))
