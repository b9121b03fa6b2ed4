"""Home Assistant MQTT discovery: the one retained device-based discovery message (pure, no network).

Home Assistant builds the device and every entity from `<prefix>/device/<device_id>/config`.
Every entity reads a topic the box already publishes (`state`, `events`, `stats`) through a value
template, so there is no second copy of any figure on the broker. Unique ids are built from the
device id alone: a restart, an upgrade or a reinstall of the same box updates the same entities.

Templates are Jinja2 rendered by Home Assistant with `value_json` bound to the parsed payload.
A template that yields `None` makes a sensor `unknown` (Home Assistant's rule for the payload
"None"); an empty result makes the event entity ignore the message.
"""

from __future__ import annotations

from typing import Any

from serenbox.device import __version__
from serenbox.device.config import Config
from serenbox.device.labels import LABELS
from serenbox.device.sinks.mqtt_topics import Topics

# The project has no public home page yet; set one here and `o.support_url` carries it.
ORIGIN_URL: str | None = None
# Home Assistant publishes its birth message here (retained or not) when it (re)starts.
ONLINE = b"online"

# Nobody there: `dominant` is null and the sensor is `unknown` rather than a made-up label.
EMOTION_TEMPLATE = "{{ value_json.dominant }}"
CONFIDENCE_TEMPLATE = (
    "{{ (value_json.probabilities[value_json.dominant] * 100) | round(1) if value_json.dominant else None }}"
)
PROBABILITIES_TEMPLATE = "{{ (value_json.probabilities or {}) | tojson }}"
OCCUPANCY_TEMPLATE = "{{ 'ON' if value_json.faces > 0 else 'OFF' }}"
FACES_TEMPLATE = "{{ value_json.faces }}"
PAUSED_TEMPLATE = "{{ 'ON' if value_json.paused else 'OFF' }}"
# `end` events say a face left, not what it feels: they render empty and fire nothing.
EVENT_TEMPLATE = (
    "{% if value_json.type in ['new', 'update'] %}"
    "{{ {'event_type': value_json.emotion, 'confidence': value_json.confidence, "
    "'track_id': value_json.track_id, 'type': value_json.type} | tojson }}"
    "{% endif %}"
)
FPS_TEMPLATE = "{{ value_json.fps }}"
CLASSIFY_P50_TEMPLATE = "{{ value_json.latency_ms.classify.p50 }}"
CPU_TEMP_TEMPLATE = "{{ value_json.cpu_temp_c }}"
SPOOL_DEPTH_TEMPLATE = "{{ value_json.spool_depth }}"


def enabled(cfg: Config) -> bool:
    """`homeassistant.discovery`; null means on whenever there is a broker."""
    if not cfg.mqtt.nodes():
        return False
    return cfg.homeassistant.discovery is not False


def config_topic(cfg: Config) -> str:
    return f"{cfg.homeassistant.prefix.rstrip('/')}/device/{cfg.device_id}/config"


def status_topic(cfg: Config) -> str:
    return f"{cfg.homeassistant.prefix.rstrip('/')}/status"


def unique_id(device_id: str, component: str) -> str:
    return f"serenbox_{device_id}_{component}"


def _diagnostic(topic: str, name: str, template: str, **extra: Any) -> dict[str, Any]:
    return {
        "p": "sensor",
        "name": name,
        "state_topic": topic,
        "value_template": template,
        "state_class": "measurement",
        "entity_category": "diagnostic",
        **extra,
    }


def components(cfg: Config) -> dict[str, dict[str, Any]]:
    """The entities, keyed by component id; `unique_id` is added by `payload`."""
    t = Topics.for_device(cfg.mqtt.topic_prefix, cfg.device_id)
    return {
        "emotion": {
            "p": "sensor",
            "name": "Emotion",
            "icon": "mdi:emoticon-outline",
            "device_class": "enum",
            "options": list(LABELS),
            "state_topic": t.state,
            "value_template": EMOTION_TEMPLATE,
            "json_attributes_topic": t.state,
            "json_attributes_template": PROBABILITIES_TEMPLATE,
        },
        "emotion_event": {
            "p": "event",
            "name": "Emotion event",
            "icon": "mdi:emoticon-excited-outline",
            "event_types": list(LABELS),
            "state_topic": t.events,
            "value_template": EVENT_TEMPLATE,
        },
        "occupancy": {
            "p": "binary_sensor",
            "name": "Occupancy",
            "device_class": "occupancy",
            "state_topic": t.state,
            "value_template": OCCUPANCY_TEMPLATE,
            "payload_on": "ON",
            "payload_off": "OFF",
        },
        "faces": {
            "p": "sensor",
            "name": "Faces",
            "icon": "mdi:account-group",
            "state_topic": t.state,
            "value_template": FACES_TEMPLATE,
            "state_class": "measurement",
        },
        "confidence": {
            "p": "sensor",
            "name": "Emotion confidence",
            "icon": "mdi:percent",
            "state_topic": t.state,
            "value_template": CONFIDENCE_TEMPLATE,
            "unit_of_measurement": "%",
            "state_class": "measurement",
        },
        "paused": {
            "p": "switch",
            "name": "Paused",
            "icon": "mdi:pause-circle-outline",
            "command_topic": t.set,
            "payload_on": '{"command": "pause"}',
            "payload_off": '{"command": "resume"}',
            "state_topic": t.state,
            "value_template": PAUSED_TEMPLATE,
            "state_on": "ON",
            "state_off": "OFF",
            # A retained command is refused by the box (docs/mqtt.md).
            "retain": False,
        },
        "fps": _diagnostic(t.stats, "Frame rate", FPS_TEMPLATE, unit_of_measurement="fps", icon="mdi:speedometer"),
        "classify_latency": _diagnostic(
            t.stats,
            "Classify latency (median)",
            CLASSIFY_P50_TEMPLATE,
            unit_of_measurement="ms",
            device_class="duration",
        ),
        "cpu_temperature": _diagnostic(
            t.stats, "CPU temperature", CPU_TEMP_TEMPLATE, unit_of_measurement="°C", device_class="temperature"
        ),
        "spool_depth": _diagnostic(
            t.stats, "Spooled events", SPOOL_DEPTH_TEMPLATE, unit_of_measurement="events", icon="mdi:tray-full"
        ),
    }


def payload(cfg: Config) -> dict[str, Any]:
    """The device-based discovery message for this box."""
    t = Topics.for_device(cfg.mqtt.topic_prefix, cfg.device_id)
    cmps = {cid: {**spec, "unique_id": unique_id(cfg.device_id, cid)} for cid, spec in components(cfg).items()}
    return {
        "dev": {
            "identifiers": [f"serenbox_{cfg.device_id}"],
            "name": f"SerenBox {cfg.device_id}",
            "manufacturer": "SerenBox",
            "model": "SerenBox",
            "sw_version": __version__,
        },
        "o": {"name": "serenbox", "sw_version": __version__, **({"support_url": ORIGIN_URL} if ORIGIN_URL else {})},
        # Shared by every component: the box's own Last Will says when it is gone.
        "availability": [{"topic": t.availability, "payload_available": "online", "payload_not_available": "offline"}],
        "qos": 1,
        "cmps": cmps,
    }
