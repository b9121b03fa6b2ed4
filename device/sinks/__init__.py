"""Sinks: where events go. `build_sinks` picks them from the configuration."""

from __future__ import annotations

from serenbox.device.config import Config
from serenbox.device.sinks.base import Sink
from serenbox.device.sinks.stdout import StdoutSink


def build_sinks(cfg: Config, print_events: bool = False) -> list[Sink]:
    """MQTT when `mqtt.host` or `mqtt.hosts` is set (plus stdout with --print-events); stdout alone otherwise.

    The MQTT sink is imported only when configured, so a box without a broker never loads paho.
    """
    sinks: list[Sink] = []
    if cfg.mqtt.nodes():
        from serenbox.device.sinks.mqtt import MqttSink

        sinks.append(MqttSink(cfg))
        if print_events:
            sinks.append(StdoutSink())
    else:
        sinks.append(StdoutSink())
    return sinks
