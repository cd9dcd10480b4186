"""kombu's Redis transport, made to survive a Redis restart (``create_celery_app`` uses it).

When the broker connection drops while a worker holds unacknowledged messages (a countdown
task it waits to run, such as a discovery tick or a retry), Celery closes the connection twice:
once in ``Connection.collect()``, which may give up on the channel while it is polling and then
detaches the transport from its connection, and once more with ``Connection.close()``. The
second close tries to put the unacknowledged messages back, builds a new Redis client from the
detached connection, and fails with ``AttributeError: 'NoneType' object has no attribute
'hostname'``; that error is not a connection error, so the worker stops ("Unrecoverable error").
Measured with celery 5.7 and kombu 5.7 (tests/system/test_outages.py).

The same happens to a message a task sends (a retry, the next stage) on a channel the lost
connection closed: ``AttributeError: 'NoneType' object has no attribute 'client'``, which kombu
does not retry, so the retry is refused and the task given up.

The channel below reports both cases as the connection error they are: Celery ignores it and
reconnects, and kombu's publish retries open a new channel. The unacknowledged messages stay in
Redis and come back once the visibility timeout has passed; the crawler starts a new discovery
chain for each unfinished job as soon as it is connected again, so no job waits for them.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:  # closed under this channel
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
