"""systemd/install.sh into a temporary root (--root), offline from a wheelhouse (--wheelhouse).

Nothing is downloaded: the wheelhouse is built here, the project's wheel with pip from a copy of
the source and every dependency repacked from the wheel this test environment installed it from
(the same files, so the staged venv really runs `serenbox`). The user is created with the real
useradd/usermod (--prefix) in the staged /etc when the test runs as root.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from paho.mqtt.enums import CallbackAPIVersion

from tests.mosquitto import Mosquitto, free_port, mosquitto_binary, retained

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "systemd" / "install.sh"
UNIT = ROOT / "systemd" / "serenbox.service"
IS_ROOT = os.geteuid() == 0
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


# --- an offline wheelhouse --------------------------------------------------------------------


def device_requirements() -> list[str]:
    """serenbox[device] and everything it pulls in, as installed in this environment."""
    seen: set[str] = set()
    todo = [(r, "device") for r in metadata.requires("serenbox") or []]
    while todo:
        text, extra = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in seen or name == "serenbox":
            continue
        seen.add(name)
        todo.extend((r, "") for r in metadata.requires(req.name) or [])
    return sorted(seen)


def repack_wheel(dist_name: str, out: Path) -> Path:
    """The wheel an installed distribution came from, rebuilt from its RECORD (scripts aside:
    pip regenerates console scripts from entry_points.txt)."""
    dist = metadata.distribution(dist_name)
    site = Path(str(dist.locate_file("")))
    info = next(p for p in dist.files or [] if p.parts[0].endswith(".dist-info")).parts[0]
    wheel_meta = (site / info / "WHEEL").read_text()
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    py, abi, plat = ({t.split("-")[i] for t in tags} for i in range(3))
    tag = "-".join(".".join(sorted(part)) for part in (py, abi, plat))
    name = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    skip_info = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    rows = []
    with zipfile.ZipFile(out / name, "w", zipfile.ZIP_STORED) as whl:
        for rel in dist.files or []:
            if rel.parts[0] == ".." or "__pycache__" in rel.parts or rel.suffix == ".pyc":
                continue
            if rel.parts[0] == info and rel.name in skip_info:
                continue
            data = (site / rel).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            whl.writestr(rel.as_posix(), data)
            rows.append((rel.as_posix(), f"sha256={digest}", str(len(data))))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*rows, (f"{info}/RECORD", "", "")])
        whl.writestr(f"{info}/RECORD", buf.getvalue())
    return out / name


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    # Built from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for part in ("serenbox", "device", "converter", "training"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, src / part)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src],
        check=True,
        capture_output=True,
    )
    for name in device_requirements():
        repack_wheel(name, out)
    return out


# --- a staged root ------------------------------------------------------------------------------


def make_root(path: Path) -> Path:
    """The /etc files useradd --prefix edits, with the camera groups a Debian system has."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\nvideo:x:44:\nrender:x:105:\n")
    for name in ("shadow", "gshadow"):
        (etc / name).write_text("")
        (etc / name).chmod(0o640)
    return path


def run_install(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", INSTALL, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"install.sh {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[tuple[Path, str]]:
    root = make_root(tmp_path_factory.mktemp("root"))
    first = run_install("--root", root, "--wheelhouse", wheelhouse, "--python", BASE_PYTHON)
    yield root, first.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def entry(root: Path, table: str, name: str) -> list[str] | None:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def test_installs_a_working_venv_without_tensorflow(staged: tuple[Path, str]) -> None:
    root, _ = staged
    venv = root / "opt/serenbox/venv"
    version = subprocess.run([venv / "bin/serenbox", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"serenbox {metadata.version('serenbox')}"
    probe = (
        "import importlib.util as u; print(u.find_spec('tensorflow') is None, u.find_spec('ai_edge_litert') is None)"
    )
    found = subprocess.run([venv / "bin/python", "-c", probe], capture_output=True, text=True, timeout=60)
    assert found.stdout.split() == ["True", "False"]  # no TensorFlow, the LiteRT interpreter present
    # The wheel carries the face detector models with their licence (run outside the checkout, so
    # that the installed package is the one imported).
    probe = (
        "from serenbox.device.config import DetectorConfig; from serenbox.device.faces import build_detector; "
        "d = build_detector(DetectorConfig()); folder = d.path.parent; "
        "print(type(d).__name__, (folder / 'LICENSE').is_file(), (folder / 'PROVENANCE.md').is_file(), "
        "'site-packages' in str(folder))"
    )
    faces = subprocess.run([venv / "bin/python", "-c", probe], capture_output=True, text=True, timeout=60, cwd=root)
    assert faces.stdout.split() == ["BlazeFaceDetector", "True", "True", "True"], faces.stderr


def test_files_modes_and_unit(staged: tuple[Path, str]) -> None:
    root, out = staged
    etc = root / "etc/serenbox"
    assert (etc / "serenbox.yaml").read_text() == (ROOT / "configs/serenbox.yaml").read_text()
    assert mode(etc) == 0o750
    assert mode(etc / "serenbox.yaml") == 0o640
    assert mode(etc / "serenbox.yaml.default") == 0o640
    env = etc / "serenbox.env"
    assert mode(env) == 0o600
    assert "SERENBOX_MQTT_PASSWORD" in env.read_text()
    unit = root / "etc/systemd/system/serenbox.service"
    assert unit.read_text() == UNIT.read_text()
    assert mode(unit) == 0o644
    assert mode(root / "var/lib/serenbox") == 0o700
    assert (root / "opt/serenbox/doc/install.md").is_file()
    if shutil.which("systemctl"):
        wants = root / "etc/systemd/system/multi-user.target.wants/serenbox.service"
        assert os.readlink(wants) == "/etc/systemd/system/serenbox.service"  # [Install] honoured
    assert "journalctl -u serenbox" in out
    assert list(etc.glob("*.??????")) == []  # no temp files left behind


@pytest.mark.skipif(not IS_ROOT, reason="creating users needs root")
def test_creates_the_service_user_in_the_camera_groups(staged: tuple[Path, str]) -> None:
    root, _ = staged
    user = entry(root, "passwd", "serenbox")
    assert user is not None
    uid, gid = int(user[2]), int(user[3])
    assert 0 < uid < 1000  # a system user
    assert user[5:] == ["/var/lib/serenbox", "/usr/sbin/nologin"]
    for group in ("video", "render"):
        members = (entry(root, "group", group) or ["", "", "", ""])[3].split(",")
        assert "serenbox" in members, group
    # Root owns the configuration; the service's group may only read it.
    config = (root / "etc/serenbox/serenbox.yaml").stat()
    assert (config.st_uid, config.st_gid) == (0, gid)
    assert (root / "etc/serenbox/serenbox.env").stat().st_gid == 0
    assert (root / "var/lib/serenbox").stat().st_uid == uid


def test_second_run_keeps_config_and_secrets(staged: tuple[Path, str], wheelhouse: Path) -> None:
    root, _ = staged
    config, env = root / "etc/serenbox/serenbox.yaml", root / "etc/serenbox/serenbox.env"
    config.write_text("device_id: living-room\n")
    env.write_text("SERENBOX_MQTT_PASSWORD=s3cret\n")
    env.chmod(0o644)  # loosened by hand: the installer must close it again
    second = run_install("--root", root, "--wheelhouse", wheelhouse, "--python", BASE_PYTHON)
    assert f"kept the existing {config}" in second.stdout
    assert config.read_text() == "device_id: living-room\n"
    assert env.read_text() == "SERENBOX_MQTT_PASSWORD=s3cret\n"
    assert mode(env) == 0o600
    assert mode(config) == 0o640
    if IS_ROOT:
        users = [line.split(":")[0] for line in (root / "etc/passwd").read_text().splitlines()]
        assert users.count("serenbox") == 1
        assert (entry(root, "group", "video") or [""] * 4)[3].split(",").count("serenbox") == 1


def test_uninstall_keeps_data_and_purge_removes_it(staged: tuple[Path, str]) -> None:
    root, _ = staged
    dropin = root / "etc/systemd/system/serenbox.service.d/local.conf"  # what `systemctl edit` writes
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\nMemoryMax=768M\n")
    out = run_install("--root", root, "--uninstall").stdout
    assert not (root / "etc/systemd/system/serenbox.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/serenbox.service").is_symlink()
    assert not (root / "opt/serenbox").exists()
    assert (root / "etc/serenbox/serenbox.yaml").read_text() == "device_id: living-room\n"
    assert (root / "var/lib/serenbox").is_dir()
    assert dropin.is_file()  # local configuration, like serenbox.yaml
    assert "kept" in out
    run_install("--root", root, "--uninstall")  # idempotent
    run_install("--root", root, "--uninstall", "--purge")
    assert not (root / "etc/serenbox").exists()
    assert not (root / "var/lib/serenbox").exists()
    assert not dropin.parent.exists()
    if IS_ROOT:
        assert entry(root, "passwd", "serenbox") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown option: --frobnicate"),
        (["--root", "/nonexistent/serenbox-root"], "--root /nonexistent/serenbox-root: no such directory"),
        (["--purge"], "--purge only goes with --uninstall"),
        (["--root"], "--root needs a directory"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run_install(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"install.sh: {message}"
    assert "Traceback" not in proc.stderr


def test_wheelhouse_without_serenbox_changes_nothing(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    empty = tmp_path / "wheels"
    empty.mkdir()
    proc = run_install("--root", root, "--wheelhouse", empty, check=False)
    assert proc.returncode == 2
    assert "no serenbox-*.whl in it" in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["etc"]
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["group", "gshadow", "passwd", "shadow"]


def test_wheel_installs_one_package_named_serenbox(wheelhouse: Path) -> None:
    # Generic names (device, converter, training) in site-packages would collide with other projects.
    (wheel,) = wheelhouse.glob("serenbox-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "serenbox",
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    # Every package of the checkout is in it, mapped under serenbox/ (a new subpackage left out of
    # pyproject.toml would install as a broken import).
    for init in ROOT.glob("*/**/__init__.py"):
        part = init.relative_to(ROOT)
        if part.parts[0] in {"device", "converter", "training"}:
            assert f"serenbox/{part.as_posix()}" in names, part
    assert "serenbox/__init__.py" in names
    assert "serenbox/device/models/emotion_int8.tflite" in names


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_installer_is_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", INSTALL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow  # two installs
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_purge_removes_the_box_from_home_assistant(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, tmp_path: Path
) -> None:
    """--purge clears the retained discovery config (with the password from serenbox.env); a broker
    that is gone does not fail the uninstall."""
    topic = "homeassistant/device/gone-box/config"
    with Mosquitto(tmp_path / "broker", users={"serenbox": "env-pw"}) as broker:
        auth = {"username": "serenbox", "password": "env-pw"}
        for case in ("reachable", "unreachable"):
            root = make_root(tmp_path_factory.mktemp(f"root-{case}"))
            run_install("--root", root, "--wheelhouse", wheelhouse, "--python", BASE_PYTHON, "--no-start")
            port = broker.port if case == "reachable" else free_port()
            (root / "etc/serenbox/serenbox.yaml").write_text(
                f"device_id: gone-box\nmqtt: {{host: {broker.host}, port: {port}, username: serenbox}}\n"
            )
            (root / "etc/serenbox/serenbox.env").write_text('SERENBOX_MQTT_PASSWORD="env-pw"\n')
            c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            c.username_pw_set(**auth)
            c.connect(broker.host, broker.port)
            c.loop_start()
            c.publish(topic, b'{"dev": {}}', qos=1, retain=True).wait_for_publish(10)
            c.disconnect()
            c.loop_stop()
            proc = run_install("--root", root, "--uninstall", "--purge")
            assert not (root / "etc/serenbox").exists() and not (root / "opt/serenbox").exists()
            if case == "reachable":
                assert f"cleared {topic}" in proc.stderr
                assert retained(broker, topic, **auth) is None
            else:
                assert "cannot reach the MQTT broker" in proc.stderr
                assert "could not remove this box from Home Assistant" in proc.stdout
                assert retained(broker, topic, **auth) == b'{"dev": {}}'
