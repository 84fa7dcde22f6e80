"""Helpers of the conformance suite (tests/integration/test_conformance.py): where the public material
lives, per-frame MD5s as stock ffmpeg's framemd5 computes them, IVF demuxing, and an H.264
SPS rewriter that removes the VUI reorder hint from a stream."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = "VMEDIAD_CONFORMANCE_DIR"
# In CI the clone sits next to a copy of shared/: <clone>/../shared/conformance.
DEFAULT_DIR = REPO.parent / "shared" / "conformance"
IVF_HEADER = struct.Struct("<4sHH4sHHIII4x")
IVF_FRAME = struct.Struct("<IQ")


def conformance_dir() -> Path:
    """``$VMEDIAD_CONFORMANCE_DIR`` when set, else ``../shared/conformance`` next to the repo."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_DIR


def conformance_streams(root: Path) -> list[Path]:
    """Every stream in ``root`` that has its golden ``NAME.md5`` next to it, sorted by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_file() and p.suffix not in (".md5", ".crc", ".md")
                  and (root / (p.name + ".md5")).is_file())


def read_md5s(path: Path) -> list[str]:
    """One MD5 per output frame, in output order (a NAME.md5 file)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def planes_md5(planes: Iterable[npt.NDArray[np.generic]]) -> str:
    """MD5 of the planes packed without padding, as ffmpeg's framemd5 hashes a frame.  Each
    plane is a view of its visible rows and row bytes (it may have a stride): only those
    bytes are hashed, in row order."""
    h = hashlib.md5()
    for p in planes:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def ffmpeg_framemd5(path: Path) -> list[str]:
    """Stock ffmpeg's per-frame MD5s of ``path`` in the stream's native pixel format."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough",
                          "-f", "framemd5", "-"], check=True, capture_output=True, text=True, timeout=120).stdout
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines() if line and not line.startswith("#")]


# --- IVF --------------------------------------------------------------------------------
def is_ivf(data: bytes) -> bool:
    return data[:4] == b"DKIF"


def ivf_frames(data: bytes) -> list[tuple[bytes, int]]:
    """The (payload, pts) of every frame of an IVF file (32-byte file header, then a 12-byte
    header per frame: size u32, pts u64)."""
    magic, _version, header_len, _fourcc, _w, _h, _rate, _scale, _count = IVF_HEADER.unpack_from(data, 0)
    if magic != b"DKIF":
        raise ValueError("not an IVF file")
    pos, frames = header_len, []
    while pos + IVF_FRAME.size <= len(data):
        size, pts = IVF_FRAME.unpack_from(data, pos)
        pos += IVF_FRAME.size
        if pos + size > len(data):
            raise ValueError(f"IVF frame at {pos - IVF_FRAME.size} is truncated")
        frames.append((data[pos:pos + size], pts))
        pos += size
    return frames


# --- H.264 Annex B and the SPS ------------------------------------------------------------
def annexb_nals(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the payload of every NAL unit of an Annex B byte stream."""
    starts: list[int] = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    spans = []
    for k, s in enumerate(starts):
        e = starts[k + 1] - 3 if k + 1 < len(starts) else len(data)
        while e > s and data[e - 1] == 0:  # trailing_zero_8bits / the next 4-byte start code
            e -= 1
        spans.append((s, e))
    return spans


def unescape(nal: bytes) -> bytes:
    """RBSP of a NAL unit: emulation prevention bytes (00 00 03) removed."""
    out, zeros = bytearray(), 0
    for b in nal:
        if zeros >= 2 and b == 3:
            zeros = 0
            continue
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def escape(rbsp: bytes) -> bytes:
    """A NAL unit from its RBSP: 00 00 0x (x <= 3) becomes 00 00 03 0x."""
    out, zeros = bytearray(), 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]
            v = (v << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


@dataclass(frozen=True)
class SpsVui:
    """Where the VUI of an SPS RBSP starts (the bit of vui_parameters_present_flag), where
    its bitstream_restriction_flag is (-1: no VUI), and max_num_ref_frames."""

    ref_frames: int
    vui_flag_bit: int
    restriction_flag_bit: int
    has_vui: bool
    has_restriction: bool


def _scaling_list(b: _Bits, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            nxt = (last + b.se() + 256) % 256
        last = nxt or last


def _hrd(b: _Bits) -> None:
    count = b.ue() + 1
    b.u(8)  # bit_rate_scale, cpb_size_scale
    for _ in range(count):
        b.ue()
        b.ue()
        b.u(1)
    b.u(20)  # four 5-bit lengths


def parse_sps_vui(rbsp: bytes) -> SpsVui:
    """Walk an SPS RBSP (after the NAL header byte) up to bitstream_restriction_flag
    (H.264 7.3.2.1.1 and E.1.1)."""
    b = _Bits(rbsp)
    profile = b.u(8)
    b.u(16)  # constraint flags, reserved bits, level_idc
    b.ue()  # seq_parameter_set_id
    if profile in _HIGH_PROFILES:
        chroma = b.ue()
        if chroma == 3:
            b.u(1)
        b.ue()
        b.ue()
        b.u(1)
        if b.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if b.u(1):
                    _scaling_list(b, 16 if i < 6 else 64)
    b.ue()  # log2_max_frame_num_minus4
    poc_type = b.ue()
    if poc_type == 0:
        b.ue()
    elif poc_type == 1:
        b.u(1)
        b.se()
        b.se()
        for _ in range(b.ue()):
            b.se()
    refs = b.ue()  # max_num_ref_frames
    b.u(1)
    b.ue()
    b.ue()
    if not b.u(1):  # frame_mbs_only_flag
        b.u(1)
    b.u(1)
    if b.u(1):  # frame_cropping_flag
        for _ in range(4):
            b.ue()
    vui_bit = b.pos
    if not b.u(1):
        return SpsVui(refs, vui_bit, -1, False, False)
    if b.u(1) and b.u(8) == 255:  # aspect_ratio_info_present_flag, aspect_ratio_idc
        b.u(32)
    if b.u(1):  # overscan_info_present_flag
        b.u(1)
    if b.u(1):  # video_signal_type_present_flag
        b.u(4)
        if b.u(1):
            b.u(24)
    if b.u(1):  # chroma_loc_info_present_flag
        b.ue()
        b.ue()
    if b.u(1):  # timing_info_present_flag
        b.u(65)
    nal_hrd = b.u(1)
    if nal_hrd:
        _hrd(b)
    vcl_hrd = b.u(1)
    if vcl_hrd:
        _hrd(b)
    if nal_hrd or vcl_hrd:
        b.u(1)  # low_delay_hrd_flag
    b.u(1)  # pic_struct_present_flag
    restriction_bit = b.pos
    return SpsVui(refs, vui_bit, restriction_bit, True, bool(b.u(1)))


def _cut_rbsp(rbsp: bytes, bit: int) -> bytes:
    """The first ``bit`` bits of ``rbsp``, a 0 flag, then rbsp_trailing_bits."""
    bits = "".join(f"{x:08b}" for x in rbsp)[:bit] + "0" + "1"
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def strip_reorder_hint(stream: bytes, *, whole_vui: bool = False) -> bytes:
    """``stream`` (H.264 Annex B) with every SPS rewritten so that it carries no reorder hint:
    bitstream_restriction_flag = 0 (max_num_reorder_frames and max_dec_frame_buffering gone)
    or, with ``whole_vui``, vui_parameters_present_flag = 0.  Nothing else changes."""
    out, last = bytearray(), 0
    for s, e in annexb_nals(stream):
        if stream[s] & 0x1F != 7:
            continue
        rbsp = unescape(stream[s + 1:e])
        vui = parse_sps_vui(rbsp)
        if whole_vui and vui.has_vui:
            rbsp = _cut_rbsp(rbsp, vui.vui_flag_bit)
        elif not whole_vui and vui.has_restriction:
            rbsp = _cut_rbsp(rbsp, vui.restriction_flag_bit)
        out += stream[last:s + 1] + escape(rbsp)
        last = e
    out += stream[last:]
    return bytes(out)


def sps_reorder_hints(stream: bytes) -> Iterator[SpsVui]:
    """The VUI facts of every SPS of an H.264 Annex B stream."""
    for s, e in annexb_nals(stream):
        if stream[s] & 0x1F == 7:
            yield parse_sps_vui(unescape(stream[s + 1:e]))
