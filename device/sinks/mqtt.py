"""MQTT sink: events through a durable spool, at least once and in order; state, stats, commands.

Delivery design (see docs/mqtt.md):
- `emit` commits the event to the SQLite spool and wakes the publisher thread; it never waits
  for the network.
- The publisher thread hands paho at most `mqtt.window` events at a time (20; 1 on a cluster)
  and deletes a spool row only after its PUBACK. The spool, not paho, is the source of truth:
  on every disconnect and connect paho's own queue of unacknowledged messages is dropped and
  publication restarts from the oldest unacknowledged row, with a clean session so the broker
  never redelivers anything on its side. The only possible duplicates are events whose PUBACK was
  lost on the wire (at most a window); consumers dedupe on the event `id`.

Locks (acquired only in this order, so paho's callbacks cannot deadlock with the publisher):
`_pub` (publisher state) → paho's internal locks → `_cond` (acks, wake-ups). paho calls
`on_publish`, and at times `on_disconnect`, holding its message lock, so those callbacks only
touch `_cond`.

A broker cluster (`mqtt.hosts`, docs/fleet.md): the box holds one connection, to one node, and
mqtt_nodes.py picks the next one when it is lost. Nothing is lost or reordered across a switch:
the spool replays from its oldest unacknowledged row on every connect, whichever node it is. A
node that lost the box without noticing (a partition, a half-open socket) may publish the Last
Will `offline` after the box is `online` elsewhere: the box reads its own availability topic and
says `online` again when it sees that.

Home Assistant discovery (device/sinks/ha_discovery.py): the retained config goes out on every
connect, and again a moment after Home Assistant says `online` on its status topic; that
re-announcement runs on a timer thread, never on paho's network thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from serenbox.device.config import Config, ConfigError
from serenbox.device.sinks import ha_discovery
from serenbox.device.sinks.backlog import Backlog, Key, advance
from serenbox.device.sinks.base import CommandHandler, Sink
from serenbox.device.sinks.mqtt_nodes import NodeClient, Nodes
from serenbox.device.sinks.mqtt_topics import CommandError, Topics, error_payload, parse_command
from serenbox.device.sinks.paho_client import PAHO_LOG, check_tls_files, credentials, stop_network_thread
from serenbox.device.spool import Spool

log = logging.getLogger("serenbox.mqtt")

CLOSE_TIMEOUT_S = 2.0
# CONNACK reasons meaning "this broker does not speak MQTT 5" (3.1.1 code 1, MQTT 5 code 0x84).
_UNSUPPORTED_PROTOCOL = (1, 0x84)
_PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
# `online` is re-published every stats interval with an MQTT 5 expiry of this many intervals: if
# the daemon dies where no Last Will can fire (the broker was down and restored its session),
# the retained `online` expires by itself instead of lying forever.
AVAILABILITY_EXPIRY_INTERVALS = 3
_SESSION_TAKEN_OVER = 0x8E
# Home Assistant restarting says `online` to every device at once: spread the answers out.
ANNOUNCE_DELAY_S = (0.5, 3.0)
# A stale `offline` is answered at most this often, so two boxes sharing an id cannot flood the broker.
REASSERT_MIN_S = 1.0


def spool_path(cfg: Config) -> Path:
    return Path(cfg.mqtt.spool.path) if cfg.mqtt.spool.path else Path(cfg.state_dir) / "spool.sqlite"


class MqttSink(Sink):
    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._m = cfg.mqtt
        nodes = self._m.nodes()
        if not nodes:
            raise ConfigError("mqtt.host: required for the MQTT sink (or mqtt.hosts for a cluster)")
        self._nodes = Nodes(nodes, cfg.device_id)  # guarded by paho's network thread
        # With a clean session, QoS 1 on a subscription buys nothing a QoS 0 one lacks: nothing is
        # redelivered after a reconnect either way. On NATS each QoS 1 subscription is a replicated
        # JetStream consumer, created and deleted on every connect, which stalls a failover while the
        # cluster elects leaders (docs/fleet.md); so a cluster box subscribes at QoS 0.
        self._subscribe_qos = 0 if self._m.cluster() else 1
        # Events handed to paho and not yet acknowledged: bounds what a lost PUBACK can duplicate
        # and keeps the pipe full enough to drain a long outage quickly (config.py: why 1 on a cluster).
        self._window = self._m.effective_window()
        self._ack_timeout_s = self._m.effective_ack_timeout_s()
        check_tls_files(cfg)
        self.topics = Topics.for_device(self._m.topic_prefix, cfg.device_id)
        self._client_id = self._m.client_id or f"serenbox-{cfg.device_id}"
        self._protocol = _PROTOCOLS.get(self._m.protocol, MQTTProtocolVersion.MQTTv5)
        spool = Spool(spool_path(cfg), self._m.spool.max_events, self._m.spool.max_age_s)
        self._backlog = Backlog(spool)
        self._availability_every_s = self._m.stats_interval_s
        self._availability_at = -1e9
        self._rejected = 0
        self._ha_topic = ha_discovery.config_topic(cfg) if ha_discovery.enabled(cfg) else None
        self._ha_status = ha_discovery.status_topic(cfg)
        self._ha_payload = json.dumps(ha_discovery.payload(cfg), separators=(",", ":"))
        self._announce_timer: threading.Timer | None = None  # guarded by _cond

        self._pub = threading.RLock()
        # Held around each publish and around paho's reconnect (`NodeClient`), after `_pub` and
        # before paho's locks; paho's callbacks never take it.
        self._wire = threading.Lock()
        # Guarded by _pub: connection view of the publisher.
        self._connected = False
        self._connection = 0  # connections made so far; the one a disconnect ends is forgotten once
        # Last rowid and last memory number handed to paho on this connection (backlog.advance).
        self._cursor = (0, 0)
        self._inflight: dict[int, Key] = {}  # paho mid -> backlog key
        # When the window last moved: an ack came, or the first event went into an empty window.
        self._ack_progress_at = 0.0
        self._published = 0
        self._state_sent: str | None = None
        self._state_sent_at = -1e9

        self._cond = threading.Condition()
        # Guarded by _cond: written from other threads.
        self._acked_mids: list[int] = []
        self._rejected_mids: list[int] = []
        self._kick = True
        self._stopping = False
        self._fallback = False
        self._state_latest: str | None = None
        self._handler: CommandHandler | None = None
        self._refusal_logged: str | None = None
        self._reassert = False
        self._lost_connection: int | None = None  # set by paho's thread, handled by the publisher

        self._client = self._make_client()
        self._thread = threading.Thread(target=self._run, name="serenbox-mqtt", daemon=True)

    # ----- Sink interface -------------------------------------------------------------------

    def start(self) -> None:
        # connect_async + loop_start: the pipeline runs (and spools) while the broker is away.
        self._connect(self._client)
        self._thread.start()

    def emit(self, event: dict[str, Any]) -> None:
        # Never raises: a full disk keeps the event in memory (device/sinks/backlog.py).
        self._backlog.append(json.dumps(event, separators=(",", ":")))
        self._wake()

    def state(self, state: dict[str, Any]) -> None:
        with self._cond:
            self._state_latest = json.dumps(state, separators=(",", ":"), sort_keys=True)
            self._kick = True
            self._cond.notify()

    def stats(self, stats: dict[str, Any]) -> None:
        # QoS 0, not spooled: the next report supersedes a lost one.
        payload = json.dumps({**stats, **self.counters()}, separators=(",", ":"))
        self._publish(self.topics.stats, payload, qos=0)

    def problem(self) -> str | None:
        if self._stopping:
            return None
        if not self._thread.is_alive():
            return "the MQTT publisher thread has died"
        # paho's network thread; loop_start() names it, and it must run until close().
        network = getattr(self._client, "_thread", None)
        if network is not None and not network.is_alive():
            return "the MQTT network thread has died"
        return None

    def counters(self) -> dict[str, Any]:
        return {
            "spool_depth": len(self._backlog),
            # Bounds, a damaged spool file, memory overflow: every way an event failed to be kept.
            "spool_dropped": self._backlog.dropped,
            # Events kept in memory because the disk refused them (full, read-only).
            "spool_write_errors": self._backlog.write_errors,
            "mqtt_published": self._published,
            "mqtt_rejected": self._rejected,
            "mqtt_connected": self._connected,
            "mqtt_node": self._nodes.where(),
            "mqtt_failovers": self._nodes.failovers,
            "stats_interval_s": self._m.stats_interval_s,
        }

    def on_command(self, handler: CommandHandler) -> None:
        with self._cond:
            self._handler = handler

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            if self._announce_timer is not None:
                self._announce_timer.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        client = self._client
        # Let in-flight events be acknowledged so they are not sent again next start.
        while self._connected and time.monotonic() < deadline:
            self._collect_acks()
            with self._pub:
                if not self._inflight:
                    break
            time.sleep(0.02)
        info = self._publish(self.topics.availability, "offline", qos=1, retain=True)
        if info is not None:
            # The connection may go away meanwhile; the Last Will says offline instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        client.disconnect()
        stop_network_thread(client)
        self._collect_acks()
        self._backlog.close()

    # ----- paho client and callbacks (network thread) ---------------------------------------

    def _make_client(self) -> mqtt.Client:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        client = NodeClient(
            CallbackAPIVersion.VERSION2,
            pick=self._nodes.pick,
            wire=self._wire,
            client_id=self._client_id,
            protocol=self._protocol,
            # A clean session: the spool is what remembers unsent events, never the broker.
            clean_session=None if v5 else True,
        )
        client.enable_logger(PAHO_LOG)
        # An exception in one of our callbacks is logged by paho and the network thread goes on;
        # without this it ends the thread, and with it every reconnect, without a word.
        client.suppress_exceptions = True
        client.max_inflight_messages_set(self._window + 10)  # events + availability/state/errors
        client.reconnect_delay_set(self._m.reconnect_min_s, self._m.reconnect_max_s)  # type: ignore[arg-type]
        client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        credentials(client, self._cfg)
        client.on_connect = self._guarded(self._on_connect)
        client.on_disconnect = self._guarded(self._on_disconnect)
        client.on_publish = self._guarded(self._on_publish)
        client.on_message = self._guarded(self._on_message)
        client.on_connect_fail = self._guarded(self._on_connect_fail)
        return client

    def _connect(self, client: mqtt.Client) -> None:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        kwargs: dict[str, Any] = {"clean_start": True} if v5 else {}
        host, port = self._nodes.current
        client.connect_async(host, port, keepalive=self._m.keepalive, **kwargs)
        client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: mqtt.ConnectFlags, reason: ReasonCode, _p: Properties | None
    ) -> None:
        if reason.is_failure:
            self._nodes.outcome = "refused"
            self._on_refused(reason)
            return
        with self._pub:
            self._reset_connection(connected=True)
            self._refusal_logged = None
            self._nodes.stays = 0
            with self._cond:
                self._reassert = False  # `online` goes out just below
            self._publish_availability(client)
            qos = self._subscribe_qos
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                # retainHandling 2: a retained command is never delivered on subscribe.
                once = mqtt.SubscribeOptions(qos=qos, retainHandling=2)
                client.subscribe([(self.topics.set, once), (self.topics.availability, once)])
            else:
                client.subscribe([(self.topics.set, qos), (self.topics.availability, qos)])
            if self._ha_topic:
                self._announce(client)
                client.subscribe(self._ha_status, qos=qos)
            self._state_sent = None  # a new connection gets the latest state right away
        log.info(
            "connected to MQTT broker %s (MQTT %s); %d spooled event(s) to send",
            self._nodes.where(),
            "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1",
            len(self._backlog),
        )
        self._wake()

    def _publish_availability(self, client: mqtt.Client) -> None:
        """`online`, retained; under MQTT 5 with an expiry, re-sent before it runs out. Needs `_pub`."""
        properties = None
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)
            expiry = AVAILABILITY_EXPIRY_INTERVALS * self._availability_every_s
            properties.MessageExpiryInterval = max(1, round(expiry))
        self._publish(self.topics.availability, "online", qos=1, retain=True, properties=properties)
        self._availability_at = time.monotonic()

    def _guarded(self, callback: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                log.exception("MQTT callback %s failed", callback.__name__)

        return run

    def _on_refused(self, reason: ReasonCode) -> None:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        if self._m.protocol == "auto" and v5 and reason.value in _UNSUPPORTED_PROTOCOL:
            log.warning("MQTT broker %s does not accept MQTT 5; falling back to 3.1.1", self._nodes.where())
            with self._cond:
                self._fallback = True
                self._kick = True
                self._cond.notify()
            return
        text = str(reason)
        if text != self._refusal_logged:  # once per cause, not once per retry
            self._refusal_logged = text
            hint = ""
            if reason.value in (4, 5, 0x86, 0x87):
                hint = "; check mqtt.username and mqtt.password (or SERENBOX_MQTT_PASSWORD)"
            log.error(
                "MQTT broker %s refused the connection: %s%s; events are spooled, retrying",
                self._nodes.where(),
                text.lower(),
                hint,
            )

    def _on_connect_fail(self, _client: mqtt.Client, _u: Any) -> None:
        self._nodes.outcome = "unreachable"
        if self._refusal_logged != "unreachable":
            self._refusal_logged = "unreachable"
            log.warning(
                "could not connect to MQTT broker %s (unreachable, or the TLS handshake failed); "
                "events are spooled, retrying",
                self._nodes.where(),
            )

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, reason: ReasonCode, _p: Properties | None
    ) -> None:
        # paho calls this from inside its own locks at times (a write that fails while it handles a
        # CONNACK, holding its message lock): taking `_pub` here deadlocked with the publisher, which
        # holds `_pub` and waits for that lock in publish(), and dropping paho's messages here changed
        # them under paho's own loop (seen at 1 000 boxes). So only record; the publisher thread
        # forgets the connection (`_forget`). A stale True read meanwhile queues a batch on a dead client.
        was_connected = self._connected
        self._connected = False
        with self._cond:
            self._lost_connection = self._connection
            self._kick = True
            self._cond.notify()
        self._nodes.outcome = "lost" if was_connected else "refused"
        if was_connected and not self._stopping:
            log.warning(
                "MQTT connection lost (%s) on %s; spooling and reconnecting%s",
                str(reason).lower(),
                self._nodes.where(),
                " to the next node" if len(self._nodes) > 1 else "",
            )
            if reason.value == _SESSION_TAKEN_OVER:
                log.error(
                    "another MQTT client connected with this client id (%s): is device_id %r used by two boxes?",
                    self._client_id,
                    self._cfg.device_id,
                )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Properties | None) -> None:
        # Runs under paho's message lock: only record, the publisher thread does the work.
        with self._cond:
            # A refused event (not authorised) stays in the spool: it is tried again after the next
            # reconnect and never deleted as if delivered; it does not hold up the others.
            (self._rejected_mids if reason.is_failure else self._acked_mids).append(mid)
            self._kick = True
            self._cond.notify()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.availability:
            # A Last Will fired late by a node this box has left: it is up, so say so again.
            if msg.payload == b"offline":
                with self._cond:
                    if not self._stopping:
                        self._reassert = True
                        self._kick = True
                        self._cond.notify()
            return
        if msg.topic == self._ha_status:
            if self._ha_topic and msg.payload.strip() == ha_discovery.ONLINE:
                self._schedule_announce()
            return
        if msg.topic != self.topics.set:
            return
        if msg.retain:
            # A retained command would run again on every start: one bad one would crash-loop the box.
            self._report_command_error("retained commands are ignored (publish without retain)", msg.payload)
            return
        try:
            command = parse_command(msg.payload)
            with self._cond:
                handler = self._handler
            if handler is None:
                raise CommandError("this daemon accepts no commands")
            handler(command)
            log.info("command %s applied", command)
        except (CommandError, ValueError) as e:
            self._report_command_error(str(e), msg.payload)
        except Exception as e:  # a bug in a handler must not kill the network thread
            log.exception("command handler failed")
            self._report_command_error(f"internal error: {e}", msg.payload)

    def _announce(self, client: mqtt.Client) -> None:
        """The retained discovery config. Needs `_pub`."""
        assert self._ha_topic is not None
        self._publish(self._ha_topic, self._ha_payload, qos=1, retain=True)

    def _schedule_announce(self) -> None:
        delay = random.uniform(*ANNOUNCE_DELAY_S)
        with self._cond:
            if self._stopping:
                return
            if self._announce_timer is not None:
                self._announce_timer.cancel()  # one answer per burst of `online`
            self._announce_timer = threading.Timer(delay, self._announce_later)
            self._announce_timer.daemon = True
            self._announce_timer.start()
        log.info("Home Assistant is online: announcing this device again in %.1f s", delay)

    def _announce_later(self) -> None:
        try:
            with self._pub:
                if self._connected and not self._stopping:
                    self._announce(self._client)
        except Exception:  # a timer thread's exception would only reach stderr
            log.exception("Home Assistant discovery announcement failed")

    def _report_command_error(self, reason: str, raw: bytes) -> None:
        log.warning("rejected command on %s: %s", self.topics.set, reason[:300])
        self._client.publish(self.topics.error, error_payload(reason, raw), qos=1)

    # ----- publisher thread -----------------------------------------------------------------

    def _publish(
        self, topic: str, payload: str | bytes, qos: int, retain: bool = False, properties: Properties | None = None
    ) -> mqtt.MQTTMessageInfo | None:
        """Hand one message to paho, unless the connection is gone (None). paho queues whatever it is
        given, connected or not, and a publish racing a reconnect could go out before the CONNECT."""
        if not self._connected:
            return None
        with self._wire:
            if not self._connected:
                return None
            return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def _wake(self) -> None:
        with self._cond:
            self._kick = True
            self._cond.notify()

    def _reset_connection(self, connected: bool) -> None:
        """Forget everything paho holds; the spool is replayed from its oldest row. Needs `_pub`."""
        self._collect_acks()  # acks that arrived before the cut still count
        self._client.drop_out_messages()
        self._inflight.clear()
        self._cursor = (0, 0)
        self._connected = connected
        if connected:
            self._connection += 1

    def _forget(self, connection: int) -> None:
        """The publisher's half of a disconnect: unless a newer connection has come meanwhile."""
        with self._pub:
            if connection == self._connection:
                self._reset_connection(connected=False)

    def _collect_acks(self) -> None:
        with self._pub:
            with self._cond:
                mids, self._acked_mids = self._acked_mids, []
                rejected, self._rejected_mids = self._rejected_mids, []
            acked = [key for key in (self._inflight.pop(mid, None) for mid in mids) if key is not None]
            if mids or rejected:
                self._ack_progress_at = time.monotonic()
            self._published += len(acked)
            refused = sum(self._inflight.pop(mid, None) is not None for mid in rejected)
            if refused:
                self._rejected += refused
                log.error(
                    "MQTT broker refused %d event(s) on %s (not authorised?); they stay spooled and are sent "
                    "again after the next reconnect",
                    refused,
                    self.topics.events,
                )
            self._backlog.ack(acked)
            self._backlog.retry_deletes()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._kick and not self._stopping:
                    self._cond.wait(timeout=self._due_in())
                self._kick = False
                stopping, fallback, reassert = self._stopping, self._fallback, self._reassert
                lost, self._lost_connection = self._lost_connection, None
                self._fallback = False
            try:
                if lost is not None:
                    self._forget(lost)
                if fallback:
                    self._fall_back_to_311()
                self._pump()
                self._refresh_availability(reassert)
                # At shutdown the rate limit yields: the retained state must be the last one.
                self._publish_state(force=stopping)
            except Exception:  # keep spooling whatever happens; the next wake-up retries
                log.exception("MQTT publisher error")
                time.sleep(0.5)
            if stopping:
                return

    def _pump(self) -> None:
        with self._pub:
            self._collect_acks()
            if self._connected and self._inflight and self._ack_due_in() == 0.0:
                self._cut_stalled_connection()
                return
            while self._connected:
                room = self._window - len(self._inflight)
                if room <= 0:
                    return
                rows = self._backlog.after(self._cursor, room)
                if rows and not self._inflight:
                    self._ack_progress_at = time.monotonic()
                for key, payload in rows:
                    info = self._publish(self.topics.events, payload, qos=1)
                    if info is None:
                        return  # lost meanwhile: the connection's handler wakes this thread
                    self._inflight[info.mid] = key
                    self._cursor = advance(self._cursor, key)
                if len(rows) < room:
                    return

    def _ack_due_in(self) -> float | None:
        """Seconds until unacknowledged events count as stalled (None: nothing in flight)."""
        if not self._connected or not self._inflight:
            return None
        return max(0.0, self._ack_progress_at + self._ack_timeout_s - time.monotonic())

    def _cut_stalled_connection(self) -> None:
        """The broker holds our events without a PUBACK (a node stuck in a leader election, a
        half-dead link that still answers pings): drop the socket, and paho's loop reconnects,
        to the next node of a cluster. Needs `_pub`."""
        log.warning(
            "no PUBACK from MQTT broker %s for %.0f s (%d event(s) waiting): dropping the connection",
            self._nodes.where(),
            self._ack_timeout_s,
            len(self._inflight),
        )
        self._ack_progress_at = time.monotonic()  # once per stall, not on every wake-up
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _due_in(self) -> float | None:
        """Seconds until the publisher has something to do by the clock (None: only when woken)."""
        waits = [w for w in (self._state_due_in(), self._availability_due_in(), self._ack_due_in()) if w is not None]
        if self._reassert and self._connected:
            waits.append(max(0.0, self._availability_at + REASSERT_MIN_S - time.monotonic()))
        if self._backlog.has_undeleted():
            waits.append(1.0)
        return min(waits) if waits else None

    def _availability_due_in(self) -> float | None:
        if not self._connected or self._protocol != MQTTProtocolVersion.MQTTv5:
            return None  # 3.1.1 has no expiry: the Last Will alone says offline
        return max(0.0, self._availability_at + self._availability_every_s - time.monotonic())

    def _refresh_availability(self, reassert: bool = False) -> None:
        with self._pub:
            if self._stopping or not self._connected:
                return
            if reassert and time.monotonic() - self._availability_at < REASSERT_MIN_S:
                return  # _due_in wakes the thread when it may go
            if reassert:
                with self._cond:
                    self._reassert = False
                log.warning("the broker says this box is offline (a late Last Will?): publishing online again")
            if reassert or self._availability_due_in() == 0.0:
                self._publish_availability(self._client)

    def _state_due_in(self) -> float | None:
        """Seconds until a pending state may go out under the rate limit (None: nothing pending)."""
        if not self._connected or self._state_latest is None or self._state_latest == self._state_sent:
            return None  # on_connect wakes the thread when there is a connection again
        return max(0.0, self._state_sent_at + self._m.state_interval_s - time.monotonic())

    def _publish_state(self, force: bool = False) -> None:
        with self._pub:
            with self._cond:
                latest = self._state_latest
            if not self._connected or latest is None or latest == self._state_sent:
                return
            limited = time.monotonic() - self._state_sent_at < self._m.state_interval_s
            if limited and self._state_sent is not None and not force:
                return  # rate-limited; _state_due_in wakes the thread when it may go
            if self._publish(self.topics.state, latest, qos=1, retain=True) is None:
                return
            self._state_sent, self._state_sent_at = latest, time.monotonic()

    def _fall_back_to_311(self) -> None:
        old = self._client
        stop_network_thread(old)
        old.disconnect()
        self._protocol = MQTTProtocolVersion.MQTTv311
        with self._pub:
            self._client = self._make_client()
            self._reset_connection(connected=False)
        self._connect(self._client)
