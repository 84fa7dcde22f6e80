"""What a fake VM shows on the shared screen: a video player, and the pictures of its other work.

``play`` decodes a file through the device and presents each frame on the VM's display at the
stream's pace: a pooled frame is shown where the decoder wrote it (no pixel is copied in the
guest).  ``Shower`` lets the encode, decode and transcode workloads show what they work on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from guestlib.display import Display
from guestlib.frames import Frame
from vmediad import abi

PLAY_BUFFERS = 3  # mailbox: a present never waits for the compositor


class Shower:
    """A VM's display, opened on first use at the first picture's size (yuv420p)."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.display: Display | None = None
        self.failed = ""

    def _open(self, width: int, height: int) -> Display:
        if self.display is None:
            self.display = self.dev.display(width, height, "yuv420p", PLAY_BUFFERS)
        return self.display

    def present(self, frame: Frame) -> None:
        """Show a decoded frame (in place when pooled; else copied into the display)."""
        if self.failed or frame.pix_fmt not in abi.DISPLAY_FORMATS:
            self.failed = self.failed or f"cannot show {frame.format} pictures"
            return
        self._open(frame.width, frame.height).present(frame)

    def draw(self, width: int, height: int, fill: Callable[[Frame], None]) -> None:
        """Draw into the display's back buffer with ``fill`` and commit it."""
        disp = self._open(width, height)
        back = disp.back()
        fill(back)
        disp.commit(back)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None


def play(dev: Any, src: str, *, limit: int | None, stop: Callable[[], bool], on_frame: Callable[[int], None],
         problems: list[str], fps: int = 30) -> dict[str, int]:
    """Decode ``src`` on the device and present every frame at the stream's rate."""
    from guestlib.media import DecodeAll, open_video

    container, vs = open_video(src)
    with container:
        rate = Fraction(vs.average_rate or fps)
        period = float(1 / rate)
        # The screen shows yuv420p (as well as bgra and nv12): a yuv420p stream's frames are
        # presented as decoded, others are converted by the decoder.
        with dev.decoder(vs.codec_context.name, parse=False, width=vs.codec_context.width,
                         height=vs.codec_context.height, pix_fmt="yuv420p") as dec:
            shower = Shower(dev)  # closed before the decoder whose pool it shows
            try:
                t0, n = time.monotonic(), 0
                for f in DecodeAll(dec, container, vs, problems):
                    if stop() or (limit is not None and n >= limit):
                        break
                    shower.present(f)
                    if shower.failed:
                        raise ValueError(shower.failed)
                    n += 1
                    on_frame(n)
                    time.sleep(max(0.0, t0 + n * period - time.monotonic()))
            finally:
                disp = shower.display
                shower.close()  # reads the last flips
    shown = {"presented": disp.presented, "dropped": disp.dropped} if disp is not None else {}
    return {"frames": n, **shown}
