"""Credentials and TLS on a paho client: one way for the daemon (`mqtt.tls`) and the app client.

Kept apart from both so that either can use it without importing the other's dependencies
(the daemon's configuration needs yaml; the client must stay light)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt


@dataclass(frozen=True)
class Tls:
    """TLS like the daemon's `mqtt.tls`: verification of chain and host name is on unless `insecure`."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


def secure(client: mqtt.Client, username: str | None, password: str | None, tls: Tls | None) -> None:
    """Log in with `username` when one is given; speak TLS when `tls` is given."""
    if username:
        client.username_pw_set(username, password)
    if tls is None:
        return
    client.tls_set(
        ca_certs=tls.ca_file,
        certfile=tls.cert_file,
        keyfile=tls.key_file,
        cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
    )
    if tls.insecure:
        client.tls_insecure_set(True)
