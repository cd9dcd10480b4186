"""The broker transport: a channel whose connection was closed under it reports a connection
error (which Celery and kombu recover from), not an AttributeError that stops the worker."""

from __future__ import annotations

import pytest
import redis.exceptions
from kombu import Connection

from imgsift_common import broker
from imgsift_common.celery_app import create_celery_app


def test_redis_apps_use_the_transport_that_survives_a_redis_restart(redis_url: str) -> None:
    app = create_celery_app("broker-test", redis_url)
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, broker.Transport)


@pytest.mark.parametrize("closed", ["transport", "connection"])
def test_a_channel_closed_under_its_connection_raises_a_connection_error(redis_url: str, closed: str) -> None:
    with Connection(redis_url, transport=broker.TRANSPORT) as conn:
        channel = conn.channel()
        assert channel._connparams()["port"] == conn.port  # connected: the normal parameters
        if closed == "transport":  # what Connection.collect() leaves after a lost connection
            channel.connection.client = None
        else:  # a producer's channel after its connection was closed
            channel.connection = None
        with pytest.raises(redis.exceptions.ConnectionError):
            channel._connparams()
        assert isinstance(redis.exceptions.ConnectionError(), tuple(conn.connection_errors))
