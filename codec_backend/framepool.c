/* The decoder frame pool (prototypes in framepool.h): an AVCodecContext.get_buffer2 that hands
 * the decoder picture buffers carved out of the guest's frame pool, so decoded planes are
 * written straight into guest memory; the lending of those pictures to the guest; a packet
 * loop that decodes and lends without Python per packet or frame; and a per-thread keeper of
 * libav's last error line.
 *
 * Built without FFmpeg's headers (the PyAV wheels ship none): every libav function is called
 * through an address codec_backend/framepool.py found in the libraries PyAV loaded, and every
 * struct offset below is either fixed since the FFmpeg version named, or passed in after
 * framepool.py discovered it and checked it on live objects.  If a check fails, framepool.py
 * never calls in here and decode falls back to copying.  Relied on:
 *
 *   PyAV's object layout: a CodecContext or Frame is a Cython extension object, a 16-byte
 *     PyObject header, its vtable pointer, then the first declared attribute, the AVCodecContext
 *     or AVFrame pointer (`off_pyframe`, 24; checked against a real frame's planes).
 *   AVFrame: data[8] at 0, linesize[8] at 64, extended_data at 96, width 104, height 108,
 *     format 116 (fixed since FFmpeg 1.x, checked by framepool.py); buf[] and pts are found at
 *     run time (`off_buf`, `off_frame_pts`).
 *   AVCodecContext: opaque at 48 (fixed since FFmpeg 1.x); get_buffer2 found at run time.
 *   AVPacket: buf, pts, dts, data, size lead it (fixed since FFmpeg 2.x, checked on a packet).
 *   AVClass: class_name, then item_name, lead it (since FFmpeg 0.6).
 *   Signatures: av_image_fill_plane_sizes (size_t[4], ptrdiff_t[4]: FFmpeg 4.4+) and
 *     av_buffer_create (size_t size: FFmpeg 5.0+); AVERROR(EAGAIN) is -11 (Linux).
 *   Checked with PyAV 18.1.0 and the FFmpeg 8.1.2 it bundles (libavcodec 62.28.102,
 *     libavutil 60.26.102), 64-bit little-endian Linux, GCC 12.
 *
 * The ABI layouts it writes (a frame table entry, the pool header) are not spelled out here:
 * they come from vmediad/abi.py as ABI_* macros (abi.c_macros(), passed by the build), and
 * fp_abi_layout() reports their checksum so a module built for another layout is refused.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "framepool.h"

#ifndef ABI_LAYOUT_CRC
#error "build with vmediad.abi.c_macros() (codec_backend/_framepool_build.py)"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ABI is little-endian and so are the libav layouts relied on"
#endif

#define ITEM_OK(item) (ABI_FE_##item##_SIZE == 4 || ABI_FE_##item##_SIZE == 8)
_Static_assert(ITEM_OK(OFFSET) && ITEM_OK(WIDTH) && ITEM_OK(HEIGHT) && ITEM_OK(PIX_FMT) && ITEM_OK(NPLANES)
               && ITEM_OK(PTS) && ITEM_OK(PLANE_OFFSET0) && ITEM_OK(PLANE_OFFSET1) && ITEM_OK(PLANE_OFFSET2)
               && ITEM_OK(STRIDE0) && ITEM_OK(STRIDE1) && ITEM_OK(STRIDE2) && ITEM_OK(FLAGS) && ITEM_OK(SLOT),
               "frame entry items are u32/i32 or u64/i64");
_Static_assert(ABI_FE_PTS_SIZE == 8, "a frame entry's pts is an i64");
_Static_assert(ABI_POOL_LENT_SIZE == sizeof(uint32_t), "the pool's lent counters are u32");

uint32_t fp_abi_layout(void) { return ABI_LAYOUT_CRC; }

typedef int (*get_buffer2_fn)(void *avctx, void *frame, int flags);
typedef void (*align_fn)(void *avctx, int *w, int *h, int linesize_align[8]);
typedef int (*linesizes_fn)(int linesizes[4], int pix_fmt, int width);
typedef int (*plane_sizes_fn)(size_t sizes[4], int pix_fmt, int height, const ptrdiff_t linesizes[4]);
typedef void (*free_fn)(void *opaque, uint8_t *data);
typedef void *(*create_fn)(uint8_t *data, size_t size, free_fn free, void *opaque, int flags);

static struct {
    get_buffer2_fn dflt;
    align_fn align;
    linesizes_fn linesizes;
    plane_sizes_fn plane_sizes;
    create_fn create;
    size_t off_get_buffer2, off_opaque, off_buf;
    size_t off_pyframe;  /* offset of the AVFrame pointer in a PyAV frame object */
} av;

/* AVFrame's leading fields (see the top of the file); buf[] is discovered. */
#define F_DATA(f) ((uint8_t **)(f))
#define F_LINESIZE(f) ((int *)((char *)(f) + 64))
#define F_EXTENDED(f) (*(uint8_t ***)((char *)(f) + 96))
#define F_WIDTH(f) (*(int *)((char *)(f) + 104))
#define F_HEIGHT(f) (*(int *)((char *)(f) + 108))
#define F_FORMAT(f) (*(int *)((char *)(f) + 116))
#define F_BUF(f) ((void **)((char *)(f) + av.off_buf))
#define C_OPAQUE(c) (*(void **)((char *)(c) + av.off_opaque))
#define C_GET_BUFFER2(c) (*(get_buffer2_fn *)((char *)(c) + av.off_get_buffer2))

#define ALIGN 64          /* STRIDE_ALIGN of an AVX-512 build, and what av_malloc gives */
#define PAD (16 + ALIGN)  /* the over-read slack FFmpeg's own pool adds to every plane */
#define MAX_SLOTS ABI_POOL_MAX_SLOTS
#define FP_MAX_FORMATS 16  /* a native session's: 9 libav formats map to 6 ABI ones */

struct fp_pool {
    pthread_mutex_t lock;
    uint8_t *start;        /* the pool (guest memory): header, then slots */
    uint32_t *lent;        /* guest-shared: per-slot count of frames the guest holds */
    uint8_t *base;         /* the first slot */
    size_t size;           /* bytes from base */
    unsigned int max_slots;
    /* Layout the slots are cut for; relaid only while no slot is in use. */
    int w, h, fmt;
    int bad_w, bad_h, bad_fmt;  /* the last geometry that fit no slot: not tried again */
    /* The libav pixel formats the session emits as decoded, and the ABI format (abi.PixFmt)
       each is reported as: only pictures of these get a slot. */
    int formats[FP_MAX_FORMATS];
    int abi_formats[FP_MAX_FORMATS];
    unsigned int nformats;
    int linesize[4];
    size_t plane_off[4];
    int planes;
    size_t slot_size;
    unsigned int nslots;
    unsigned int in_use;
    unsigned int refs;     /* buffers alive: the pool struct outlives fp_close until 0 */
    int closed;
    uint8_t used[MAX_SLOTS];
    uint64_t hits, misses, relayouts;
};

int fp_setup(uintptr_t dflt, uintptr_t align, uintptr_t linesizes, uintptr_t plane_sizes,
             uintptr_t create, size_t off_get_buffer2, size_t off_opaque, size_t off_buf,
             size_t off_pyframe) {
    av.dflt = (get_buffer2_fn)dflt;
    av.align = (align_fn)align;
    av.linesizes = (linesizes_fn)linesizes;
    av.plane_sizes = (plane_sizes_fn)plane_sizes;
    av.create = (create_fn)create;
    av.off_get_buffer2 = off_get_buffer2;
    av.off_opaque = off_opaque;
    av.off_buf = off_buf;
    av.off_pyframe = off_pyframe;
    return 0;
}

/* A pool of `size` bytes at `pool` (the caller checked size >= ABI_POOL_HEADER + a page). */
fp_pool *fp_pool_new(uintptr_t pool, size_t size, unsigned int max_slots, const int *formats,
                     const int *abi_formats, unsigned int nformats) {
    if (size < ABI_POOL_HEADER) return NULL;
    fp_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->lock, NULL);
    p->start = (uint8_t *)pool;
    p->lent = (uint32_t *)(pool + ABI_POOL_LENT_AT);
    p->nformats = nformats > FP_MAX_FORMATS ? FP_MAX_FORMATS : nformats;
    for (unsigned int i = 0; i < p->nformats; i++) {
        p->formats[i] = formats[i];
        p->abi_formats[i] = abi_formats[i];
    }
    p->bad_fmt = -1;
    uintptr_t first = pool + ABI_POOL_HEADER, b = (first + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1);
    size_t slots = size - ABI_POOL_HEADER;
    p->base = (uint8_t *)b;
    p->size = slots > (b - first) ? slots - (b - first) : 0;
    p->max_slots = max_slots > MAX_SLOTS ? MAX_SLOTS : max_slots;
    p->fmt = -1;
    return p;
}

static void destroy(fp_pool *p) {
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/* Lay the slots out for one geometry, the way avcodec_default_get_buffer2 sizes its own
   pool: dimensions aligned for the codec, linesizes multiples of the stride alignment, every
   plane padded.  Called with the lock held and no slot in use.  0, or -1 if it does not fit. */
static int relayout(fp_pool *p, void *avctx, int w0, int h0, int fmt) {
    int w = w0, h = h0, align[8] = {0}, ls[4];
    size_t sizes[4];
    ptrdiff_t pls[4];
    av.align(avctx, &w, &h, align);
    for (;;) {
        if (av.linesizes(ls, fmt, w) < 0) return -1;
        int unaligned = 0;
        for (int i = 0; i < 4; i++) unaligned |= align[i] ? ls[i] % align[i] : 0;
        if (!unaligned) break;
        w += w & ~(w - 1);
    }
    for (int i = 0; i < 4; i++) pls[i] = ls[i];
    if (av.plane_sizes(sizes, fmt, h, pls) < 0) return -1;
    size_t off = 0;
    int planes = 0;
    for (int i = 0; i < 4; i++) {
        p->linesize[i] = ls[i];
        p->plane_off[i] = off;
        if (sizes[i]) {
            off += (sizes[i] + PAD + ALIGN - 1) & ~(size_t)(ALIGN - 1);
            planes = i + 1;
        }
    }
    p->slot_size = (off + 4095) & ~(size_t)4095;
    size_t n = p->slot_size ? p->size / p->slot_size : 0;
    p->nslots = n > p->max_slots ? p->max_slots : (unsigned int)n;
    p->planes = planes;
    p->w = w0; p->h = h0; p->fmt = fmt;
    p->relayouts++;
    return p->nslots ? 0 : -1;
}

/* Slots the guest still holds keep the layout: relaying would move them under its feet. */
static int any_lent(fp_pool *p) {
    for (unsigned int i = 0; i < p->nslots; i++)
        if (__atomic_load_n(&p->lent[i], __ATOMIC_ACQUIRE)) return 1;
    return 0;
}

/* Runs on whichever thread the buffer's last reference is dropped: a decoder thread, or the
   worker's Python thread when it releases a frame the guest has given back. */
static void slot_free(void *opaque, uint8_t *data) {
    fp_pool *p = opaque;
    pthread_mutex_lock(&p->lock);
    size_t i = (size_t)(data - p->base) / p->slot_size;
    p->used[i] = 0;
    p->in_use--;
    int last = --p->refs == 0 && p->closed;
    pthread_mutex_unlock(&p->lock);
    if (last) destroy(p);
}

/* The ABI format a picture of libav format `fmt` is reported as, or -1 if the session does
   not emit `fmt` as decoded (such pictures get no slot: see fp_get_buffer2).  `formats` is
   fixed at fp_pool_new. */
static int pool_format(const fp_pool *p, int fmt) {
    for (unsigned int k = 0; k < p->nformats; k++)
        if (fmt == p->formats[k]) return p->abi_formats[k];
    return -1;
}

/* The decoder calls this from its frame threads, concurrently: everything shared is under
   the pool lock.  `s` is a thread's copy of the context; libavcodec copies get_buffer2 and
   opaque from the user's context into every copy before each packet. */
static int fp_get_buffer2(void *s, void *frame, int flags) {
    fp_pool *p = C_OPAQUE(s);
    if (!p) return av.dflt(s, frame, flags);
    int w = F_WIDTH(frame), h = F_HEIGHT(frame), fmt = F_FORMAT(frame);
    uint8_t *slot = NULL;
    unsigned int i = 0;
    /* Only the formats the session emits as decoded (the others are converted from libav's
       memory).  10-bit ones included: the guest can write any bytes into a slot it holds, and
       a decoder predicting from a reference with samples above 1023 may index its tables out
       of range, read or write wildly, and crash.  That process is this guest's own worker:
       nothing of another guest is mapped in it, and hostd reaps it like any crashed worker
       (the task fails WORKER_CRASHED, the guest's sessions are lost, its next task gets a new
       worker).  So a guest can only harm its own decode, as it could by sending a corrupt
       bitstream; tests/integration/test_native_format.py holds hostd and a second guest to
       that. */
    int allowed = pool_format(p, fmt) >= 0;
    pthread_mutex_lock(&p->lock);
    if (!p->closed && allowed && w > 0 && h > 0) {
        if ((w != p->w || h != p->h || fmt != p->fmt) && p->in_use == 0 && !any_lent(p)
                && !(w == p->bad_w && h == p->bad_h && fmt == p->bad_fmt)) {
            if (relayout(p, s, w, h, fmt) < 0) {
                p->fmt = -1;
                p->bad_w = w; p->bad_h = h; p->bad_fmt = fmt;
            }
        }
        if (w == p->w && h == p->h && fmt == p->fmt) {
            for (i = 0; i < p->nslots; i++) {
                /* Acquire: pairs with the guest's release decrement, so its reads of the
                   frame are done before the decoder writes the slot again. */
                if (!p->used[i] && __atomic_load_n(&p->lent[i], __ATOMIC_ACQUIRE) == 0) {
                    p->used[i] = 1;
                    p->in_use++;
                    p->refs++;
                    slot = p->base + (size_t)i * p->slot_size;
                    break;
                }
            }
        }
    }
    if (slot) p->hits++; else p->misses++;
    pthread_mutex_unlock(&p->lock);
    if (!slot) return av.dflt(s, frame, flags);
    void *buf = av.create(slot, p->slot_size, slot_free, p, 0);
    if (!buf) {
        slot_free(p, slot);
        return -12; /* AVERROR(ENOMEM) */
    }
    void **bufs = F_BUF(frame);
    bufs[0] = buf;
    for (int k = 1; k < 8; k++) bufs[k] = NULL;
    for (int k = 0; k < 8; k++) {
        F_DATA(frame)[k] = k < p->planes ? slot + p->plane_off[k] : NULL;
        F_LINESIZE(frame)[k] = k < p->planes ? p->linesize[k] : 0;
    }
    F_EXTENDED(frame) = F_DATA(frame);
    return 0;
}

/* Install the pool on a context that is not yet open (or between packets: libavcodec copies
   both fields into its thread contexts before each packet). */
int fp_attach(fp_pool *p, uintptr_t avctx) {
    C_OPAQUE((void *)avctx) = p;
    C_GET_BUFFER2((void *)avctx) = fp_get_buffer2;
    return 0;
}

/* The worker reports a frame whose plane 0 is at `ptr` to the guest: count it as lent
   (before the completion is published) and return its slot, or -1 if `ptr` is not in a slot.
   The decoder's reference keeps the slot in use until then, so the layout cannot change. */
static int fp_lend(fp_pool *p, uintptr_t ptr, uint64_t *slot_addr) {
    int slot = -1;
    pthread_mutex_lock(&p->lock);
    if (p->slot_size && ptr >= (uintptr_t)p->base) {
        size_t i = (ptr - (uintptr_t)p->base) / p->slot_size;
        if (i < p->nslots && p->used[i]) {
            __atomic_fetch_add(&p->lent[i], 1, __ATOMIC_RELEASE);
            *slot_addr = (uint64_t)(uintptr_t)(p->base + i * p->slot_size);
            slot = (int)i;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return slot;
}

/* fp_lend for a decoded picture, read from its AVFrame.  `shape` holds rows and row bytes of
   each of the format's `nplanes` (at most 3) planes.  On success the frame is counted lent
   and out = the slot's offset from the pool's start, then each plane's offset in the slot and
   its line size (3 each, 0 past nplanes); returns the slot.  -1: plane 0 is in no slot
   (libav's own memory: the caller copies the frame); -2: a plane is narrower than its row
   bytes or does not lie inside the slot. */
static int lend_avframe(fp_pool *p, void *f, unsigned int nplanes, const int64_t *shape, int64_t *out) {
    uint64_t slot_addr;
    if (nplanes > 3) return -2;
    int slot = fp_lend(p, (uintptr_t)F_DATA(f)[0], &slot_addr);
    if (slot < 0) return -1;
    out[0] = (int64_t)(slot_addr - (uintptr_t)p->start);
    for (unsigned int k = 0; k < 3; k++) {
        out[1 + k] = out[4 + k] = 0;
        if (k >= nplanes) continue;
        int64_t off = (int64_t)((uintptr_t)F_DATA(f)[k] - slot_addr), line = F_LINESIZE(f)[k];
        int64_t rows = shape[2 * k], row_bytes = shape[2 * k + 1];
        /* The slot size is fixed while the slot is in use (relayout needs none in use). */
        if (line < row_bytes || off < 0 || rows < 1
                || off + (rows - 1) * line + row_bytes > (int64_t)p->slot_size) {
            fp_unlend(p, slot);
            return -2;
        }
        out[1 + k] = off;
        out[4 + k] = line;
    }
    return slot;
}

/* lend_avframe for the AVFrame behind a live PyAV VideoFrame object (the caller checks its
   type; framepool.py checked the pointer's offset against a real frame), so the worker builds
   no PyAV plane objects per frame. */
int fp_lend_frame(fp_pool *p, uintptr_t frame_obj, unsigned int nplanes, const int64_t *shape,
                  int64_t *out) {
    return lend_avframe(p, *(void **)(frame_obj + av.off_pyframe), nplanes, shape, out);
}

/* --- the decode loop: packets in, pooled frames lent, no Python per frame ---------------

   The worker's thread that drives a decoder runs between the codec's frame threads on the
   same cores, so every Python step it takes per packet delays the next packet.  For a
   session with a pool, fp_decode copies each chunk into a fresh padded packet, sends it and
   receives what the decoder returns, and lends every picture that landed in a slot with the
   session's geometry and a pool format, writing its frame-table entry (abi.FrameEntry's
   bytes, laid out by the ABI_FE_* macros).  Anything else stops the loop with the frame left
   in `frame` (FD_HELD): the caller takes it as a PyAV frame (fp_take_frame) and treats it as
   a frame decoded by PyAV, then resumes.  The loop runs without the GIL (cffi releases it),
   so hostd-facing threads of the worker are not held up either. */

typedef void *(*packet_alloc_fn)(void);
typedef int (*new_packet_fn)(void *pkt, int size);
typedef void (*packet_free_fn)(void **pkt);
typedef int (*send_packet_fn)(void *avctx, const void *pkt);
typedef int (*receive_frame_fn)(void *avctx, void *frame);
typedef void (*frame_unref_fn)(void *frame);
typedef void (*frame_move_ref_fn)(void *dst, void *src);

static struct {
    packet_alloc_fn packet_alloc;
    new_packet_fn new_packet;
    packet_free_fn packet_free;
    send_packet_fn send_packet;
    receive_frame_fn receive_frame;
    frame_unref_fn frame_unref;
    frame_move_ref_fn frame_move_ref;
    size_t off_frame_pts;
} dec;

/* AVPacket's leading fields (see the top of the file). */
#define P_PTS(p) (*(int64_t *)((char *)(p) + 8))
#define P_DATA(p) (*(uint8_t **)((char *)(p) + 24))
#define F_PTS(f) (*(int64_t *)((char *)(f) + dec.off_frame_pts))
#define AV_NOPTS INT64_MIN
#define AVERR_EAGAIN (-11)
#define AVERR_EOF (-0x20464F45)  /* FFERRTAG('E','O','F',' ') */

enum { FD_DONE = 0, FD_HELD = 1, FD_FULL = 2, FD_ERROR = 3, FD_NOMEM = 4 };

int fp_setup_decode(uintptr_t packet_alloc, uintptr_t new_packet, uintptr_t packet_free, uintptr_t send_packet,
                    uintptr_t receive_frame, uintptr_t frame_unref, uintptr_t frame_move_ref,
                    size_t off_frame_pts) {
    dec.packet_alloc = (packet_alloc_fn)packet_alloc;
    dec.new_packet = (new_packet_fn)new_packet;
    dec.packet_free = (packet_free_fn)packet_free;
    dec.send_packet = (send_packet_fn)send_packet;
    dec.receive_frame = (receive_frame_fn)receive_frame;
    dec.frame_unref = (frame_unref_fn)frame_unref;
    dec.frame_move_ref = (frame_move_ref_fn)frame_move_ref;
    dec.off_frame_pts = off_frame_pts;
    return 0;
}

/* Store `v` in a little-endian item of `size` bytes (4 or 8: the static asserts above) at `at`. */
static inline void put_item(uint8_t *e, size_t at, size_t size, int64_t v) {
    if (size == 8) {
        memcpy(e + at, &v, 8);
    } else {
        uint32_t u = (uint32_t)v;
        memcpy(e + at, &u, 4);
    }
}
#define PUT(e, item, v) put_item((e), ABI_FE_##item##_AT, ABI_FE_##item##_SIZE, (v))

/* chunks: n x {offset from base, length, pts, pts valid}.  out: room for max_out frame-table
   entries (ABI_FE_SIZE bytes each).  state (in/out): [0] the chunk to send next, or whose
   frames are being received when [1] is 1; [2] (out) entries written; [3] (out) the libav
   error of FD_ERROR, whose chunk is state[0] - 1.  FD_FULL: out holds max_out entries; call
   again.  A picture is lent only if it is width x height and its libav format is reported as
   `fmt` (an abi.PixFmt; `shape` is that geometry's planes); any other stops the loop with
   FD_HELD.  The caller checked every chunk against the region. */
int fp_decode(fp_pool *p, uintptr_t avctx, uintptr_t frame, uintptr_t base, const int64_t *chunks, int n,
              int width, int height, unsigned int nplanes, const int64_t *shape, int64_t fmt,
              uint8_t *out, int max_out, int64_t *state) {
    void *ctx = (void *)avctx, *f = (void *)frame;
    int i = (int)state[0], receiving = (int)state[1], nout = 0, ret = 0, rc = FD_DONE;
    state[3] = 0;
    for (; i < n; i++) {
        if (!receiving) {
            const int64_t *c = chunks + 4 * i;
            void *pkt = dec.packet_alloc();
            if (!pkt) { rc = FD_NOMEM; goto stop; }
            if (dec.new_packet(pkt, (int)c[1]) < 0) {  /* zero-padded, refcounted */
                dec.packet_free(&pkt);
                rc = FD_NOMEM;
                goto stop;
            }
            memcpy(P_DATA(pkt), (const uint8_t *)base + c[0], (size_t)c[1]);
            P_PTS(pkt) = c[3] ? c[2] : AV_NOPTS;
            ret = dec.send_packet(ctx, pkt);
            dec.packet_free(&pkt);
            if (ret < 0) { i++; rc = FD_ERROR; goto stop; }
        }
        receiving = 1;
        for (;;) {
            if (nout >= max_out) { rc = FD_FULL; goto stop; }
            ret = dec.receive_frame(ctx, f);
            if (ret == AVERR_EAGAIN || ret == AVERR_EOF) break;
            if (ret < 0) { i++; receiving = 0; rc = FD_ERROR; goto stop; }
            int64_t lent[7];
            /* Lent here only if the caller's geometry (`shape`, `fmt`) is this picture's. */
            int ok = p && F_WIDTH(f) == width && F_HEIGHT(f) == height && pool_format(p, F_FORMAT(f)) == fmt;
            int slot = ok ? lend_avframe(p, f, nplanes, shape, lent) : -1;
            if (slot < 0) { rc = FD_HELD; goto stop; }  /* the caller takes it from `frame` */
            uint8_t *e = out + (size_t)ABI_FE_SIZE * (size_t)nout++;
            int64_t pts = F_PTS(f);
            PUT(e, OFFSET, lent[0]);
            PUT(e, WIDTH, width);
            PUT(e, HEIGHT, height);
            PUT(e, PIX_FMT, fmt);
            PUT(e, NPLANES, nplanes);
            PUT(e, PTS, pts == AV_NOPTS ? ABI_NO_PTS : pts);
            PUT(e, PLANE_OFFSET0, lent[1]);
            PUT(e, PLANE_OFFSET1, lent[2]);
            PUT(e, PLANE_OFFSET2, lent[3]);
            PUT(e, STRIDE0, lent[4]);
            PUT(e, STRIDE1, lent[5]);
            PUT(e, STRIDE2, lent[6]);
            PUT(e, FLAGS, ABI_FRAME_POOLED);
            PUT(e, SLOT, slot);
            dec.frame_unref(f);  /* the slot stays the guest's: its lent counter is up */
        }
        receiving = 0;
    }
stop:
    state[0] = i; state[1] = receiving; state[2] = nout; state[3] = ret;
    return rc;
}

/* Move the frame fp_decode held into a PyAV VideoFrame made for its geometry and format. */
void fp_take_frame(uintptr_t frame, uintptr_t frame_obj) {
    void *dst = *(void **)(frame_obj + av.off_pyframe);
    dec.frame_unref(dst);
    dec.frame_move_ref(dst, (void *)frame);
}

/* Undo an fp_lend whose frame never reached the guest (its task failed after all). */
void fp_unlend(fp_pool *p, int slot) {
    pthread_mutex_lock(&p->lock);
    if (slot >= 0 && (unsigned int)slot < p->nslots)
        __atomic_fetch_sub(&p->lent[slot], 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
}

/* The pool's owner lets go.  Slots still referenced (decoder references, frames not yet
   released) keep the struct alive; fp_get_buffer2 hands out no more slots. */
void fp_close(fp_pool *p) {
    pthread_mutex_lock(&p->lock);
    p->closed = 1;
    int last = p->refs == 0;
    pthread_mutex_unlock(&p->lock);
    if (last) destroy(p);
}

/* libav's log, kept instead of printed (PyAV's default callback drops every line): the last
   error-level message logged on each thread, so the thread that ran a failed libav call can say
   why it failed (x264 "width not divisible by 2" behind "Generic error in an external
   library").  The callback runs on any libav thread and takes no lock: each thread writes only
   its own buffer, and no GIL is involved (PyAV's Python callback can deadlock frame threads). */
#define AV_LOG_ERROR_LEVEL 16
#define LOG_MAX 512
static __thread char log_text[LOG_MAX];
static __thread int log_len;
static __thread int log_open;  /* the last piece had no newline: the next one continues it */

typedef struct { const char *class_name; const char *(*item_name)(void *ctx); } class_head;
typedef void (*log_cb)(void *avcl, int level, const char *fmt, va_list vl);
typedef void (*log_set_fn)(log_cb cb);

static void fp_log_cb(void *avcl, int level, const char *fmt, va_list vl) {
    if (level > AV_LOG_ERROR_LEVEL || !fmt) return;
    if (!log_open) {
        log_len = 0;
        const class_head *cls = avcl ? *(const class_head **)avcl : NULL;
        const char *name = cls && cls->item_name ? cls->item_name(avcl) : NULL;
        if (name) {
            int n = snprintf(log_text, LOG_MAX, "[%s] ", name);
            log_len = n < 0 ? 0 : n >= LOG_MAX ? LOG_MAX - 1 : n;
        }
    }
    if (log_len < LOG_MAX - 1) {
        int n = vsnprintf(log_text + log_len, (size_t)(LOG_MAX - log_len), fmt, vl);
        if (n > 0) log_len = log_len + n >= LOG_MAX ? LOG_MAX - 1 : log_len + n;
    }
    log_open = log_len > 0 && log_text[log_len - 1] != '\n';
}

int fp_log_install(uintptr_t set_callback) {
    ((log_set_fn)set_callback)(fp_log_cb);
    return 0;
}

/* Copy this thread's last error line (without its newline) to out and forget it; returns
   its length (0: none since the last take). */
int fp_log_take(char *out, int size) {
    int n = log_len;
    while (n > 0 && (log_text[n - 1] == '\n' || log_text[n - 1] == ' ')) n--;
    if (n > size) n = size;
    if (n > 0) memcpy(out, log_text, (size_t)n);
    log_len = 0;
    log_open = 0;
    return n;
}

/* out: slots, in_use, slot_size, hits, misses, relayouts */
void fp_stats(fp_pool *p, uint64_t *out) {
    pthread_mutex_lock(&p->lock);
    out[0] = p->nslots; out[1] = p->in_use; out[2] = p->slot_size;
    out[3] = p->hits; out[4] = p->misses; out[5] = p->relayouts;
    pthread_mutex_unlock(&p->lock);
}
