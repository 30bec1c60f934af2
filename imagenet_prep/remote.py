"""Build folders in object storage: URIs, the filesystems pyarrow opens for them, and
whole-object reads and writes that retry what a network drops (docs/design.md, "Remote
build folders").

A build folder may be any URI `pyarrow.fs.FileSystem.from_uri` opens (`s3://`, `gs://`,
`hdfs://`, `file://`), options in its query (`?endpoint_override=host:port&scheme=http`).
Credentials come from the environment, as pyarrow's clients find them; when there are
none, or they are refused, the user gets one line saying so, not a stack of SDK errors.
`?anonymous=true` reads a public bucket unsigned (pyarrow's URI parser has no such option;
its S3 and GCS filesystems take it as an argument).

A URI may hold secrets (`s3://KEY:SECRET@bucket/…`, `?secret_key=…`): every URI shown, in a
message, a log line or a file, goes through `display`, which masks them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow.fs as pafs

from alexprep.imagenet_prep.errors import DataError

RETRIES = 5  # attempts per object before a dropped connection is the user's problem
BACKOFF_S = 0.5  # first wait between attempts; doubles each time (0.5, 1, 2, 4 s)
CHUNK = 8 << 20  # bytes per read or write: one ranged GET per 8 MiB on S3
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403",
           "EXPIRED_TOKEN", "Unauthorized", "Permission denied", "PERMISSION_DENIED")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket does not exist")  # not to be retried either
_AWS_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
PUSH_MARKS = ".pushed"  # push's markers, <path>/<SHA-256>.<version>, beside a build (push.py)
OBJECT_STORES = ("s3", "gcs")  # filesystems whose objects appear whole when their upload completes
_METADATA_HOST = ("169.254.169.254", 80)  # the instance-role endpoint of EC2 and GCE


def is_uri(root) -> bool:
    """Whether `root` names a remote build folder (a str with a scheme), not a local path.
    A pathlib.Path never is: it collapses the `//`."""
    return isinstance(root, str) and "://" in root


MASK = "***"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def display(uri) -> str:
    """`uri` as it may be shown anywhere (messages, logs, config files): user info (a key and
    secret) and every query value masked, `s3://***@bucket/path?endpoint_override=***`; the
    option names stay, so a reader knows some were given. A local path is returned as it is."""
    if not is_uri(uri):
        return str(uri)
    scheme, rest = uri.split("://", 1)
    rest, _, fragment = rest.partition("#")
    rest, has_query, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    shown = f"{scheme}://{netloc}{slash}{path}".rstrip("/")
    if has_query:
        shown += "?" + "&".join(f"{pair.split('=', 1)[0]}={MASK}" if "=" in pair else pair
                                for pair in query.split("&") if pair)
    return shown + (f"#{MASK}" if fragment else "")


def scrub(text: str, uri: str) -> str:
    """`text` (a library's error message) with the secrets of `uri` masked: its user info
    and query values, wherever they appear."""
    if not is_uri(uri):
        return text
    parts = urlsplit(uri)
    user = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    secrets = [user, *user.split(":"), unquote(user), *unquote(user).split(":")]
    secrets += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
    secrets += [pair.split("=", 1)[1] for pair in parts.query.split("&") if "=" in pair]  # as written (%-escaped)
    plain = ("http", "https", *_TRUE, *_FALSE)  # values no secret can be, and words a message needs
    for secret in sorted({s for s in secrets if len(s) >= 3 and s.lower() not in plain}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _anonymous(uri: str) -> bool | None:
    """The value of the URI's `anonymous` option (None when absent)."""
    values = [v.lower() for k, v in parse_qsl(urlsplit(uri).query, keep_blank_values=True) if k == "anonymous"]
    if not values:
        return None
    if values[-1] not in _TRUE + _FALSE:
        raise DataError(f"{display(uri)}: anonymous={values[-1]!r}: give ?anonymous=true or leave it out")
    return values[-1] in _TRUE


def credential_problem(uri: str) -> str | None:
    """Why `uri` cannot be read for lack of credentials, or None when some source exists
    (the URI, the environment, a credentials file, an instance role) or none is needed."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    if _anonymous(uri) or "access_key" in query or "@" in parts.netloc:
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
    """Credential refusals, and a bucket that does not exist, as one DataError line naming
    the build folder (neither is retried)."""
    try:
        yield
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError) and any(mark in str(exc) for mark in _NO_BUCKET):
            raise DataError(f"{display(uri)}: its bucket does not exist: create it (push does not), or check the "
                            f"bucket's name") from None
        if isinstance(exc, FileNotFoundError) or not any(mark in str(exc) for mark in _DENIED):
            raise
        first = scrub(str(exc).splitlines()[0][:300], uri)
        raise DataError(f"{display(uri)}: access denied ({first}): check the credentials in the environment "
                        f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)") from None


def retrying(action, what: str, attempts: int | None = None, uri: str = ""):
    """`action()`, tried again after an OSError (a dropped connection, a 5xx) with
    exponential backoff; the last failure becomes a DataError naming `what`. A missing
    object or refused credentials are not retried. `uri`: whose secrets the message masks."""
    attempts = attempts or RETRIES
    for attempt in range(attempts):
        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if any(mark in str(exc) for mark in _DENIED + _NO_BUCKET):
                raise
            if attempt == attempts - 1:
                last = scrub(str(exc).splitlines()[0][:300], uri)
                raise DataError(f"{what}: failed {attempts} times, last with: {last} "
                                "(check the network, then run the same command again)") from None
            time.sleep(BACKOFF_S * 2 ** attempt)


@dataclass
class RemoteFolder:
    """A folder in some filesystem pyarrow speaks, addressed by paths relative to it."""

    uri: str  # as given, options and any secrets included: show it only through display()
    fs: pafs.FileSystem
    base: str  # the folder's path inside fs

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def name(self, rel: str) -> str:
        """`rel` as a URI, for messages (masked as display() does, its query left out)."""
        shown = display(self.uri).split("?", 1)[0]
        return f"{shown}/{rel}" if rel else shown

    def retrying(self, action, what: str):
        """retrying(), its message masked for this folder's URI."""
        with remote_errors(self.uri):
            return retrying(action, what, uri=self.uri)

    def listing(self) -> dict[str, tuple[int, int]]:
        """{relative path: (bytes, mtime in ns)} of every file under the folder (one listing)."""
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        infos = self.retrying(lambda: self.fs.get_file_info(selector), f"listing {self.name('')}")
        cut = len(self.base.rstrip("/")) + 1
        return {i.path[cut:]: (i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}

    def sizes(self) -> dict[str, int]:
        """{relative path: bytes} of every file under the folder (one listing)."""
        return {rel: size for rel, (size, _) in self.listing().items()}

    def version(self, rel: str) -> str | None:
        """What changes when the object is written again, whatever its bytes: its ETag where
        the store gives one (S3, GCS), else its modification time; None when it is missing."""
        def look() -> str | None:
            if self.fs.type_name in OBJECT_STORES:
                with self.fs.open_input_file(self.path(rel)) as f:  # a HEAD request
                    etag = f.metadata().get("ETag")
                if etag:
                    return etag.decode().strip('"')
            info = self.fs.get_file_info(self.path(rel))
            return str(info.mtime_ns) if info.type == pafs.FileType.File else None

        try:
            return self.retrying(look, f"looking at {self.name(rel)}")
        except FileNotFoundError:
            return None

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        return self.retrying(read, f"reading {self.name(rel)}")

    def open_input(self, rel: str):
        """A sequential stream of one object (what downloads read; tests wrap it to fail)."""
        with remote_errors(self.uri):
            return self.fs.open_input_stream(self.path(rel))

    def sha256(self, rel: str) -> tuple[int, str]:
        """(bytes, SHA-256) of one object, streamed (nothing written locally); retried."""
        def stream() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            with self.open_input(rel) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            return size, digest.hexdigest()

        return self.retrying(stream, f"reading {self.name(rel)}")

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

        self.retrying(write, f"writing {self.name(rel)}")

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.retrying(lambda: self.fs.delete_file(self.path(rel)), f"deleting {self.name(rel)}")


def open_folder(uri: str) -> RemoteFolder:
    """The folder `uri` names, or one DataError line: an unknown scheme or option, missing
    credentials."""
    problem = credential_problem(uri)
    if problem:
        raise DataError(f"{display(uri)}: {problem}")
    try:
        fs, path = _filesystem(uri)
    except ValueError as exc:  # pyarrow.ArrowInvalid: the URI itself
        raise DataError(f"{display(uri)} is not a build folder URI pyarrow can open ({scrub(str(exc), uri)}); "
                        "expected s3://bucket/path, gs://, hdfs:// or file:// with options as ?key=value") from None
    except OSError as exc:  # a well-formed URI whose store did not answer (S3 looks up the bucket's region)
        raise DataError(f"cannot reach {display(uri)} ({scrub(str(exc), uri)}): check the network and the endpoint "
                        "(?endpoint_override=host:port&scheme=http for a private store); ?region=NAME skips "
                        "S3's region lookup") from None
    return RemoteFolder(uri, fs, path.rstrip("/"))


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and path for `uri`, its `anonymous` option applied here: the URI
    parser rejects it, the S3 and GCS filesystems take it as an argument."""
    anonymous = _anonymous(uri)
    if anonymous is None:
        return pafs.FileSystem.from_uri(uri)
    head, _, query = uri.partition("?")
    rest = "&".join(p for p in query.split("&") if p and p.split("=", 1)[0] != "anonymous")
    fs, path = pafs.FileSystem.from_uri(f"{head}?{rest}" if rest else head)
    if fs.type_name not in OBJECT_STORES:
        raise DataError(f"{display(uri)}: ?anonymous applies to s3:// and gs:// buckets only")
    if anonymous:
        # A filesystem pickles as (constructor, (its options,)): the same options, unsigned.
        make, (options,) = fs.__reduce__()
        options = {**options, "anonymous": True}
        for key in ("access_key", "secret_key", "session_token"):
            if key in options:
                options[key] = None
        fs = make(options)
    return fs, path
