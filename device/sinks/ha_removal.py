"""`serenbox ha-remove`: the empty retained config that makes Home Assistant delete this device."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from serenbox.device.config import Config, ConfigError
from serenbox.device.sinks import ha_discovery
from serenbox.device.sinks.paho_client import PAHO_LOG, check_tls_files, credentials, stop_network_thread

REMOVE_TIMEOUT_S = 10.0


def remove_discovery(cfg: Config, timeout: float = REMOVE_TIMEOUT_S) -> tuple[str, str]:
    """Publish the empty retained config that makes Home Assistant delete this device.

    Tries each of `mqtt.hosts` in turn (a cluster shares retained messages); returns the topic and
    the node that took it. Raises ConnectionError with one line when no node can be reached or all refuse."""
    nodes = cfg.mqtt.nodes()
    if not nodes:
        raise ConfigError("mqtt.host: not set, so there is no broker to remove the device from")
    check_tls_files(cfg)
    topic = ha_discovery.config_topic(cfg)
    errors: list[str] = []
    for host, port in nodes:
        try:
            _publish_removal(cfg, topic, host, port, timeout)
            return topic, f"{host}:{port}"
        except ConnectionError as e:
            errors.append(str(e))
    others = f" (and {len(errors) - 1} other node(s) failed)" if len(errors) > 1 else ""
    raise ConnectionError(errors[-1] + others)


def _publish_removal(cfg: Config, topic: str, host: str, port: int, timeout: float) -> None:
    where = f"{host}:{port}"
    # Its own client id: the daemon's session, if it still runs, is left alone. 3.1.1 speaks to every broker.
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"serenbox-{cfg.device_id}-ha-remove", protocol=mqtt.MQTTv311
    )
    client.enable_logger(PAHO_LOG)
    client.connect_timeout = timeout
    credentials(client, cfg)
    answered = threading.Event()
    refused: list[str] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason).lower())
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=max(5, round(timeout)))
    except (OSError, ValueError) as e:
        raise ConnectionError(f"cannot reach the MQTT broker {where} ({getattr(e, 'strerror', None) or e})") from None
    client.loop_start()
    try:
        if not answered.wait(timeout):
            raise ConnectionError(f"the MQTT broker {where} did not answer within {timeout:.0f} s")
        if refused:
            raise ConnectionError(f"the MQTT broker {where} refused the connection: {refused[0]}")
        info = client.publish(topic, b"", qos=1, retain=True)
        info.wait_for_publish(timeout=timeout)
        if not info.is_published():
            raise ConnectionError(f"the MQTT broker {where} did not acknowledge the removal within {timeout:.0f} s")
    finally:
        client.disconnect()
        stop_network_thread(client)
