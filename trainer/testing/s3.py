"""A real S3-compatible server for tests and benchmarks: moto's standalone server, started as its own
process on 127.0.0.1 and a free port, stopped by whoever started it (and killed by itself after
``lifetime_s`` if that never happens). Clients talk to it over HTTP like to any S3 endpoint.

    with s3_server() as endpoint:
        options = bucket(endpoint, "ckpts")   # storage_options for checkpoint.storage_options
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

#: moto accepts any credentials unless told to check them; these are what the tests sign with.
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key-never-logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s3_server(
    lifetime_s: float = 7200.0, start_timeout_s: float = 60.0, unauthenticated_actions: int | None = None
) -> Iterator[str]:
    """An S3 server on 127.0.0.1; yields its endpoint URL (``http://127.0.0.1:PORT``).

    ``unauthenticated_actions``: after that many requests the server checks every signature and IAM
    policy (moto's ``INITIAL_NO_AUTH_ACTION_COUNT``); the first ones create the users (see
    :func:`users_with_keys`). None: any credentials are accepted."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"the S3 test server needs moto[server] ({exc}): pip install -e '.[test]'"
        ) from None
    port = free_port()
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    if unauthenticated_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(unauthenticated_actions)
    server = subprocess.Popen(
        [
            "timeout",
            "-s",
            "KILL",
            str(int(lifetime_s)),
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the S3 test server exited at start (code {server.returncode})")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the S3 test server did not answer within {start_timeout_s} s"
                    ) from None
                time.sleep(0.1)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


def client(endpoint: str) -> Any:
    """A boto3 S3 client of ``endpoint`` (for tests that look at the bucket behind the toolkit's back)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of ``bucket``: ``{key: body}``, read behind the toolkit's back."""
    s3 = client(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def options_overrides(url: str, options: dict[str, str]) -> tuple[str, ...]:
    """The overrides that point ``checkpoint.dir`` at ``url`` with these ``checkpoint.storage_options``."""
    return (f"checkpoint.dir={url}", *(f"+checkpoint.storage_options.{k}={v}" for k, v in options.items()))


def storage_options(endpoint: str) -> dict[str, Any]:
    """``checkpoint.storage_options`` for the server."""
    return {"endpoint_url": endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}


def new_bucket(endpoint: str, prefix: str = "ckpt") -> str:
    """Create a bucket with a fresh name; returns the name."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


#: IAM policies of :func:`users_with_keys`' users.
POLICIES = {
    "writer": ["s3:*"],
    "reader": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket", "s3:GetBucketLocation"],
}
#: Requests :func:`users_with_keys` makes before the server starts checking (3 per user, 1 bucket).
SETUP_ACTIONS = 3 * len(POLICIES) + 1


def users_with_keys(endpoint: str, bucket: str) -> dict[str, dict[str, str]]:
    """On a server started with ``unauthenticated_actions=SETUP_ACTIONS``: a user per :data:`POLICIES` entry
    with an access key, and ``bucket``; returns ``{user: {"key", "secret"}}``."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
        region_name="us-east-1",
    )
    keys = {}
    for user, actions in POLICIES.items():
        iam.create_user(UserName=user)
        document = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-s3", PolicyDocument=json.dumps(document))
        created = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"key": created["AccessKeyId"], "secret": created["SecretAccessKey"]}
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=keys["writer"]["key"],
        aws_secret_access_key=keys["writer"]["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return keys
