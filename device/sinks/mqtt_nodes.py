"""Which node of a broker cluster (`mqtt.hosts`) a box dials next, and paho's hook for it.

The box holds one connection, to one node. After a lost connection or an unreachable node the
next attempt goes to the next node in the list; the first one tried is picked from the device
id, so a fleet spreads over the nodes, and a node that returns is used again when its turn comes.
A node that answers but refuses is tried again first (docs/fleet.md).
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt

log = logging.getLogger("serenbox.mqtt")

# Attempts on a node that answers but refuses (or closes before CONNACK) before moving on.
MAX_STAYS = 2
# How the last attempt or connection ended: "lost" (was connected), "unreachable" (no TCP),
# "refused" (no CONNACK, or a refusing one).
Outcome = Literal["lost", "unreachable", "refused"]


class Nodes:
    """The cluster's nodes and where the box is in the list. Used on paho's network thread only."""

    def __init__(self, nodes: list[tuple[str, int]], device_id: str) -> None:
        self.nodes = nodes
        # Where a box starts in the list: spread over the nodes by device id, the same on every start.
        self.index = zlib.crc32(device_id.encode()) % len(nodes)
        self.failovers = 0
        self.outcome: Outcome = "unreachable"
        self.stays = 0  # attempts in a row on the same node after it answered and refused

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def current(self) -> tuple[str, int]:
        return self.nodes[self.index]

    def where(self) -> str:
        host, port = self.current
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def pick(self, first_attempt: bool) -> tuple[str, int]:
        """The node for the next connection attempt.

        A node that is gone (no TCP, or a connection lost) is left for the next one. A node that
        answered but closed before CONNACK is tried again (twice): NATS does that to a client id
        that hops between nodes faster than once a second, and hopping on would never end."""
        # A new client's first attempt stays where the last one ended (the 3.1.1 fallback
        # re-dials the node that refused MQTT 5).
        if not first_attempt and len(self.nodes) > 1:
            if self.outcome in ("lost", "unreachable") or self.stays >= MAX_STAYS:
                self.index = (self.index + 1) % len(self.nodes)
                self.failovers += 1
                self.stays = 0
                log.info("trying MQTT node %s (%d of %d)", self.where(), self.index + 1, len(self.nodes))
            else:
                self.stays += 1
        return self.current


class NodeClient(mqtt.Client):
    """A paho client that asks which node to dial before every connection attempt.

    paho's loop retries the address it was first given; a cluster wants the next node instead."""

    def __init__(
        self, *args: Any, pick: Callable[[bool], tuple[str, int]], wire: threading.Lock, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._pick = pick
        self._wire = wire
        self._first_attempt = True

    def reconnect(self) -> mqtt.MQTTErrorCode:
        # Runs on paho's network thread with the socket closed: the address may change here. Under
        # `_wire` (MqttSink._publish): a publish that slipped in after the loss lands in the queue
        # this empties, never between it and the new CONNECT (a broker closes on that).
        with self._wire:
            self._host, self._port = self._pick(self._first_attempt)
            self._first_attempt = False
            return super().reconnect()
