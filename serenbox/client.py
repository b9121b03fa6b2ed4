"""`serenbox.client`: subscribe to one SerenBox or all of them, with typed messages.

    import serenbox.client

    with serenbox.client.connect("broker.lan", device="+", client_id="my-app") as c:
        for msg in c.messages():
            if isinstance(msg, serenbox.client.Event):
                print(msg.device_id, msg.type, msg.emotion, msg.confidence)

Delivery (docs/mqtt.md, "Python client"):
- A persistent session (MQTT 5 with a session expiry, or 3.1.1 with clean_session=False when the
  broker refuses 5) and QoS 1: what is published while this client is away waits on the broker.
- Manual acknowledgement: a message is acknowledged to the broker only when the application asks
  for the next one (or calls `ack()`, or leaves the `with` block without an exception), so a crash
  while handling it means the broker sends it again.
- Duplicates (a redelivery, a box's lost PUBACK) are dropped by event `id`, remembering the last
  `dedupe` ids.
- A payload that cannot be read is logged, counted in `counters()["malformed"]`, acknowledged and
  skipped.
- `group="name"`: members share one stream of events through an MQTT 5 shared subscription.

Imports paho only: no numpy, OpenCV or TFLite.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from serenbox.messages import (
    KINDS,
    Availability,
    Box,
    CommandError,
    Event,
    MalformedMessage,
    Message,
    State,
    Stats,
    Summary,
    Track,
    parse,
)
from serenbox.mqtt_tls import Tls, secure

__all__ = [
    "Availability",
    "Box",
    "Client",
    "CommandError",
    "Dedupe",
    "Event",
    "MalformedMessage",
    "Message",
    "State",
    "Stats",
    "Summary",
    "Tls",
    "Track",
    "connect",
    "nats_group",
]

if TYPE_CHECKING:
    from serenbox.nats_group import NatsGroup

log = logging.getLogger("serenbox.client")

DEFAULT_DEDUPE = 10_000
# A session named by the application outlives this process as long as a box's spool keeps events.
NAMED_SESSION_EXPIRY_S = 7 * 24 * 3600
# A generated client id cannot be resumed by another process: its session only has to outlive a
# broker restart or a network cut, and is deleted when the client closes (MQTT 5).
ANONYMOUS_SESSION_EXPIRY_S = 3600
# QoS 1 messages the broker may send before we acknowledge: bounds what waits in this process.
RECEIVE_MAXIMUM = 100
# CONNACK reasons meaning "this broker does not speak MQTT 5" (3.1.1 code 1, MQTT 5 code 0x84).
_UNSUPPORTED_PROTOCOL = (1, 0x84)
# Two processes with one client id take the session from each other in turn: the broker closes
# each connection as the other opens. paho reports only "unspecified error", so count them.
SHORT_CONNECTION_S = 2.0
SHORT_CONNECTIONS_TO_WARN = 3


@dataclass
class _Received:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection delivered it: an ack belongs to that connection only


class Dedupe:
    """The last `size` event ids, oldest forgotten first (bounded memory)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"dedupe: must be at least 1, got {size}")
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def discard(self, event_id: str) -> None:
        self._ids.pop(event_id, None)

    def __len__(self) -> int:
        return len(self._ids)


class Client:
    """A connected subscriber; make one with `connect()`. Read it from one thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        device: str,
        prefix: str,
        group: str | None,
        client_id: str | None,
        persistent: bool,
        username: str | None,
        password: str | None,
        tls: Tls | bool | None,
        protocol: str,
        keepalive: int,
        session_expiry_s: int | None,
        kinds: Iterable[str],
        dedupe: int,
    ) -> None:
        _check_level("device", device, allow_plus=True)
        _check_level("prefix", prefix.strip("/"), allow_slash=True)
        if group is not None:
            _check_level("group", group)
        self.kinds = tuple(kinds)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds: {unknown or 'none'} (known: {', '.join(KINDS)})")
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol: {protocol!r} is not auto, 5 or 3.1.1")
        if group is not None and protocol == "3.1.1":
            # mosquitto accepts $share from 3.1.1 clients, but it is an MQTT 5 feature; say so early.
            log.warning("group %r over MQTT 3.1.1: shared subscriptions are an MQTT 5 feature", group)
        self.host, self.port = host, port
        self.device, self.group = device, group
        self._base = f"{prefix.strip('/')}/{device}"
        self.named = client_id is not None
        self.client_id = client_id or f"serenbox-client-{uuid.uuid4().hex[:12]}"
        self.persistent = persistent
        if session_expiry_s is None:
            session_expiry_s = NAMED_SESSION_EXPIRY_S if self.named else ANONYMOUS_SESSION_EXPIRY_S
        self._expiry = session_expiry_s if persistent else 0
        self._username, self._password, self._tls = username, password, tls
        self._keepalive = keepalive
        self.protocol = "3.1.1" if protocol == "3.1.1" else "5"
        self._auto = protocol == "auto"
        self._dedupe = Dedupe(dedupe)
        self._queue: queue.Queue[_Received] = queue.Queue()
        self._taken: _Received | None = None
        self._lock = threading.Lock()
        # Guarded by _lock: written on paho's network thread.
        self._connection = 0
        self._connected = False
        self._answer: ReasonCode | None = None
        self._answered = threading.Event()
        self._subscribed = threading.Event()
        self._closed = False
        self._connected_at = 0.0
        self._short_connections = 0
        self._counts = {"received": 0, "duplicates": 0, "malformed": 0, "acked": 0, "reconnects": 0}
        self._client = self._make_client()

    # ----- public API -----------------------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        """What this client subscribes to; events through `$share/<group>/` in a group."""
        out = []
        for kind in self.kinds:
            topic = f"{self._base}/{kind}"
            out.append(f"$share/{self.group}/{topic}" if kind == "events" and self.group else topic)
        return out

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Typed messages as they come, deduplicated; the previous one is acknowledged when the
        next is asked for. Ends after `timeout` seconds without a message (None: never) or at close."""
        while True:
            self.ack()
            msg = self.next(timeout)
            if msg is None:
                return
            yield msg

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Only the events (other messages are acknowledged and passed over)."""
        for msg in self.messages(timeout):
            if isinstance(msg, Event):
                yield msg

    def run(self, handler: Callable[[Message], object], timeout: float | None = None) -> None:
        """Call `handler` for every message; each is acknowledged once the handler returns. An
        exception from the handler ends the loop and leaves that message unacknowledged: the broker
        sends it again when this client id connects next."""
        for msg in self.messages(timeout):
            try:
                handler(msg)
            except BaseException:
                self._release()
                raise
        self.ack()

    def next(self, timeout: float | None = None) -> Message | None:
        """The next message (acknowledge it with `ack()`), or None after `timeout` s or at close."""
        if self._taken is not None:
            raise RuntimeError("acknowledge the previous message with ack() before taking the next")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            msg = self._accept(item)
            if msg is not None:
                self._taken = item
                return msg
        return None

    def ack(self) -> None:
        """Acknowledge the message last returned (done for you by `messages()` and `run()`)."""
        item, self._taken = self._taken, None
        if item is not None:
            self._ack(item)

    def _release(self) -> None:
        """Give up the message last returned without acknowledging it: the broker sends it again
        on this client id's next connection, and dedupe must not take that for a duplicate."""
        item, self._taken = self._taken, None
        if item is not None:
            with contextlib.suppress(MalformedMessage):
                msg = parse(item.topic, item.payload)
                if isinstance(msg, Event):
                    self._dedupe.discard(msg.id)

    def counters(self) -> dict[str, int | bool]:
        with self._lock:
            return {**self._counts, "connected": self._connected}

    def close(self) -> None:
        """Disconnect. A named session stays on the broker to be resumed; a generated one is removed."""
        if self._closed:
            return
        self._closed = True
        properties = None
        if self.protocol == "5" and not self.named and self._expiry:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self._client.disconnect(properties=properties)
        self._client.loop_stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # Leaving the block normally means the last message was handled.
        if exc_type is None and not self._closed:
            self.ack()
        self.close()

    # ----- connection -----------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        v5 = self.protocol == "5"
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not self.persistent,
            manual_ack=True,
        )
        c.suppress_exceptions = True
        c.reconnect_delay_set(0.2, 5)  # type: ignore[arg-type]
        tls = (self._tls if isinstance(self._tls, Tls) else Tls()) if self._tls else None
        secure(c, self._username, self._password, tls)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    def _start(self, timeout: float) -> Client:
        where = f"{self.host}:{self.port}"
        reason = self._try(timeout)
        if reason is not None and self._auto and self.protocol == "5" and reason.value in _UNSUPPORTED_PROTOCOL:
            log.info("MQTT broker %s does not accept MQTT 5; using 3.1.1", where)
            self._client.loop_stop()
            self.protocol = "3.1.1"
            self._client = self._make_client()
            reason = self._try(timeout)
        if reason is not None:
            self.close()
            raise ConnectionError(f"the MQTT broker {where} refused the connection: {str(reason).lower()}")
        if not self._subscribed.wait(timeout):
            self.close()
            raise ConnectionError(f"the MQTT broker {where} did not confirm the subscription within {timeout:g} s")
        return self

    def _try(self, timeout: float) -> ReasonCode | None:
        """Connect and wait for the CONNACK: None when accepted, else the refusal."""
        where = f"{self.host}:{self.port}"
        self._answered.clear()
        kwargs: dict[str, Any] = {}
        if self.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._expiry
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            # clean_start=False on every connect: the session is resumed, not only after the first.
            kwargs = {"clean_start": not self.persistent, "properties": properties}
        self._client.connect_timeout = timeout
        try:
            self._client.connect(self.host, self.port, keepalive=self._keepalive, **kwargs)
        except (OSError, ValueError) as e:
            self.close()
            why = getattr(e, "strerror", None) or e
            raise ConnectionError(f"cannot reach the MQTT broker {where} ({why})") from None
        self._client.loop_start()
        if not self._answered.wait(timeout):
            self.close()
            raise ConnectionError(f"the MQTT broker {where} did not answer within {timeout:g} s")
        with self._lock:
            return self._answer

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            if reason.is_failure:
                self._answer = reason
                self._answered.set()
                if self._auto and self.protocol == "5" and reason.value in _UNSUPPORTED_PROTOCOL:
                    client.disconnect()  # _start reconnects with 3.1.1
                else:
                    log.warning("MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason)
                return
            self._connection += 1
            self._connected = True
            self._connected_at = time.monotonic()
            if self._connection > 1:
                self._counts["reconnects"] += 1
        # Always subscribe: a broker without persistence forgot the session on restart, and a
        # repeated subscription to a kept session changes nothing.
        client.subscribe([(t, 1) for t in self.topics])
        with self._lock:
            self._answer = None
        self._answered.set()
        log.info(
            "connected to MQTT broker %s:%d (MQTT %s, session %s)",
            self.host,
            self.port,
            self.protocol,
            "resumed" if flags.session_present else "new",
        )

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        refused = [t for t, r in zip(self.topics, reasons, strict=False) if r.is_failure]
        for topic in refused:
            log.error("MQTT broker %s:%d refused the subscription to %s", self.host, self.port, topic)
        self._subscribed.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            was, self._connected = self._connected, False
        if was and not self._closed:
            log.warning("MQTT connection lost (%s); reconnecting", str(reason).lower())
            self._note_short_connection()

    def _note_short_connection(self) -> None:
        with self._lock:
            short = time.monotonic() - self._connected_at < SHORT_CONNECTION_S
            self._short_connections = self._short_connections + 1 if short else 0
            warn = self._short_connections == SHORT_CONNECTIONS_TO_WARN
        if warn:
            log.error(
                "the broker closed %d connections in a row right after they opened: is another process "
                "using client id %r? (give each process its own)",
                SHORT_CONNECTIONS_TO_WARN,
                self.client_id,
            )

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._counts["received"] += 1
            connection = self._connection
        self._queue.put(_Received(msg.topic, msg.payload, msg.mid, msg.qos, connection))

    # ----- reading --------------------------------------------------------------------------

    def _accept(self, item: _Received) -> Message | None:
        """The typed message, or None (acknowledged) for a duplicate or a malformed payload."""
        try:
            msg = parse(item.topic, item.payload)
        except MalformedMessage as e:
            with self._lock:
                self._counts["malformed"] += 1
            log.warning("skipped a malformed message: %s", e)
            self._ack(item)
            return None
        if isinstance(msg, Event):
            if self._dedupe.seen(msg.id):
                with self._lock:
                    self._counts["duplicates"] += 1
                self._ack(item)
                return None
            self._dedupe.add(msg.id)
        return msg

    def _ack(self, item: _Received) -> None:
        if item.qos == 0:
            return
        with self._lock:
            # An ack on a later connection could hit another message that reuses the packet id;
            # the broker sends an unacknowledged message again instead, and dedupe drops it.
            current = item.connection == self._connection and self._connected
            if current:
                self._counts["acked"] += 1
        if current:
            self._client.ack(item.mid, item.qos)


def nats_group(servers: Iterable[str], group: str, **options: Any) -> NatsGroup:
    """A consumer group on a NATS cluster (docs/fleet.md; needs the `fleet` extra): members that
    share `group` share the boxes' events, at least once, acknowledged as the caller takes them.

        with serenbox.client.nats_group(["nats://n1:4222", "nats://n2:4222"], "analytics") as g:
            for event in g.messages():      # serenbox.client.Event, as from connect()
                ...

    `options` are `serenbox.nats_group.NatsGroup`'s (topic_prefix, ack_wait_s, batch, ...). On a
    single mosquitto, `connect(..., group=...)` is the same thing through MQTT 5 shared subscriptions.
    """
    try:
        from serenbox.nats_group import NatsGroup  # nats-py only for those who use it
    except ImportError as e:
        raise ImportError(f"serenbox.client.nats_group needs nats-py: pip install 'serenbox[fleet]' ({e})") from None
    return NatsGroup(list(servers), group, **options)


def connect(
    host: str = "localhost",
    port: int = 1883,
    *,
    device: str = "+",
    prefix: str = "serenbox",
    group: str | None = None,
    client_id: str | None = None,
    persistent: bool = True,
    username: str | None = None,
    password: str | None = None,
    tls: Tls | bool | None = None,
    protocol: str = "auto",
    keepalive: int = 30,
    session_expiry_s: int | None = None,
    kinds: Iterable[str] = KINDS,
    dedupe: int = DEFAULT_DEDUPE,
    timeout: float = 10.0,
) -> Client:
    """Connect and subscribe; raises ConnectionError (one line) when the broker cannot be reached,
    refuses the login or does not answer within `timeout` seconds.

    `device`: one box's device_id, or "+" for every box. `client_id`: name it to resume the same
    session from a later process (each process of a group needs its own). `persistent=False`: a
    live view only, nothing kept while away. `tls`: True (system CAs) or `Tls(ca_file=...)`.
    `kinds`: which of events, state, stats, availability, error to receive.
    """
    client = Client(
        host,
        port,
        device=device,
        prefix=prefix,
        group=group,
        client_id=client_id,
        persistent=persistent,
        username=username,
        password=password,
        tls=tls,
        protocol=protocol,
        keepalive=keepalive,
        session_expiry_s=session_expiry_s,
        kinds=kinds,
        dedupe=dedupe,
    )
    return client._start(timeout)


def _check_level(name: str, value: str, allow_plus: bool = False, allow_slash: bool = False) -> None:
    bad = set("#+") - ({"+"} if allow_plus and value == "+" else set())
    if not value or any(ch in value for ch in bad) or (not allow_slash and "/" in value):
        raise ValueError(f"{name}: {value!r} is not a valid MQTT topic level")
