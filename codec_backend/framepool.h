/* The decoder frame pool's C (framepool.c): its prototypes, which are also its cffi cdef
 * (codec_backend/_framepool_build.py reads the lines between the markers).  Keep that block
 * free of preprocessor lines.  Addresses cross as uintptr_t: Python passes libav's function
 * and object addresses it found at run time (codec_backend/framepool.py).
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
typedef struct fp_pool fp_pool;
uint32_t fp_abi_layout(void);
int fp_setup(uintptr_t default_get_buffer2, uintptr_t align_dimensions2, uintptr_t fill_linesizes,
             uintptr_t fill_plane_sizes, uintptr_t buffer_create, size_t off_get_buffer2,
             size_t off_opaque, size_t off_buf, size_t off_pyframe);
fp_pool *fp_pool_new(uintptr_t pool, size_t size, unsigned int max_slots, const int *formats,
                     const int *abi_formats, unsigned int nformats);
int fp_lend_frame(fp_pool *pool, uintptr_t frame_obj, unsigned int nplanes, const int64_t *shape,
                  int64_t *out);
void fp_unlend(fp_pool *pool, int slot);
int fp_attach(fp_pool *pool, uintptr_t avctx);
void fp_close(fp_pool *pool);
void fp_stats(fp_pool *pool, uint64_t *out);
int fp_setup_decode(uintptr_t packet_alloc, uintptr_t new_packet, uintptr_t packet_free, uintptr_t send_packet,
                    uintptr_t receive_frame, uintptr_t frame_unref, uintptr_t frame_move_ref,
                    size_t off_frame_pts);
int fp_decode(fp_pool *pool, uintptr_t avctx, uintptr_t frame, uintptr_t base, const int64_t *chunks, int n,
              int width, int height, unsigned int nplanes, const int64_t *shape, int64_t fmt,
              uint8_t *out, int max_out, int64_t *state);
void fp_take_frame(uintptr_t frame, uintptr_t frame_obj);
int fp_log_install(uintptr_t av_log_set_callback);
int fp_log_take(char *out, int size);
/* cdef-end */
