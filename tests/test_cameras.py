"""Frame sources on real files written by the tests; fakes only at the hardware boundary
(cv2.VideoCapture of a camera device, the picamera2 module)."""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest
from serenbox.device.cameras import CameraError, Frame, FrameSource, ReopeningSource, open_source
from serenbox.device.cameras.base import redact
from serenbox.device.cameras.demo import CYCLE_S, VISIBLE_S, DemoScene, DemoSource
from serenbox.device.cameras.folder import FolderSource
from serenbox.device.cameras.opencv import OpenCVCamera, VideoFileSource
from serenbox.device.config import CameraConfig, DetectorConfig
from serenbox.device.faces import build_detector

from tests import media


def cam_cfg(**kw: Any) -> CameraConfig:
    return CameraConfig(**kw)


def read_all(source: FrameSource, limit: int = 1000) -> list[Frame]:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
        assert len(frames) <= limit, "source never ended"
    return frames


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# --- video files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 numbered frames at 20 fps: 2 s of media time."""
    return media.numbered_video(tmp_path_factory.mktemp("video") / "clip40.avi", 40, 20)


def test_video_file_is_sampled_by_media_time_and_ends(clip40: Path) -> None:
    source = open_source(str(clip40), cam_cfg(fps=5))
    assert isinstance(source, VideoFileSource)
    with source:
        frames = read_all(source)
        assert source.read() is None  # stays ended
    assert [media.frame_number(f.image) for f in frames] == list(range(0, 40, 4))
    assert [f.t for f in frames] == pytest.approx([k * 0.2 for k in range(10)])
    assert [f.index for f in frames] == list(range(10))
    assert frames[0].image.shape == (120, 160, 3) and frames[0].image.dtype == np.uint8


def test_video_sample_k_is_the_first_frame_at_or_after_k_over_fps(clip40: Path) -> None:
    with open_source(str(clip40), cam_cfg(fps=7)) as source:
        got = [media.frame_number(f.image) for f in read_all(source)]
    expected = []
    for k in range(100):
        n = math.ceil(k / 7 * 20 - 1e-9)
        if n >= 40:
            break
        expected.append(n)
    assert got == expected
    assert got[:4] == [0, 3, 6, 9]


def test_video_faster_than_the_file_gives_each_frame_once(clip40: Path) -> None:
    with open_source(str(clip40), cam_cfg(fps=50)) as source:
        frames = read_all(source)
    assert [media.frame_number(f.image) for f in frames] == list(range(40))


def test_video_sampling_is_deterministic(clip40: Path) -> None:
    runs = []
    for _ in range(2):
        with open_source(str(clip40), cam_cfg(fps=3)) as source:
            runs.append([(f.t, f.index, media.frame_number(f.image)) for f in read_all(source)])
    assert runs[0] == runs[1]


def test_video_loop_replays_with_time_counting_up(tmp_path: Path) -> None:
    clip = media.numbered_video(tmp_path / "ten.avi", 10, 10)
    with open_source(str(clip), cam_cfg(fps=10, loop=True)) as source:
        frames = [source.read() for _ in range(25)]
    assert all(f is not None for f in frames)
    assert [media.frame_number(f.image) for f in frames] == [*range(10), *range(10), *range(5)]
    assert [f.t for f in frames] == pytest.approx([k * 0.1 for k in range(25)])
    assert [f.index for f in frames] == list(range(25))


def test_set_fps_changes_the_sampling_rate(clip40: Path) -> None:
    with open_source(str(clip40), cam_cfg(fps=20)) as source:
        first = [source.read() for _ in range(4)]  # t = 0, .05, .1, .15
        source.set_fps(2)
        rest = read_all(source)
    assert [media.frame_number(f.image) for f in first] == [0, 1, 2, 3]
    assert [media.frame_number(f.image) for f in rest] == [4, 14, 24, 34]


def test_a_file_that_is_not_a_video_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "notes.avi"
    fake.write_text("this is not a video\n")
    with pytest.raises(CameraError, match=r"notes\.avi"):
        open_source(str(fake), cam_cfg())


# --- image folders ----------------------------------------------------------------------------


def test_folder_plays_images_in_natural_order_and_skips_unreadable(tmp_path: Path, caplog: Any) -> None:
    media.write_image(tmp_path / "frame10.png", media.numbered_frame(10))
    media.write_image(tmp_path / "frame2.jpg", media.numbered_frame(2))
    media.write_image(tmp_path / "frame1.png", media.numbered_frame(1))
    (tmp_path / "frame3.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "readme.txt").write_text("not an image")
    source = open_source(str(tmp_path), cam_cfg(fps=4))
    assert isinstance(source, FolderSource)
    with caplog.at_level(logging.WARNING), source:
        frames = read_all(source)
        assert source.read() is None
    assert [media.frame_number(f.image) for f in frames] == [1, 2, 10]
    assert [f.t for f in frames] == pytest.approx([0.0, 0.25, 0.5])
    assert [f.index for f in frames] == [0, 1, 2]
    assert "frame3.png" in caplog.text


def test_folder_loop(tmp_path: Path) -> None:
    for i in range(2):
        media.write_image(tmp_path / f"{i}.png", media.numbered_frame(i))
    with open_source(str(tmp_path), cam_cfg(fps=10, loop=True)) as source:
        frames = [source.read() for _ in range(5)]
    assert [media.frame_number(f.image) for f in frames] == [0, 1, 0, 1, 0]
    assert [f.t for f in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(CameraError, match="no images"):
        open_source(str(tmp_path), cam_cfg())


def test_looping_folder_where_nothing_decodes_fails_instead_of_spinning(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    with open_source(str(tmp_path), cam_cfg(loop=True)) as source, pytest.raises(CameraError, match="none"):
        source.read()


# --- choosing a source ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["no/such/clip.mp4", "kitchen-camera", "ftp://cam/stream"])
def test_unknown_source_is_one_line_naming_it(spec: str) -> None:
    with pytest.raises(CameraError) as err:
        open_source(spec, cam_cfg())
    assert spec in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_source_is_refused() -> None:
    with pytest.raises(CameraError, match="empty"):
        open_source("  ", cam_cfg())


def test_dispatch_by_spec(tmp_path: Path, clip40: Path) -> None:
    media.write_image(tmp_path / "a.png", media.numbered_frame(0))
    assert isinstance(open_source("0", cam_cfg()), OpenCVCamera)
    assert isinstance(open_source(str(tmp_path), cam_cfg()), FolderSource)
    assert isinstance(open_source(str(clip40), cam_cfg()), VideoFileSource)
    assert isinstance(open_source("demo", cam_cfg()), DemoSource)
    stream = open_source("rtsp://admin:hunter2@10.0.0.5:554/live", cam_cfg())
    assert isinstance(stream, OpenCVCamera) and stream.is_stream
    assert "hunter2" not in stream.name and "hunter2" not in repr(stream)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:pw@10.0.0.2:554/s", "rtsp://admin:***@10.0.0.2:554/s"),
        ("http://10.0.0.2/mjpg", "http://10.0.0.2/mjpg"),
        ("rtsp://admin:CAM/SECRET@10.0.0.2/s", "rtsp://admin:***@10.0.0.2/s"),  # '/' in the password
        ("rtsp://admin:p@SECRET@10.0.0.2/s", "rtsp://admin:***@10.0.0.2/s"),  # '@' in the password
        ("rtsp://SECRETTOKEN@10.0.0.2/s", "rtsp://***@10.0.0.2/s"),  # a bare token
        ("/dev/video0", "/dev/video0"),
    ],
)
def test_redact_hides_every_secret_part(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "SECRET" not in redact(url)


# --- a camera device: cv2.VideoCapture faked at the hardware boundary -------------------------


class FakeCameraHardware:
    """What the fake device does: per-open plans, and frames either free-running or pushed."""

    def __init__(self, plans: list[dict[str, Any]]) -> None:
        self.plans = plans  # one per open: {"opens": bool, "frames": int | None, "interval": s}
        self.captures: list[FakeVideoCapture] = []
        self.pushed: queue.Queue[int | None] = queue.Queue()

    def __call__(self, device: Any, api: int | None = None, *params: Any) -> FakeVideoCapture:
        plan = self.plans[min(len(self.captures), len(self.plans) - 1)]
        cap = FakeVideoCapture(self, len(self.captures), device, api, plan)
        self.captures.append(cap)
        return cap


class FakeVideoCapture:
    def __init__(self, hw: FakeCameraHardware, number: int, device: Any, api: Any, plan: dict[str, Any]) -> None:
        self.hw, self.number, self.device, self.api, self.plan = hw, number, device, api, plan
        self.props: dict[int, float] = {}
        self.grabbed = 0
        self.retrieved = 0
        self.released = False
        self.counter = -1

    def isOpened(self) -> bool:
        return bool(self.plan.get("opens", True)) and not self.released

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def get(self, prop: int) -> float:
        return self.props.get(prop, 0.0)

    def grab(self) -> bool:
        limit = self.plan.get("frames")
        if limit is not None and self.grabbed >= limit:
            time.sleep(0.01)
            return False
        if self.plan.get("pushed"):
            pushed = self.hw.pushed.get(timeout=10)
            if pushed is None:
                return False  # the test unplugs the camera
            self.counter = pushed
        else:
            time.sleep(self.plan.get("interval", 0.005))
            self.counter += 1
        self.grabbed += 1
        return True

    def retrieve(self) -> tuple[bool, np.ndarray]:
        self.retrieved += 1
        image = np.zeros(
            (int(self.get(cv2.CAP_PROP_FRAME_HEIGHT)) or 48, int(self.get(cv2.CAP_PROP_FRAME_WIDTH)) or 64, 3), np.uint8
        )
        image[0, 0] = (self.counter % 256, self.counter // 256, self.number)
        return True, image

    def release(self) -> None:
        self.released = True


def counter_of(frame: Frame) -> int:
    return int(frame.image[0, 0, 0]) + 256 * int(frame.image[0, 0, 1])


def capture_number(frame: Frame) -> int:
    return int(frame.image[0, 0, 2])


@pytest.fixture
def hardware(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(*plans: dict[str, Any]) -> FakeCameraHardware:
        hw = FakeCameraHardware(list(plans))
        monkeypatch.setattr(cv2, "VideoCapture", hw)
        return hw

    return install


def test_usb_camera_is_opened_at_the_configured_size(hardware: Any) -> None:
    hw = hardware({"interval": 0.005})
    with open_source("1", cam_cfg(width=320, height=240, fps=50)) as source:
        frame = source.read()
    cap = hw.captures[0]
    assert cap.device == 1 and cap.api == cv2.CAP_V4L2
    assert cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 320 and cap.props[cv2.CAP_PROP_FRAME_HEIGHT] == 240
    assert frame is not None and frame.image.shape == (240, 320, 3)
    wait_for(lambda: cap.released)  # the grabber thread releases the device on close


def test_live_source_hands_out_the_newest_frame_never_a_queue(hardware: Any) -> None:
    hw = hardware({"pushed": True})
    with open_source("0", cam_cfg(fps=120)) as source:
        hw.pushed.put(1)
        first = source.read()
        assert counter_of(first) == 1
        # The camera delivers four more frames while the consumer is busy elsewhere.
        for n in range(2, 6):
            time.sleep(0.02)  # slower than 120 fps: each of them is kept by the rate limit
            hw.pushed.put(n)
        wait_for(lambda: hw.captures[0].retrieved == 5)
        time.sleep(0.2)
        newest = source.read()
        assert counter_of(newest) == 5  # not 2: stale frames were dropped
        assert newest.index == first.index + 4  # the gap says three frames were missed
        assert newest.t > first.t
        time.sleep(0.02)
        hw.pushed.put(6)
        assert counter_of(source.read()) == 6
        hw.pushed.put(None)


def test_live_source_delivers_at_most_the_configured_rate(hardware: Any) -> None:
    hw = hardware({"interval": 0.002})  # a camera far faster than the 20 fps asked for
    with open_source("0", cam_cfg(fps=20)) as source:
        frames = [source.read() for _ in range(6)]
    times = [f.t for f in frames]
    period = 1 / 20
    # Frames keep to a grid of the period; one may come up to a fifth of a period early.
    assert times[-1] - times[0] >= 5 * period - 0.25 * period
    cap = hw.captures[0]
    assert cap.retrieved < cap.grabbed  # frames above the rate are dropped before decoding


def test_camera_that_cannot_open_is_a_camera_error(hardware: Any) -> None:
    hardware({"opens": False})
    source = open_source("3", cam_cfg())
    with pytest.raises(CameraError, match=r"camera 3.*cannot open"):
        source.open()


def test_camera_that_fails_mid_run_raises_camera_error(hardware: Any) -> None:
    hardware({"frames": 3, "interval": 0.001})
    with open_source("0", cam_cfg(fps=120)) as source, pytest.raises(CameraError, match=r"camera 0.*read failed"):
        for _ in range(10):
            source.read()


def test_camera_that_stalls_raises_camera_error(hardware: Any) -> None:
    hw = hardware({"pushed": True})  # opens, then never delivers a frame
    source = open_source("0", cam_cfg(fps=100))
    source.read_timeout_s = 0.2
    with source:
        with pytest.raises(CameraError, match="no frame for"):
            source.read()
        hw.pushed.put(None)  # unplugged: lets the grabber thread finish


# --- reopening with backoff -------------------------------------------------------------------


def test_reopening_source_recovers_with_exponential_backoff(hardware: Any, caplog: Any) -> None:
    hardware(
        {"frames": 3, "interval": 0.002},  # works, then the camera is unplugged
        {"opens": False},
        {"opens": False},
        {"interval": 0.002},  # plugged back in
    )
    cfg = cam_cfg(fps=100, reopen_initial_s=0.01, reopen_max_s=0.03)
    source = ReopeningSource(open_source("0", cfg), cfg)
    frames = []
    with caplog.at_level(logging.INFO, logger="serenbox.device.cameras.reopening"), source:
        while not frames or capture_number(frames[-1]) != 3 or len(frames) < 6:
            frame = source.read()
            assert frame is not None
            frames.append(frame)
            assert len(frames) < 500
    assert source.camera_errors == 3  # the failed read and the two failed opens
    assert source.reopens == 1
    delays = [
        r.getMessage().split("reopening in ")[1].split(" s")[0]
        for r in caplog.records
        if "reopening in" in r.getMessage()
    ]
    assert delays == ["0.01", "0.02", "0.03"]  # doubling, capped at reopen_max_s
    assert "reopened" in caplog.text
    assert {capture_number(f) for f in frames} == {0, 3}
    indices = [f.index for f in frames]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)  # numbering continues


def test_a_camera_missing_at_start_is_waited_for_like_a_failure_later(hardware: Any) -> None:
    # An IP camera still booting, a USB camera plugged in after the box started.
    hardware({"opens": False}, {"opens": False}, {"frames": 1, "interval": 0.002})
    cfg = cam_cfg(fps=100, reopen_initial_s=0.01, reopen_max_s=0.02)
    source = ReopeningSource(open_source("0", cfg), cfg)
    beats: list[float] = []
    source.heartbeat = lambda: beats.append(time.monotonic())
    source.open()  # does not raise
    assert source.camera_errors == 1 and not source.is_open
    frame = source.read()
    assert frame is not None and source.camera_errors == 2 and source.is_open
    assert beats  # the loop was kept alive (watchdog, status) while it waited
    source.close()


def test_a_missing_video_device_path_is_a_live_camera_not_an_error() -> None:
    source = open_source("/dev/video99", cam_cfg())
    assert source.live


def test_close_interrupts_a_backoff_wait(hardware: Any) -> None:
    hardware({"frames": 1, "interval": 0.002}, {"opens": False})
    cfg = cam_cfg(fps=100, reopen_initial_s=300, reopen_max_s=600)
    source = ReopeningSource(open_source("0", cfg), cfg)
    source.open()
    assert source.read() is not None
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(source.read()))
    reader.start()
    wait_for(lambda: source.camera_errors == 1)
    source.close()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert result == [None]  # the run ends cleanly


def test_stop_event_interrupts_a_backoff_wait(hardware: Any) -> None:
    hardware({"frames": 1, "interval": 0.002}, {"opens": False})
    cfg = cam_cfg(fps=100, reopen_initial_s=300, reopen_max_s=600)
    stop = threading.Event()
    source = ReopeningSource(open_source("0", cfg), cfg, stop_event=stop)
    source.open()
    source.read()
    threading.Timer(0.2, stop.set).start()
    assert source.read() is None
    assert source.camera_errors == 1
    source.close()


def test_reopening_passes_file_errors_and_end_through(tmp_path: Path) -> None:
    clip = media.numbered_video(tmp_path / "three.avi", 3, 10)
    cfg = cam_cfg(fps=10)
    with ReopeningSource(open_source(str(clip), cfg), cfg) as source:
        assert [media.frame_number(f.image) for f in read_all(source)] == [0, 1, 2]
        assert source.camera_errors == 0
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"junk")
    loop_cfg = cam_cfg(loop=True)
    with ReopeningSource(open_source(str(tmp_path / "pics"), loop_cfg), loop_cfg) as source:
        with pytest.raises(CameraError):
            source.read()
        assert source.camera_errors == 0


# --- picamera2, faked as a module (the Pi camera stack is hardware) --------------------------


class FakePicamera2:
    instances: ClassVar[list[FakePicamera2]] = []
    attached: ClassVar[bool] = True

    def __init__(self, camera_num: int = 0) -> None:
        if not FakePicamera2.attached:
            raise IndexError("list index out of range")  # what picamera2 does with no camera
        self.camera_num = camera_num
        self.calls: list[tuple[str, Any]] = []
        self.config: dict[str, Any] | None = None
        self.counter = 0
        FakePicamera2.instances.append(self)

    def create_video_configuration(self, main: dict[str, Any], controls: dict[str, Any], buffer_count: int) -> dict:
        return {"main": main, "controls": controls, "buffer_count": buffer_count}

    def configure(self, config: dict[str, Any]) -> None:
        self.config = config

    def start(self) -> None:
        self.calls.append(("start", None))

    def capture_array(self, name: str = "main") -> np.ndarray:
        assert self.config is not None and ("start", None) in self.calls
        time.sleep(0.005)
        w, h = self.config["main"]["size"]
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # B, G, R in memory
        self.counter += 1
        return image

    def set_controls(self, controls: dict[str, Any]) -> None:
        self.calls.append(("set_controls", controls))

    def stop(self) -> None:
        self.calls.append(("stop", None))

    def close(self) -> None:
        self.calls.append(("close", None))


@pytest.fixture
def picamera2(monkeypatch: pytest.MonkeyPatch) -> type[FakePicamera2]:
    module = types.ModuleType("picamera2")
    module.Picamera2 = FakePicamera2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", module)
    FakePicamera2.instances = []
    FakePicamera2.attached = True
    return FakePicamera2


def test_picamera2_is_configured_and_gives_bgr_frames(picamera2: type[FakePicamera2]) -> None:
    source = open_source("picamera2", cam_cfg(width=320, height=240, fps=25))
    with source:
        frames = [source.read() for _ in range(2)]
        source.set_fps(10)
    cam = picamera2.instances[0]
    assert cam.config is not None
    assert cam.config["main"] == {"size": (320, 240), "format": "RGB888"}
    assert cam.config["controls"] == {"FrameDurationLimits": (40000, 40000)}
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames)
    assert frames[0].image[0, 0].tolist() == [10, 20, 30]  # passed through as OpenCV's BGR
    assert frames[1].index > frames[0].index
    assert ("set_controls", {"FrameDurationLimits": (100000, 100000)}) in cam.calls
    wait_for(lambda: ("close", None) in cam.calls)
    assert ("stop", None) in cam.calls


def test_picamera2_without_a_camera_is_a_camera_error(picamera2: type[FakePicamera2]) -> None:
    picamera2.attached = False
    with pytest.raises(CameraError, match=r"picamera2.*cannot open"):
        open_source("picamera2", cam_cfg()).open()


def test_picamera2_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import picamera2 → ImportError
    with pytest.raises(CameraError) as err:
        open_source("picamera2", cam_cfg())
    assert "picamera2" in str(err.value) and "apt install python3-picamera2" in str(err.value)


def test_picamera2_is_not_imported_by_other_sources(tmp_path: Path) -> None:
    media.write_image(tmp_path / "a.png", media.numbered_frame(0))
    sys.modules.pop("picamera2", None)
    open_source(str(tmp_path), cam_cfg())
    open_source("0", cam_cfg())
    assert "picamera2" not in sys.modules


# --- demo -------------------------------------------------------------------------------------


def test_demo_scene_has_a_real_face_that_moves_and_leaves() -> None:
    scene = DemoScene()
    detector = build_detector(DetectorConfig())
    boxes = []
    for t in (0.0, 1.5, 4.5):
        image = scene.render(t)
        assert image.shape == (480, 640, 3) and image.dtype == np.uint8
        faces = detector.detect(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        assert len(faces) == 1
        boxes.append(faces[0])
    assert boxes[0].x != boxes[1].x and boxes[1].x != boxes[2].x  # she moves
    away = scene.render(VISIBLE_S + 1.0)
    assert detector.detect(cv2.cvtColor(away, cv2.COLOR_BGR2GRAY)) == []
    assert np.array_equal(scene.render(2.0), scene.render(2.0 + CYCLE_S))  # and comes back


def test_demo_source_is_paced_and_drops_when_the_consumer_is_slow() -> None:
    with open_source("demo", cam_cfg(fps=20)) as source:
        frames = [source.read() for _ in range(3)]
        time.sleep(0.3)  # the consumer is busy for six frame periods
        late = source.read()
    assert frames[0].index < frames[1].index < frames[2].index
    assert frames[2].t - frames[0].t >= 2 * 0.05 * 0.9  # not faster than 20 fps
    assert late.index >= frames[2].index + 5  # skipped to the newest frame


def test_demo_without_scikit_image_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(CameraError, match=r"pip install serenbox\[demo\]"):
        open_source("demo", cam_cfg())
