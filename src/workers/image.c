/*
 * image.c: decode, convert, resize, normalise (see image.h).
 *
 * DESIGN
 * Runs in preprocessing worker processes on untrusted bytes, so every size is checked before
 * it is used: the file size first, then the pixel count read from the header, before any
 * pixel buffer is allocated. libspng gets its own image and chunk limits as well (a PNG's
 * ancillary chunks can be decompression bombs of their own). Nothing here keeps state between
 * calls; the decoder handles live for one image.
 */
#include <limits.h>
#include <math.h>
#include <spng.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>

#include "core/core.h"
#include "workers/image.h"

/* The largest ancillary chunk libspng may read, and all of them together: real images keep
 * ICC profiles and text well below this. */
#define PNG_CHUNK_LIMIT (4u * 1024u * 1024u)
#define PNG_CACHE_LIMIT (16u * 1024u * 1024u)

static keel_err pixels_ok(const keel__image_spec *s, const char *what, uint32_t w, uint32_t h,
                          char *errbuf, size_t errlen)
{
    uint64_t px = (uint64_t)w * h;

    if (w == 0 || h == 0) {
        keel__errf(errbuf, errlen, "%s header declares an empty image (%ux%u)", what, w, h);
        return KEEL_EINVAL;
    }
    if (px > s->max_pixels) {
        keel__errf(errbuf, errlen,
                   "%s is %ux%u = %llu pixels, more than the limit of %llu pixels "
                   "(refused before decoding)",
                   what, w, h, (unsigned long long)px, (unsigned long long)s->max_pixels);
        return KEEL_EINVAL;
    }
    return KEEL_OK;
}

static keel_err decode_jpeg(const keel__image_spec *s, const uint8_t *data, size_t len,
                            uint8_t **pix, uint32_t *w, uint32_t *h, char *errbuf, size_t errlen)
{
    tjhandle tj = NULL;
    int iw = 0, ih = 0, sub = 0, cs = 0;
    int pf = s->color == KEEL__IMG_GRAY ? TJPF_GRAY : TJPF_RGB;
    uint8_t *buf = NULL;
    keel_err err;

    if (len > (size_t)ULONG_MAX) {
        keel__errf(errbuf, errlen, "JPEG too large");
        return KEEL_EINVAL;
    }
    if ((tj = tjInitDecompress()) == NULL) {
        keel__errf(errbuf, errlen, "cannot create a JPEG decoder");
        return KEEL_ENOMEM;
    }
    if (tjDecompressHeader3(tj, data, (unsigned long)len, &iw, &ih, &sub, &cs) != 0) {
        keel__errf(errbuf, errlen, "invalid JPEG header: %s", tjGetErrorStr2(tj));
        err = KEEL_EINVAL;
        goto done;
    }
    if ((err = pixels_ok(s, "JPEG", (uint32_t)iw, (uint32_t)ih, errbuf, errlen)) != KEEL_OK)
        goto done;
    if ((buf = keel__malloc((size_t)iw * (size_t)ih * (size_t)tjPixelSize[pf])) == NULL) {
        keel__errf(errbuf, errlen, "out of memory for a %dx%d JPEG", iw, ih);
        err = KEEL_ENOMEM;
        goto done;
    }
    /* Flags 0: the accurate integer IDCT and fancy upsampling, as djpeg by default. A warning
     * (e.g. "Premature end of JPEG file") stops decoding: a truncated image is an error. */
    if (tjDecompress2(tj, data, (unsigned long)len, buf, iw, 0, ih, pf, TJFLAG_STOPONWARNING) !=
        0) {
        keel__errf(errbuf, errlen, "invalid JPEG data: %s", tjGetErrorStr2(tj));
        err = KEEL_EINVAL;
        goto done;
    }
    *pix = buf;
    buf = NULL;
    *w = (uint32_t)iw;
    *h = (uint32_t)ih;
    err = KEEL_OK;
done:
    free(buf);
    tjDestroy(tj);
    return err;
}

static keel_err decode_png(const keel__image_spec *s, const uint8_t *data, size_t len,
                           uint8_t **pix, uint32_t *w, uint32_t *h, char *errbuf, size_t errlen)
{
    spng_ctx *ctx = NULL;
    struct spng_ihdr ihdr;
    uint8_t *rgb = NULL, *out = NULL;
    size_t rgb_len = 0;
    uint32_t lim;
    int rc;
    keel_err err;

    if ((ctx = spng_ctx_new(0)) == NULL) {
        keel__errf(errbuf, errlen, "cannot create a PNG decoder");
        return KEEL_ENOMEM;
    }
    /* libspng's own limits on width and height (it refuses larger headers itself); the
     * pixel count is checked below. */
    lim = s->max_pixels > 0x7fffffffu ? 0x7fffffffu : (uint32_t)s->max_pixels;
    if ((rc = spng_set_image_limits(ctx, lim, lim)) != 0 ||
        (rc = spng_set_chunk_limits(ctx, PNG_CHUNK_LIMIT, PNG_CACHE_LIMIT)) != 0 ||
        (rc = spng_set_png_buffer(ctx, data, len)) != 0) {
        keel__errf(errbuf, errlen, "PNG decoder setup: %s", spng_strerror(rc));
        err = KEEL_EINVAL;
        goto done;
    }
    if ((rc = spng_get_ihdr(ctx, &ihdr)) != 0) {
        keel__errf(errbuf, errlen, "invalid PNG header: %s", spng_strerror(rc));
        err = KEEL_EINVAL;
        goto done;
    }
    if ((err = pixels_ok(s, "PNG", ihdr.width, ihdr.height, errbuf, errlen)) != KEEL_OK)
        goto done;
    if ((rc = spng_decoded_image_size(ctx, SPNG_FMT_RGB8, &rgb_len)) != 0) {
        keel__errf(errbuf, errlen, "invalid PNG: %s", spng_strerror(rc));
        err = KEEL_EINVAL;
        goto done;
    }
    if ((rgb = keel__malloc(rgb_len)) == NULL) {
        keel__errf(errbuf, errlen, "out of memory for a %ux%u PNG", ihdr.width, ihdr.height);
        err = KEEL_ENOMEM;
        goto done;
    }
    if ((rc = spng_decode_image(ctx, rgb, rgb_len, SPNG_FMT_RGB8, 0)) != 0) {
        keel__errf(errbuf, errlen, "invalid PNG data: %s", spng_strerror(rc));
        err = KEEL_EINVAL;
        goto done;
    }
    if (s->color == KEEL__IMG_GRAY) {
        size_t npx = (size_t)ihdr.width * ihdr.height;
        if ((out = keel__malloc(npx)) == NULL) {
            err = KEEL_ENOMEM;
            goto done;
        }
        for (size_t i = 0; i < npx; i++) {
            const uint8_t *p = rgb + 3 * i;
            out[i] = (uint8_t)((299u * p[0] + 587u * p[1] + 114u * p[2] + 500u) / 1000u);
        }
        free(rgb);
        rgb = NULL;
    } else {
        out = rgb;
        rgb = NULL;
    }
    *pix = out;
    *w = ihdr.width;
    *h = ihdr.height;
    err = KEEL_OK;
done:
    free(rgb);
    spng_ctx_free(ctx);
    return err;
}

static const uint8_t PNG_SIG[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

static keel__img_format sniff(const uint8_t *d, size_t len)
{
    if (len >= 3 && d[0] == 0xff && d[1] == 0xd8 && d[2] == 0xff)
        return KEEL__IMG_JPEG;
    if (len >= 8 && memcmp(d, PNG_SIG, 8) == 0)
        return KEEL__IMG_PNG;
    return KEEL__IMG_AUTO;
}

keel_err keel__image_decode(const keel__image_spec *s, const uint8_t *data, size_t len,
                            uint8_t **pix, uint32_t *w, uint32_t *h, char *errbuf, size_t errlen)
{
    keel__img_format f = sniff(data, len);

    *pix = NULL;
    *w = *h = 0;
    if (len == 0) {
        keel__errf(errbuf, errlen, "empty image");
        return KEEL_EINVAL;
    }
    if (len > s->max_file_bytes) {
        keel__errf(errbuf, errlen, "image of %zu bytes is larger than the limit of %llu bytes", len,
                   (unsigned long long)s->max_file_bytes);
        return KEEL_EINVAL;
    }
    if (f == KEEL__IMG_AUTO) {
        keel__errf(errbuf, errlen,
                   "not a JPEG or PNG image (the first bytes are no JPEG or PNG signature)");
        return KEEL_EINVAL;
    }
    if (s->format != KEEL__IMG_AUTO && s->format != (uint32_t)f) {
        keel__errf(errbuf, errlen, "a %s image, but the model accepts only %s",
                   f == KEEL__IMG_JPEG ? "JPEG" : "PNG",
                   s->format == KEEL__IMG_JPEG ? "JPEG" : "PNG");
        return KEEL_EINVAL;
    }
    if (f == KEEL__IMG_JPEG)
        return decode_jpeg(s, data, len, pix, w, h, errbuf, errlen);
    return decode_png(s, data, len, pix, w, h, errbuf, errlen);
}

/* One source coordinate of a bilinear resize: index of the left/top neighbour, its right/
 * bottom neighbour and the weight of the latter (half-pixel centres, clamped). */
static void bilinear_coord(uint32_t d, uint32_t src, uint32_t dst, uint32_t *i0, uint32_t *i1,
                           double *a)
{
    double f = ((double)d + 0.5) * (double)src / (double)dst - 0.5;
    double fl;

    if (f < 0)
        f = 0;
    fl = floor(f);
    *i0 = (uint32_t)fl;
    *a = f - fl;
    if (*i0 >= src - 1) {
        *i0 = src - 1;
        *a = 0;
    }
    *i1 = *i0 + 1 < src ? *i0 + 1 : *i0;
}

void keel__image_to_tensor(const keel__image_spec *s, const uint8_t *pix, uint32_t w, uint32_t h,
                           float *out)
{
    uint32_t C = keel__image_channels(s), W = s->width, H = s->height;
    bool same = w == W && h == H;

    for (uint32_t y = 0; y < H; y++) {
        uint32_t y0 = y, y1 = y;
        double ay = 0;
        if (!same)
            bilinear_coord(y, h, H, &y0, &y1, &ay);
        for (uint32_t x = 0; x < W; x++) {
            uint32_t x0 = x, x1 = x;
            double ax = 0;
            if (!same)
                bilinear_coord(x, w, W, &x0, &x1, &ax);
            for (uint32_t c = 0; c < C; c++) {
                double p00 = pix[((size_t)y0 * w + x0) * C + c];
                double p01 = pix[((size_t)y0 * w + x1) * C + c];
                double p10 = pix[((size_t)y1 * w + x0) * C + c];
                double p11 = pix[((size_t)y1 * w + x1) * C + c];
                double v = same ? p00
                                : (1 - ay) * ((1 - ax) * p00 + ax * p01) +
                                      ay * ((1 - ax) * p10 + ax * p11);
                float f = ((float)v * s->scale - s->mean[c]) / s->std[c];
                size_t o = s->layout == KEEL__IMG_NHWC ? ((size_t)y * W + x) * C + c
                                                       : ((size_t)c * H + y) * W + x;
                out[o] = f;
            }
        }
    }
}

static int b64_value(uint8_t c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+' || c == '-')
        return 62;
    if (c == '/' || c == '_')
        return 63;
    return -1;
}

/* Decodes base64 (standard or URL alphabet, '=' padding optional) into a malloc'd buffer;
 * false if s is not base64. */
static bool b64_decode(const uint8_t *s, size_t len, uint8_t **out, size_t *outlen)
{
    uint8_t *o;
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0;

    while (len > 0 && s[len - 1] == '=')
        len--;
    if (len % 4 == 1 || (o = keel__malloc(len / 4 * 3 + 3)) == NULL)
        return false;
    for (size_t i = 0; i < len; i++) {
        int v = b64_value(s[i]);
        if (v < 0) {
            free(o);
            return false;
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            o[n++] = (uint8_t)(acc >> bits);
        }
    }
    *out = o;
    *outlen = n;
    return true;
}

keel_err keel__image_batch(const keel__image_spec *s, const uint8_t *in, size_t len, uint32_t n,
                           float *out, char *errbuf, size_t errlen)
{
    size_t off = 0, per = keel__image_tensor_elems(s);
    char msg[384];

    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *img;
        uint8_t *decoded = NULL, *pix = NULL;
        size_t ilen;
        uint32_t l, w, h;
        keel_err err;

        if (len - off < 4) {
            keel__errf(errbuf, errlen, "image %u: missing (the input holds fewer images)", i);
            return KEEL_EINVAL;
        }
        memcpy(&l, in + off, 4); /* little-endian hosts only, like the rest of keel */
        off += 4;
        if (len - off < l) {
            keel__errf(errbuf, errlen, "image %u: its length runs past the input", i);
            return KEEL_EINVAL;
        }
        img = in + off;
        ilen = l;
        off += l;
        if (ilen > 0 && sniff(img, ilen) == KEEL__IMG_AUTO &&
            b64_decode(img, ilen, &decoded, &ilen))
            img = decoded;
        msg[0] = '\0';
        err = keel__image_decode(s, img, ilen, &pix, &w, &h, msg, sizeof(msg));
        free(decoded);
        if (err != KEEL_OK) {
            keel__errf(errbuf, errlen, "image %u: %s", i, msg);
            return err;
        }
        keel__image_to_tensor(s, pix, w, h, out + (size_t)i * per);
        free(pix);
    }
    return KEEL_OK;
}
