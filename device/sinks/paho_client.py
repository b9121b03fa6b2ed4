"""What every paho client of the daemon shares: its log, credentials and TLS, and a safe stop."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from serenbox.device.config import Config, ConfigError

from serenbox.mqtt_tls import Tls, secure

log = logging.getLogger("serenbox.mqtt")


class _RetryNoise(logging.Filter):
    """paho logs an ERROR on every reconnect attempt while the broker is away; the sink already
    says once that it is spooling and retrying, so those lines only alarm whoever reads the journal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


PAHO_LOG = logging.getLogger("serenbox.mqtt.paho")
PAHO_LOG.addFilter(_RetryNoise())


def stop_network_thread(client: mqtt.Client) -> None:
    """`loop_stop()`, without paho 2.2's race: it reads its thread three times, and the thread sets it
    to None as it ends; a loop that ends on its own meanwhile (after `disconnect()`) made it raise
    AttributeError, and close() with it (seen at 1 000 boxes on 2 cores, docs/fleet.md)."""
    thread = getattr(client, "_thread", None)
    with contextlib.suppress(AttributeError):
        client.loop_stop()
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def check_tls_files(cfg: Config) -> None:
    """A named TLS file that is missing is a configuration error, said before any connection."""
    tls = cfg.mqtt.tls
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key)
        if tls.enabled and value and not Path(value).is_file():
            raise ConfigError(f"mqtt.tls.{key}: {value} does not exist")


def credentials(client: mqtt.Client, cfg: Config) -> None:
    """Username, password and TLS from `mqtt.*`."""
    m, t = cfg.mqtt, cfg.mqtt.tls
    tls = Tls(t.ca_file, t.cert_file, t.key_file, t.insecure) if t.enabled else None
    if tls is not None and tls.insecure:
        log.warning("mqtt.tls.insecure is set: the broker's certificate is NOT verified (testing only)")
    secure(client, m.username, m.password, tls)
