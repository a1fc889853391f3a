/*
 * image.h: image preprocessing: decode (JPEG, PNG), convert (RGB, gray), resize (bilinear),
 * normalise and lay out as an FP32 tensor.
 *
 * DESIGN
 * Pure functions over caller-owned buffers: no globals, no locks, no threads. They run inside
 * a preprocessing worker process (worker.c) on untrusted bytes, and in process in the unit
 * tests. Every limit (file size, pixel count) is checked before anything of that size is
 * allocated; malformed input is an error with a message, never an abort.
 */
#ifndef KEEL_WORKERS_IMAGE_H
#define KEEL_WORKERS_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "keel/keel.h"

typedef enum keel__img_format {
    KEEL__IMG_AUTO = 0, /* by signature: JPEG (FF D8 FF) or PNG (89 'PNG') */
    KEEL__IMG_JPEG,
    KEEL__IMG_PNG,
} keel__img_format;

typedef enum keel__img_color { KEEL__IMG_RGB = 0, KEEL__IMG_GRAY } keel__img_color;
typedef enum keel__img_layout { KEEL__IMG_NCHW = 0, KEEL__IMG_NHWC } keel__img_layout;

/* A plain value (it crosses the process boundary by copy). */
typedef struct keel__image_spec {
    uint32_t format; /* keel__img_format */
    uint32_t color;  /* keel__img_color */
    uint32_t layout; /* keel__img_layout */
    uint32_t width;  /* output size, > 0 */
    uint32_t height;
    float scale; /* value = (pixel * scale - mean[c]) / std[c] */
    float mean[3];
    float std[3];
    uint64_t max_pixels;     /* decoded width * height, checked from the header */
    uint64_t max_file_bytes; /* one encoded image */
} keel__image_spec;

/* The parameters of an image task (KEEL__PREP_TASK_IMAGE): the spec and the image count. */
typedef struct keel__image_task {
    keel__image_spec spec;
    uint32_t count;
} keel__image_task;

#define KEEL__IMAGE_DEFAULT_MAX_PIXELS (25u * 1000u * 1000u)
#define KEEL__IMAGE_DEFAULT_MAX_FILE_BYTES (16u * 1024u * 1024u)

static inline uint32_t keel__image_channels(const keel__image_spec *s)
{
    return s->color == KEEL__IMG_GRAY ? 1u : 3u;
}

/* Floats in one image's tensor: channels * width * height. */
static inline size_t keel__image_tensor_elems(const keel__image_spec *s)
{
    return (size_t)keel__image_channels(s) * s->width * s->height;
}

/*
 * Decodes one encoded image to 8-bit interleaved pixels, 3 (RGB) or 1 (gray) channels per
 * s->color. JPEG: libturbojpeg with default flags (islow IDCT, fancy upsampling: what
 * `djpeg` does by default); gray from a colour JPEG is its Y channel. PNG: libspng, 16-bit
 * samples scaled to 8, alpha dropped (not composited), no gamma correction; gray from colour
 * is round((299 R + 587 G + 114 B) / 1000). A JPEG's or PNG's warnings (a truncated file) are
 * errors. On KEEL_OK *pix (malloc'd, caller frees), *w and *h are set; otherwise errbuf says
 * what is wrong with the image and the return is KEEL_EINVAL (or KEEL_ENOMEM).
 */
keel_err keel__image_decode(const keel__image_spec *s, const uint8_t *data, size_t len,
                            uint8_t **pix, uint32_t *w, uint32_t *h, char *errbuf, size_t errlen);

/*
 * Resizes pix (w x h, keel__image_channels(s) interleaved channels) to s->width x s->height
 * with bilinear interpolation on half-pixel centres (the convention of OpenCV's INTER_LINEAR:
 * source x = (dst x + 0.5) * w / width - 0.5, clamped to the edges), then writes
 * (value * scale - mean[c]) / std[c] into out (keel__image_tensor_elems(s) floats) in
 * s->layout order (CHW or HWC). A same-size "resize" copies the pixels exactly.
 */
void keel__image_to_tensor(const keel__image_spec *s, const uint8_t *pix, uint32_t w, uint32_t h,
                           float *out);

/*
 * The worker's task: in holds n BYTES elements (u32 little-endian length + bytes); each is an
 * encoded image, or the base64 text of one (how JSON clients send bytes). Writes n tensors
 * to out (n * keel__image_tensor_elems(s) floats). Errors name the element index.
 */
keel_err keel__image_batch(const keel__image_spec *s, const uint8_t *in, size_t len, uint32_t n,
                           float *out, char *errbuf, size_t errlen);

#endif
