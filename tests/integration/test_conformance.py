"""Decoder conformance through the whole device: every stream decodes bit-exact, every frame.

Streams: the public material in the conformance directory (``$VMEDIAD_CONFORMANCE_DIR``, else
``../shared/conformance`` next to the repo; golden ``NAME.md5`` per stream), and streams stock
ffmpeg makes here, judged by stock ffmpeg's own framemd5: H.264 with B-frames, with 8 reference
frames, without the VUI reorder hint (progressive and MBAFF), cropped; HEVC with B-frames; and
native formats past 8-bit 4:2:0 (10-bit H.264/HEVC/VP9/AV1, 4:2:2 and 4:4:4).  Streams whose
codec or pixel format guestlib does not know yet are strict xfails: they run for real the
moment support lands.

Each stream runs in four modes: demuxed packets (PyAV's demuxer, ``parse=False``) and raw
chunks in PARSE mode (4 KiB cuts of an Annex B file; an IVF file's frames, demuxed here, since
the device's PARSE takes an elementary stream and the vp8/vp9/av1 parsers need whole frames),
each with a frame pool (picture size given) and without.  The device decodes in its default
``native`` format: every frame must come back in the stream's own pixel format, unconverted
(10-bit ones in the pool too), hashed over its visible planes and compared with the golden,
in order.
``pytest -s`` prints a per-stream table; a failure's message carries the same row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest
from av.video.frame import PictureType

import guestlib
from guestlib.codec import codec_id, pix_fmt_id
from guestlib.device import Device
from hostd.config import Config
from hostd.daemon import Hostd
from tests.conformance_util import (
    conformance_dir,
    conformance_streams,
    ffmpeg_framemd5,
    is_ivf,
    ivf_frames,
    planes_md5,
    read_md5s,
    sps_reorder_hints,
    strip_reorder_hint,
)
from tests.conftest import needs_ffmpeg
from vmediad import abi

CHUNK = 4096
MODES = ("packets", "packets-pool", "parse", "parse-pool")
_CAP_DR1 = 1 << 1  # AV_CODEC_CAP_DR1: the decoder allocates through get_buffer2 (a frame pool works)
GENERATED_FRAMES = 48
_BF3 = ["-bf", "3", "-b_strategy", "0"]
_X265 = ["-c:v", "libx265", "-x265-params", "bframes=4:b-adapt=0:log-level=error"]
_VP9 = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"]


@dataclass(frozen=True)
class Recipe:
    """How stock ffmpeg makes a stream: codec (as guestlib names it), pixel format, size,
    encoder arguments, muxer, and how the SPS is rewritten afterwards ("", "restriction",
    "vui": see conformance_util.strip_reorder_hint)."""

    codec: str
    pix_fmt: str
    args: tuple[str, ...]
    muxer: str
    size: str = "320x240"
    rewrite: str = ""


# Reordering: B-frames, many references, and no reorder hint in the SPS.  x264 always writes
# VUI bitstream_restriction (max_num_reorder_frames) unless the stream is intra-only, and no
# stock bitstream filter removes it: the SPS is rewritten here.
REORDER: dict[str, Recipe] = {
    "ffmpeg-h264-bframes.h264": Recipe("h264", "yuv420p", ("-c:v", "libx264", *_BF3), "h264"),
    "ffmpeg-h264-refs8.h264": Recipe("h264", "yuv420p", ("-c:v", "libx264", "-refs", "8", *_BF3), "h264"),
    "ffmpeg-h264-no-reorder-hint.h264": Recipe("h264", "yuv420p", ("-c:v", "libx264", *_BF3), "h264",
                                               rewrite="restriction"),
    "ffmpeg-h264-no-vui-bf5.h264": Recipe("h264", "yuv420p", ("-c:v", "libx264", "-bf", "5", "-b_strategy", "0"),
                                          "h264", rewrite="vui"),
    "ffmpeg-h264-mbaff-no-reorder-hint.h264": Recipe(
        "h264", "yuv420p", ("-c:v", "libx264", *_BF3, "-flags", "+ildct+ilme", "-x264-params", "interlaced=1"),
        "h264", rewrite="restriction"),
    "ffmpeg-h264-cropped-202x122.h264": Recipe("h264", "yuv420p", ("-c:v", "libx264", *_BF3), "h264",
                                               size="202x122"),
    "ffmpeg-hevc-bframes.h265": Recipe("hevc", "yuv420p", tuple(_X265), "hevc"),
}
# Native formats beyond 8-bit 4:2:0: decoded frames must keep them.
FORMATS: dict[str, Recipe] = {
    "ffmpeg-h264-high10.h264": Recipe("h264", "yuv420p10le", ("-c:v", "libx264", *_BF3), "h264"),
    "ffmpeg-hevc-main10.h265": Recipe("hevc", "yuv420p10le", tuple(_X265), "hevc"),
    "ffmpeg-vp9-profile2.ivf": Recipe("vp9", "yuv420p10le", tuple(_VP9), "ivf"),
    "ffmpeg-av1-10bit.ivf": Recipe("av1", "yuv420p10le", ("-c:v", "libsvtav1", "-preset", "12"), "ivf"),
    "ffmpeg-h264-422.h264": Recipe("h264", "yuv422p", ("-c:v", "libx264", *_BF3), "h264"),
    "ffmpeg-h264-444.h264": Recipe("h264", "yuv444p", ("-c:v", "libx264", *_BF3), "h264"),
    "ffmpeg-vp9-444.ivf": Recipe("vp9", "yuv444p", tuple(_VP9), "ivf"),
}
GENERATED = {**REORDER, **FORMATS}


# --- streams ----------------------------------------------------------------------------------
@dataclass
class Stream:
    """A stream as the suite feeds it: the codec as guestlib names it, its native format and
    size, its demuxed packets, and the raw chunks PARSE mode gets."""

    path: Path
    name: str
    codec: str
    pix_fmt: str
    width: int
    height: int
    packets: list[tuple[bytes, int | None]]
    chunks: list[tuple[bytes, int | None]]
    chunking: str


def load_stream(path: Path) -> Stream:
    data = path.read_bytes()
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        ctx = st.codec_context
        codec = ctx.codec.canonical_name
        fmt = ctx.format.name if ctx.format is not None else "?"
        packets = [(bytes(p), p.pts) for p in c.demux(st) if p.size]
        w, h = ctx.width, ctx.height
    if is_ivf(data):
        chunks: list[tuple[bytes, int | None]] = [(f, pts) for f, pts in ivf_frames(data)]
        chunking = "IVF frames"
    else:
        chunks = [(data[i:i + CHUNK], None) for i in range(0, len(data), CHUNK)]
        chunking = f"{CHUNK} B cuts"
    return Stream(path, path.name, codec, fmt, w, h, packets, chunks, chunking)


def device_format(pix_fmt: str) -> str:
    """The device format a native session emits a libav format as (the full-range yuvj
    formats have the layout of their yuv twins)."""
    return pix_fmt.replace("yuvj", "yuv")


def unsupported(codec: str, pix_fmt: str) -> str | None:
    """Why the device cannot decode this in its own format yet (guestlib's own error), or None."""
    try:
        codec_id(codec)
        pix_fmt_id(device_format(pix_fmt))
    except ValueError as e:
        return str(e).split(";")[0]
    return None


def _probe(path: Path) -> tuple[str, str]:
    with av.open(str(path)) as c:
        ctx = c.streams.video[0].codec_context
        return ctx.codec.canonical_name, ctx.format.name if ctx.format is not None else "?"


def _conformance_params() -> list[Any]:
    root = conformance_dir()
    streams = conformance_streams(root)
    if not streams:
        return [pytest.param(None, mode, id=f"missing-{mode}", marks=pytest.mark.skip(
            reason=f"no conformance material at {root} (set VMEDIAD_CONFORMANCE_DIR)")) for mode in MODES]
    params = []
    for path in streams:
        codec, fmt = _probe(path)
        why = unsupported(codec, fmt)
        # The device refuses the stream at SESSION_OPEN today: guestlib raises ValueError.
        # strict: the day support lands, these turn into ordinary tests and must pass.
        marks = [pytest.mark.xfail(strict=True, raises=ValueError, reason=f"{codec}/{fmt}: {why}")] if why else []
        params += [pytest.param(path, mode, id=f"{path.name}-{mode}", marks=marks) for mode in MODES]
    return params


# --- results table ----------------------------------------------------------------------------
@dataclass
class Result:
    stream: str
    codec: str
    mode: str
    expected: int
    got: int = 0
    mismatches: int = 0
    first_diff: int | None = None
    pooled: int = 0
    pool: bool = False
    lost: list[int] = field(default_factory=list)
    extra: int = 0
    error: str = ""
    note: str = ""
    formats: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.error and self.got == self.expected and self.mismatches == 0

    def row(self) -> str:
        first = "-" if self.first_diff is None else str(self.first_diff)
        pool = f"{self.pooled}/{self.got}" if self.pool else "-"
        verdict = "bit-exact" if self.ok else "ERROR" if self.error else "FAIL"
        notes = [self.error] if self.error else []
        if self.lost:
            shown = ", ".join(map(str, self.lost[:8])) + (", ..." if len(self.lost) > 8 else "")
            notes.append(f"lost frames {shown}")
        if self.extra:
            notes.append(f"{self.extra} frames not in the golden")
        notes += [self.note] if self.note else []
        return (f"{self.stream:40} {self.codec:5} {self.mode:12} {self.expected:5} {self.got:5} {self.mismatches:5}"
                f" {first:>5} {pool:>9}  {verdict}{'  ' + '; '.join(notes) if notes else ''}")


HEADER = (f"{'stream':40} {'codec':5} {'mode':12} {'want':>5} {'got':>5} {'diff':>5} {'first':>5} {'pooled':>9}"
          "  result")


def compare(res: Result, want: list[str], got: list[str]) -> None:
    """Frame by frame in output order (a missing or extra frame counts as a mismatch), and
    which golden frames never came out at all."""
    res.got = len(got)
    diffs = [i for i in range(max(len(want), len(got)))
             if i >= len(want) or i >= len(got) or want[i] != got[i]]
    res.mismatches = len(diffs)
    res.first_diff = diffs[0] if diffs else None
    left = Counter(got)
    for i, m in enumerate(want):
        if left[m] > 0:
            left[m] -= 1
        else:
            res.lost.append(i)
    res.extra = sum(left.values())


@pytest.fixture(scope="module")
def table() -> Iterator[list[Result]]:
    rows: list[Result] = []
    yield rows
    if rows:
        print("\n" + "\n".join([HEADER, *(r.row() for r in rows)]))


# --- the device -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def device() -> Iterator[Device]:
    d = Path(tempfile.mkdtemp(prefix="vmd-conf-"))  # Unix socket paths must stay short
    h = Hostd(Config(socket=d / "h.sock", channels=2, region_default=8 << 20, spin_us=50))
    h.start()
    try:
        with guestlib.attach(str(h.socket_path), name="conformance", region_size=64 << 20) as dev:
            yield dev
    finally:
        h.stop()
        shutil.rmtree(d, ignore_errors=True)


def decode_on_device(dev: Device, s: Stream, mode: str, res: Result) -> list[str]:
    """Decode ``s`` in ``mode`` through the device; the MD5 of every frame, in output order."""
    parse, pooled = mode.startswith("parse"), mode.endswith("-pool")
    size: dict[str, int] = {"width": s.width, "height": s.height} if pooled else {}
    out: list[str] = []
    with dev.decoder(s.codec, parse=parse, **size) as dec:  # pix_fmt "native": the default
        res.pool = pooled
        if pooled:
            impl = av.codec.Codec(abi.DECODER_IMPL[codec_id(s.codec)], "r")
            if impl.capabilities & _CAP_DR1:
                assert dec.pool_size > 0, f"{s.name}: no frame pool although {impl.name} decodes into one"
            else:
                assert dec.pool_size == 0
                res.note = f"no pool: {impl.name} allocates its own pictures"
        feed = s.chunks if parse else s.packets
        for data, pts in [*feed, (b"", None)]:
            frames = dec.flush() if not data else dec.decode(data, pts=pts)
            for f in frames:
                # The planes are views of the visible rows and row bytes (strided in a pool
                # slot): the hash covers exactly what framemd5 covers.
                out.append(planes_md5(f.planes))
                res.pooled += f.pooled
                res.formats.add(f.format + (" (converted)" if f.converted else ""))
    return out


def check(dev: Device, s: Stream, mode: str, want: list[str], table: list[Result]) -> None:
    res = Result(s.name, s.codec, mode, len(want))
    table.append(res)
    try:
        got = decode_on_device(dev, s, mode, res)
    except Exception as e:
        res.error = f"{type(e).__name__}: {str(e).split(';')[0]}"
        print("\n" + res.row())
        raise
    compare(res, want, got)
    print("\n" + res.row())
    chunks = s.chunking if mode.startswith("parse") else "demuxed packets"
    assert res.ok, f"{s.name} ({chunks}) is not bit-exact:\n{HEADER}\n{res.row()}"
    assert res.formats == {device_format(s.pix_fmt)}, \
        f"{s.name}: frames came back as {res.formats}, the stream is {s.pix_fmt}"
    if res.pool and not res.note:
        assert res.pooled > 0, f"{s.name}: no frame was decoded into the frame pool"


# --- the public conformance material -----------------------------------------------------------
@pytest.mark.parametrize(("path", "mode"), _conformance_params())
def test_conformance_stream(device: Device, table: list[Result], path: Path, mode: str) -> None:
    s = load_stream(path)
    want = read_md5s(path.with_name(path.name + ".md5"))
    assert want, f"{path.name}.md5 is empty"
    check(device, s, mode, want, table)


# --- streams stock ffmpeg makes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Stream, list[str]]]:
    """Each stream and stock ffmpeg's framemd5 of it (native format, every frame)."""
    d = tmp_path_factory.mktemp("generated")
    out: dict[str, tuple[Stream, list[str]]] = {}
    env = {**os.environ, "SVT_LOG": "1"}  # SVT-AV1 prints its banner otherwise
    for name, r in GENERATED.items():
        path = d / name
        src = ["-f", "lavfi", "-i", f"testsrc2=size={r.size}:rate=25", "-frames:v", str(GENERATED_FRAMES),
               "-pix_fmt", r.pix_fmt]
        subprocess.run(["ffmpeg", "-v", "error", "-y", *src, *r.args, "-f", r.muxer, str(path)], check=True,
                       timeout=120, env=env)
        if r.rewrite:
            path.write_bytes(strip_reorder_hint(path.read_bytes(), whole_vui=r.rewrite == "vui"))
        want = ffmpeg_framemd5(path)
        assert len(want) == GENERATED_FRAMES, f"stock ffmpeg decoded {len(want)} frames of {name}"
        s = load_stream(path)
        assert (s.codec, s.pix_fmt) == (r.codec, r.pix_fmt), (name, s.codec, s.pix_fmt)
        out[name] = (s, want)
    return out


@needs_ffmpeg
def test_generated_streams_are_what_they_claim(generated: dict[str, tuple[Stream, list[str]]]) -> None:
    """The generated streams exercise what their names say: B-pictures (reordering), 8
    reference frames, SPSs without the reorder hint, and the rewrite changes nothing else."""
    for name in REORDER:
        s = generated[name][0]
        assert len(s.packets) == GENERATED_FRAMES, name
        with av.open(str(s.path)) as c:
            types = [PictureType(f.pict_type) for f in c.decode(video=0)]
        assert len(types) == GENERATED_FRAMES and PictureType.B in types, (name, types)
    h264 = {name: list(sps_reorder_hints(generated[name][0].path.read_bytes()))
            for name, r in REORDER.items() if r.codec == "h264"}
    expect = {"ffmpeg-h264-bframes.h264": (True, True), "ffmpeg-h264-refs8.h264": (True, True),
              "ffmpeg-h264-cropped-202x122.h264": (True, True),
              "ffmpeg-h264-no-reorder-hint.h264": (True, False), "ffmpeg-h264-no-vui-bf5.h264": (False, False),
              "ffmpeg-h264-mbaff-no-reorder-hint.h264": (True, False)}
    for name, (vui, restriction) in expect.items():
        assert h264[name] and all(h.has_vui == vui and h.has_restriction == restriction for h in h264[name]), \
            (name, h264[name])
    assert min(h.ref_frames for h in h264["ffmpeg-h264-refs8.h264"]) == 8
    assert max(h.ref_frames for h in h264["ffmpeg-h264-bframes.h264"]) < 8
    # Same pictures with and without the hint: stock ffmpeg probes the stream before it
    # decodes, so it knows the reorder depth either way.
    hinted = generated["ffmpeg-h264-bframes.h264"][1]
    assert generated["ffmpeg-h264-no-reorder-hint.h264"][1] == hinted
    assert generated["ffmpeg-h264-cropped-202x122.h264"][0].width == 202


def _generated_params() -> list[Any]:
    params = []
    for name, r in GENERATED.items():
        why = unsupported(r.codec, r.pix_fmt)
        reason = f"{r.codec}/{r.pix_fmt}: {why}"
        marks = [pytest.mark.xfail(strict=True, raises=ValueError, reason=reason)] if why else []
        params += [pytest.param(name, mode, id=f"{name}-{mode}", marks=marks) for mode in MODES]
    return params


@needs_ffmpeg
@pytest.mark.parametrize(("name", "mode"), _generated_params())
def test_generated_stream(device: Device, table: list[Result], generated: dict[str, tuple[Stream, list[str]]],
                          name: str, mode: str) -> None:
    s, want = generated[name]
    check(device, s, mode, want, table)
