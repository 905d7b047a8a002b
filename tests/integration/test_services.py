"""The service fixtures themselves work: Redis and the S3 server answer on 127.0.0.1."""

from __future__ import annotations

import pytest
import redis
from minio import Minio

from tests.services import RedisServer, S3Server

pytestmark = pytest.mark.integration


def test_redis_server_answers(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    assert client.get("k") == b"v"


def test_s3_server_round_trip(s3_server: S3Server) -> None:
    client = Minio(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False
    )
    import io

    client.put_object(s3_server.bucket, "a/b.txt", io.BytesIO(b"hello"), 5)
    assert client.get_object(s3_server.bucket, "a/b.txt").read() == b"hello"
