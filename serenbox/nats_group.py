"""A consumer group for SerenBox events on a NATS cluster: several processes share one stream.

    with NatsGroup(["nats://n1:4222", "nats://n2:4222"], group="analytics") as group:
        for event in group.events():
            handle(event)          # acknowledged when you ask for the next one

Boxes publish over NATS's MQTT gateway, which stores every QoS 1 message in the JetStream stream
`$MQTT_msgs` (subject `$MQTT.msgs.<prefix>.<device_id>.events`, replicated on the cluster's
nodes). Each group is one durable pull consumer on that stream with explicit acks: members of
the same group fetch disjoint batches, an event is acknowledged only after the caller has
handled it, and whatever a dead member held unacknowledged goes to the others after
`ack_wait_s`. That is at-least-once; a NATS queue group (core NATS, no acks) is at-most-once and
loses what a member held when it died (docs/fleet.md). Duplicates are dropped by event id within
a member; across members a redelivery can still repeat an event a dead member had handled.

Needs the `fleet` extra (`pip install 'serenbox[fleet]'`, the nats-py client).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import nats
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, ServiceUnavailableError

from serenbox.messages import Event, MalformedMessage, parse

log = logging.getLogger("serenbox.nats_group")

STREAM = "$MQTT_msgs"  # the NATS MQTT gateway's stream of QoS 1 messages
FETCH_WAIT_S = 1.0
# Errors a node's death or a leader election causes for a while; the member retries them.
_TRANSIENT = (NatsTimeout, NoRespondersError, ServiceUnavailableError, ConnectionClosedError, asyncio.TimeoutError)


def _topic_of(subject: str) -> str:
    """`$MQTT.msgs.<prefix>.<device_id>.events` → the MQTT topic `<prefix>/<device_id>/events`."""
    return subject.removeprefix("$MQTT.msgs.").replace(".", "/")


def events_subject(topic_prefix: str = "serenbox", device_id: str = "*") -> str:
    """The stream subject of `<prefix>/<device_id>/events` (MQTT '/' is NATS '.')."""
    return f"$MQTT.msgs.{topic_prefix.replace('/', '.')}.{device_id}.events"


class NatsGroup:
    def __init__(
        self,
        servers: list[str],
        group: str,
        *,
        topic_prefix: str = "serenbox",
        ack_wait_s: float = 30.0,
        batch: int = 100,
        max_ack_pending: int = 20_000,
        dedupe_window: int = 100_000,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not servers:
            raise ValueError("NatsGroup: no NATS server given")
        if not group or any(c in group for c in " .*>"):
            raise ValueError(f"NatsGroup: group {group!r} must be a non-empty name without spaces, '.', '*' or '>'")
        self.servers = list(servers)
        self.group = group
        self.subject = events_subject(topic_prefix)
        self.ack_wait_s = ack_wait_s
        self.batch = batch
        self.max_ack_pending = max_ack_pending
        self.connect_timeout_s = connect_timeout_s
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_window = dedupe_window
        self.received = 0  # messages fetched, duplicates included
        self.duplicates = 0  # dropped because their id was seen by this member
        self.malformed = 0  # not a JSON event with an id: acknowledged and dropped, never redelivered
        self._loop = asyncio.new_event_loop()
        self._nc: Any = None
        self._sub: Any = None

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def open(self) -> NatsGroup:
        # Once: `with group:` after an explicit open() made a second connection, and the first
        # one's tasks were never closed (left running, then "Task was destroyed" at exit).
        if self._nc is None:
            self._run(self._open())
        return self

    async def _open(self) -> None:
        self._nc = await nats.connect(
            servers=self.servers,
            connect_timeout=self.connect_timeout_s,
            max_reconnect_attempts=-1,  # a member outlives any node
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=self._on_error,
            reconnected_cb=self._on_reconnected,
        )
        js = self._nc.jetstream(timeout=self.connect_timeout_s)
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
        )
        # The first member creates the durable consumer; the others bind to it.
        self._sub = await js.pull_subscribe(self.subject, durable=self.group, stream=STREAM, config=config)

    async def _on_error(self, e: Exception) -> None:
        # nats-py's default prints a traceback for every refused reconnect while a node is down.
        log.warning("NATS connection: %s", e or type(e).__name__)

    async def _on_reconnected(self) -> None:
        log.info("NATS connection re-established to %s", self._nc.connected_url.netloc if self._nc else "?")

    def events(self, idle_timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """Event dicts, each acknowledged when the caller asks for the next (or closes the group).

        Ends after `idle_timeout_s` without any message (None: never)."""
        for _subject, _data, event in self._deliver(idle_timeout_s):
            yield event

    def messages(self, idle_timeout_s: float | None = None) -> Iterator[Event]:
        """The same events typed as `serenbox.client` gives them (`serenbox.client.Event`)."""
        for subject, data, _event in self._deliver(idle_timeout_s):
            try:
                message = parse(_topic_of(subject), data)
            except MalformedMessage as e:
                log.warning("skipped: %s", e)
                self.malformed += 1
                continue
            if isinstance(message, Event):
                yield message

    def _deliver(self, idle_timeout_s: float | None) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
        if self._sub is None:
            self.open()
        idle = 0.0
        while idle_timeout_s is None or idle < idle_timeout_s:
            try:
                msgs = self._run(self._sub.fetch(self.batch, timeout=FETCH_WAIT_S))
            except _TRANSIENT:
                idle += FETCH_WAIT_S
                continue
            except APIError as e:  # a consumer leader moving after a node's death
                log.warning("fetch failed (%s); retrying", e)
                idle += FETCH_WAIT_S
                self._run(asyncio.sleep(FETCH_WAIT_S))
                continue
            idle = 0.0
            for msg in msgs:
                self.received += 1
                event = self._decode(msg.data)
                if event is None:
                    self.malformed += 1
                elif event["id"] in self._seen:
                    self.duplicates += 1
                else:
                    yield msg.subject, msg.data, event
                    self._remember(event["id"])
                self._ack(msg)

    def _ack(self, msg: Any) -> None:
        try:
            self._run(msg.ack())
        except _TRANSIENT as e:
            # The event comes back after ack_wait_s and is then dropped as a duplicate.
            log.warning("ack failed (%s): the event will be redelivered", type(e).__name__)

    @staticmethod
    def _decode(data: bytes) -> dict[str, Any] | None:
        try:
            event = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        return event if isinstance(event, dict) and isinstance(event.get("id"), str) else None

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self._dedupe_window:
            self._seen.popitem(last=False)

    def close(self) -> None:
        if self._nc is not None:
            try:
                self._run(self._close())
            except Exception as e:  # closing a member on a dying cluster must not raise
                log.warning("closing the NATS connection: %s", e)
            self._nc = None
        self._loop.close()

    async def _close(self) -> None:
        # Not drain(): it waits for the pull subscription's inbox to empty, and the server's answer
        # to an expired fetch lands there with nobody to read it, so every other close took the
        # 30 s drain timeout. A flush (a PING answered) proves every ack sent was taken; what was
        # fetched and not handed out comes back to the group after ack_wait_s.
        try:
            await self._nc.flush(timeout=max(1, round(self.connect_timeout_s)))
        finally:
            await self._nc.close()
            # Whatever of the client still runs ends here, before the loop does ("Task was
            # destroyed but it is pending" at exit otherwise).
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> NatsGroup:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
