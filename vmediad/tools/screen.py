"""The shared screen from outside hostd: a lossless snapshot, and a recording through the device."""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt

from guestlib.control import ControlError, ScreenReader


def write_png(screen: npt.NDArray[np.uint8], path: Path) -> None:
    """A (H, W, 4) bgra screen as a lossless RGB PNG (the screen is opaque)."""
    from hostd.display.http import encode_png

    path.write_bytes(encode_png(screen))


def snapshot(socket_path: str | None, path: Path) -> tuple[int, int, int]:
    """Write the screen hostd composed last to ``path`` (PNG); returns (seq, width, height)."""
    with ScreenReader(socket_path) as r:
        seq, screen = r.next(0, 0.0)
    write_png(screen, path)
    return seq, screen.shape[1], screen.shape[0]


def record(socket_path: str | None, path: Path, seconds: float, *, fps: int = 30, codec: str = "h264",
           on_frame: Callable[[int, float], None] | None = None) -> dict[str, int | float]:
    """Record the screen for ``seconds`` into ``path`` (an MP4 for h264): every composed screen is
    converted to yuv420p here and encoded on the device by a guest named ``screen-recorder``.
    Timestamps are the seconds since the start, in 1/fps units, so the video plays at the pace
    the screen changed (a screen that did not change is not repeated)."""
    import guestlib
    from guestlib.media import Muxer

    with ScreenReader(socket_path) as r:
        seq, screen = r.next(0, 0.0)
        h, w = screen.shape[:2]
        w2, h2 = w - w % 2, h - h % 2
        region = max(64 << 20, w2 * h2 * 8)
        frames, last_pts = 0, -1
        with guestlib.attach(socket_path, name="screen-recorder", region_size=region) as dev, \
                dev.encoder(codec, w2, h2, fps, pix_fmt="yuv420p") as enc:
            mux = Muxer(path, codec, w2, h2, enc.time_base, Fraction(fps))
            try:
                t0 = time.monotonic()
                while True:
                    now = time.monotonic() - t0
                    pts = int(now * fps)
                    if pts > last_pts:
                        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(screen[:h2, :w2]), format="bgra")
                        yuv = vf.reformat(format="yuv420p")
                        f = enc.new_frame()
                        flat, at = yuv.to_ndarray().reshape(-1), 0  # y, u, v back to back
                        for dst in f.planes:
                            dst[:] = flat[at : at + dst.size].reshape(dst.shape)
                            at += dst.size
                        mux.write(enc.encode(f, pts=pts))
                        frames, last_pts = frames + 1, pts
                        if on_frame is not None:
                            on_frame(frames, now)
                    left = seconds - (time.monotonic() - t0)
                    if left <= 0:
                        break
                    try:
                        seq, screen = r.next(seq, min(left, 1.0))
                    except ControlError as e:
                        if e.kind != "timeout":  # no new screen in that second: keep the last one
                            raise
                mux.write(enc.flush())
            finally:
                mux.close()
    return {"frames": frames, "width": w2, "height": h2, "seconds": seconds}
