"""`imgsift keys`: an operator's keys, against a real Redis, usable by the API at once."""

from __future__ import annotations

import redis
from typer.testing import CliRunner

from imgsift.cli import app
from imgsift_common.apikeys import ApiKeyStore, hash_key


def test_create_list_and_revoke_keys(redis_url: str) -> None:
    runner = CliRunner()
    made = runner.invoke(
        app, ["keys", "create", "--name", "team a", "--rate-limit", "120/minute", "--redis-url", redis_url]
    )
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("isk_") and len(key) > 40
    store = ApiKeyStore(redis.Redis.from_url(redis_url, decode_responses=True))
    record = store.lookup(key)
    assert record is not None and record.name == "team a" and record.rate_limit == "120/minute" and not record.admin
    raw = redis.Redis.from_url(redis_url)
    assert raw.exists(f"imgsift:apikey:{hash_key(key)}") and key.encode() not in b"".join(
        raw.dump(k) or b"" for k in raw.keys("*")
    )

    listed = runner.invoke(app, ["keys", "list", "--redis-url", redis_url])
    assert record.id in listed.stdout and "team a" in listed.stdout and key not in listed.stdout

    bad = runner.invoke(app, ["keys", "create", "--name", "x", "--rate-limit", "lots", "--redis-url", redis_url])
    assert bad.exit_code != 0 and "120/minute" in bad.output

    assert runner.invoke(app, ["keys", "revoke", record.id, "--redis-url", redis_url]).exit_code == 0
    assert store.lookup(key) is None
    again = runner.invoke(app, ["keys", "revoke", record.id, "--redis-url", redis_url])
    assert again.exit_code == 1 and "no key" in again.output
