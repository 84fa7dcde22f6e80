"""Failures say why: an odd 4:2:0 size is the guest's BAD_ARG at SESSION_OPEN, a BACKEND failure
carries FFmpeg's reason to the guest's exception (through the error record at dst) and to
hostd's log at warning level, and a guest's own faults stay below warning."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import numpy as np
import pytest
import structlog

import guestlib
from guestlib.device import Device, DeviceError
from hostd.daemon import Hostd
from vmediad import abi
from vmediad.abi import ErrorCode, Op, Status

# An x264 setting its encoder_open refuses (AVERROR_EXTERNAL, so BACKEND): VBV without a bitrate.
X264_REFUSES: dict[str, Any] = {"x264-params": "bitrate=0:vbv-maxrate=100"}
Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="errs", region_size=16 << 20) as d:
        yield d


@pytest.fixture
def warnings() -> Iterator[Logs]:
    """hostd's log lines at warning level and above (the tests run with level "warning")."""
    with structlog.testing.capture_logs() as logs:
        yield logs


def failed_tasks(logs: Logs) -> Logs:
    return [e for e in logs if e.get("event") == "task failed"]


def open_raw(dev: Device, cfg: abi.SessionConfig, dst: tuple[int, int]) -> tuple[Status, ErrorCode, int]:
    blob = dev.put(cfg.pack())
    try:
        c = dev.submit(Op.SESSION_OPEN, src=(blob.offset, blob.size), dst=dst).completion(timeout=30)
    finally:
        dev.free(blob)
    if c.status == Status.DONE:
        dev.submit(Op.SESSION_CLOSE, session=c.result).wait(timeout=30)
    return c.status, c.error, c.result_len


@pytest.mark.parametrize(("codec", "w", "h"), [("h264", 321, 240), ("h264", 320, 241), ("hevc", 321, 240)])
def test_odd_size_is_bad_arg_at_open_and_says_why(dev: Device, warnings: Logs, codec: str,
                                                  w: int, h: int) -> None:
    with pytest.raises(DeviceError) as ei:
        dev.encoder(codec, w, h)
    assert ei.value.code == ErrorCode.BAD_ARG
    impl = abi.ENCODER_IMPL[abi.Codec.H264 if codec == "h264" else abi.Codec.HEVC]
    assert str(ei.value) == (f"task failed: BAD_ARG: {impl} encodes 4:2:0, which needs an even width and height; "
                             f"got {w}x{h}")
    assert "\n" not in str(ei.value)
    assert dev.heap.allocated() == 0  # the config and the error record went back
    assert failed_tasks(warnings) == []  # the guest's own fault: not a warning


def test_odd_sizes_stay_open_where_the_encoder_pads(dev: Device) -> None:
    """vp9 (and mjpeg, mpeg4, av1) take odd 4:2:0 sizes: only x264/x265 are refused."""
    with dev.encoder("vp9", 321, 241) as enc:
        packets = enc.encode(np.full(abi.frame_size(abi.PixFmt.YUV420P, 321, 241), 90, np.uint8))
        packets += enc.flush()
    assert packets and packets[0].is_keyframe


def test_backend_failure_carries_ffmpegs_reason(hostd: Hostd, dev: Device, warnings: Logs) -> None:
    with pytest.raises(DeviceError) as ei:
        dev.encoder("h264", 320, 240, **X264_REFUSES)
    e = ei.value
    assert e.code == ErrorCode.BACKEND
    text = str(e)
    # libx264's own log line, then PyAV's message: "Generic error in an external library".
    assert text.startswith("task failed: BACKEND: [libx264] bitrate not specified (")
    assert "Generic error in an external library" in text and "\n" not in text
    [line] = failed_tasks(warnings)
    assert line["log_level"] == "warning" and line["error"] == "BACKEND" and line["op"] == "SESSION_OPEN"
    assert line["reason"].startswith("[libx264] bitrate not specified (")
    assert text == f"task failed: BACKEND: {line['reason']}"  # the same words for the guest and the operator
    assert len(line["reason"].encode()) <= abi.ERROR_TEXT_MAX
    vm = next(v for v in hostd.device.statistics()["vms"] if v["name"] == "errs")
    assert vm["errors"] == {"BACKEND": 1}
    # The worker survived it: the next session opens and encodes.
    with dev.encoder("h264", 320, 240) as enc:
        assert enc.encode(np.full(320 * 240 * 3 // 2, 60, np.uint8)) is not None


def test_error_record_bytes_at_dst(dev: Device) -> None:
    """The record hostd leaves: kind OUT_ERROR, count = the code, used = 16 + text; result_len = used."""
    assert dev.region.load64(abi.REG_CAPS) & abi.Caps.ERROR_TEXT
    odd = guestlib.codec.encoder_config("h264", 321, 240)
    want = b"libx264 encodes 4:2:0, which needs an even width and height; got 321x240"
    rec = dev.alloc(abi.ERROR_RECORD_SIZE)
    rec.mem[:] = b"\xee" * rec.size
    status, code, result_len = open_raw(dev, odd, (rec.offset, rec.size))
    assert (status, code, result_len) == (Status.ERROR, ErrorCode.BAD_ARG, 16 + len(want))
    assert bytes(rec.mem[:16]) == abi.OUT_HEADER.pack(abi.OUT_ERROR, ErrorCode.BAD_ARG, 16 + len(want))
    assert bytes(rec.mem[16 : 16 + len(want)]) == want
    assert bytes(rec.mem[16 + len(want) :]) == b"\xee" * (rec.size - 16 - len(want))  # nothing past `used`
    # A smaller dst gets the text cut to fit; none without room for a byte of text.
    rec.mem[:] = bytes(rec.size)
    assert open_raw(dev, odd, (rec.offset, 40))[1:] == (ErrorCode.BAD_ARG, 40)
    assert abi.unpack_error_record(rec.mem[:40], ErrorCode.BAD_ARG) == want[:24].decode()
    assert open_raw(dev, odd, (rec.offset, 16)) == (Status.ERROR, ErrorCode.BAD_ARG, 0)
    assert open_raw(dev, odd, (0, 0)) == (Status.ERROR, ErrorCode.BAD_ARG, 0)
    # Without FRAME_POOL a dst larger than a record is a frame pool without the flag (as before).
    big = dev.alloc(abi.POOL_MIN)
    assert open_raw(dev, guestlib.codec.decoder_config("h264"), (big.offset, big.size))[1] == ErrorCode.BAD_ARG
    ok = open_raw(dev, guestlib.codec.decoder_config("h264"), (rec.offset, abi.ERROR_RECORD_SIZE))
    assert ok == (Status.DONE, ErrorCode.OK, 0)  # a record-sized dst is no pool: the open succeeds
    dev.free(big)
    dev.free(rec)


def test_decode_failure_reason_reaches_the_exception(dev: Device, warnings: Logs) -> None:
    """A guest's corrupt input says what the decoder saw, and is no warning for hostd."""
    garbage = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    # Single-threaded: the error comes with the task that fed the bad data.
    with dev.decoder("h264", parse=False, threads=1) as dec, pytest.raises(DeviceError) as ei:
        dec.decode(b"\x00\x00\x00\x01\x65" + garbage, pts=0)
    assert ei.value.code == ErrorCode.INVALID_DATA
    text = str(ei.value)
    assert text.startswith("task failed: INVALID_DATA: [h264] ") and "Invalid data found when processing input" in text
    assert failed_tasks(warnings) == []


def test_crash_reason_reaches_the_exception(make_hostd: Callable[..., Hostd]) -> None:
    from codec_backend.engine import CRASH_MARKER

    h = make_hostd(fault_injection=True)
    with structlog.testing.capture_logs() as logs, \
            guestlib.attach(h.socket_path, name="crashy", region_size=16 << 20) as d, \
            d.encoder("h264", 64, 64) as enc:
        f = enc.new_frame()
        f.planes[0][0, : len(CRASH_MARKER)] = np.frombuffer(CRASH_MARKER, np.uint8)
        with pytest.raises(DeviceError) as ei:
            enc.encode(f)
    assert ei.value.code == ErrorCode.WORKER_CRASHED
    assert str(ei.value) == "task failed: WORKER_CRASHED: the worker died of SIGSEGV"
    [line] = failed_tasks(logs)
    assert (line["log_level"], line["error"], line["reason"]) == ("warning", "WORKER_CRASHED",
                                                                   "the worker died of SIGSEGV")
