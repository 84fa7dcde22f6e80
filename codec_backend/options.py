"""Guest codec options: the allow/deny lists and the screening of a SessionConfig's
options (``*-params`` lists, path-like values) before a codec context is opened with them."""

from __future__ import annotations

import re
from typing import Final

import av
import av.error
from av.video.codeccontext import VideoCodecContext

from codec_backend.session_base import MAX_OPTIONS, CodecError, _ff_error
from vmediad.abi import ErrorCode
from vmediad.sched import keep_scheduling

# Options a guest may pass: generic AVCodecContext options on this list, and any
# private option of the codec not on the deny list.  Everything that touches
# files, geometry, pixel format, threading mode or buffer limits is refused.
_GENERIC_ALLOWED: Final = frozenset({
    "b", "bt", "g", "qcomp", "qblur", "qmin", "qmax", "qdiff", "bf", "b_qfactor",
    "b_qoffset", "i_qfactor", "i_qoffset", "maxrate", "minrate", "bufsize",
    "rc_init_occupancy", "rc_max_vbv_use", "rc_min_vbv_use", "keyint_min", "refs",
    "trellis", "flags", "flags2", "strict", "err_detect", "ec", "mbd", "cmp",
    "subcmp", "mbcmp", "precmp", "dia_size", "last_pred", "pre_dia_size", "subq",
    "me_range", "mblmin", "mblmax", "lumi_mask", "tcplx_mask", "scplx_mask",
    "p_mask", "dark_mask", "dct", "idct", "nssew", "bidir_refine", "mv0_threshold",
    "compression_level", "global_quality", "level", "slices", "aspect", "sar",
    "colorspace", "color_primaries", "color_trc", "color_range",
    "chroma_sample_location", "field_order", "skip_loop_filter", "skip_idct",
    "skip_frame", "lowres", "discard_damaged_percentage", "export_side_data", "bug",
    "apply_cropping",
})
_PRIVATE_DENIED: Final = frozenset({"passlogfile", "stats", "x265-stats"})
_PARAM_LISTS: Final = frozenset({"x264-params", "x264opts", "x265-params", "svtav1-params"})
_PARAM_DENIED_PARTS: Final = ("file", "stat", "csv", "dump", "recon", "analysis", "clbin",
                              "input", "rpu", "path", "config")
_PARAM_DENIED: Final = frozenset({
    "w", "h", "width", "height", "csp", "color-format", "depth", "scaling-list",
    "fgs-table", "source-width", "source-height", "forced-max-frame-width",
    "forced-max-frame-height",
})
_FRACTION_RE: Final = re.compile(r"\d+/\d+")


def _check_param_list(key: str, value: str) -> None:
    for item in value.split(":"):
        sub, _, sub_value = item.partition("=")
        sub = sub.strip().lower()
        if sub in _PARAM_DENIED or any(part in sub for part in _PARAM_DENIED_PARTS):
            raise CodecError(ErrorCode.BAD_ARG, f"{key}: parameter {sub!r} is not allowed")
        _check_value(key, sub_value)


def _check_value(key: str, value: str) -> None:
    if ("/" in value or "\\" in value) and not _FRACTION_RE.fullmatch(value):
        raise CodecError(ErrorCode.BAD_ARG, f"option {key}: paths are not allowed")


def _guest_options(ctx: VideoCodecContext, options: tuple[tuple[str, str], ...]) -> dict[str, str]:
    if len(options) > MAX_OPTIONS:
        raise CodecError(ErrorCode.BAD_ARG, "too many options")
    if not options:
        return {}
    private = {o.name for o in ctx.supported_options.private}
    out: dict[str, str] = {}
    for key, value in options:
        if "\0" in key or "\0" in value:
            raise CodecError(ErrorCode.BAD_ARG, "NUL in option")
        if key in private:
            if key in _PRIVATE_DENIED:
                raise CodecError(ErrorCode.BAD_ARG, f"option {key!r} is not allowed")
            if key in _PARAM_LISTS:
                _check_param_list(key, value)
            else:
                _check_value(key, value)
        elif key not in _GENERIC_ALLOWED:
            raise CodecError(ErrorCode.BAD_ARG, f"option {key!r} is unknown or not allowed")
        out[key] = value
    return out


def _merge_params(opts: dict[str, str], key: str, defaults: str) -> None:
    """Prepend our defaults to a key=value:... list; the guest's later entries win."""
    guest = opts.get(key)
    opts[key] = f"{defaults}:{guest}" if guest else defaults


def _open_ctx(ctx: VideoCodecContext, opts: dict[str, str]) -> None:
    ctx.options = opts
    try:
        with keep_scheduling():  # SVT-AV1 run as root makes its threads SCHED_FIFO 99 (vmediad/sched.py)
            ctx.open()
    except av.error.FFmpegError as exc:
        raise _ff_error(exc, ErrorCode.BAD_ARG) from exc
    leftover = dict(ctx.options)
    if leftover:
        raise CodecError(ErrorCode.BAD_ARG, f"options not recognised by {ctx.name}: {sorted(leftover)}")
