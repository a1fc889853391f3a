/*
 * fuzz_image.c: libFuzzer driver for the image preprocessing a worker runs on untrusted
 * bytes (keel__image_batch, src/workers/image.h): libturbojpeg and libspng behind keel's
 * limits, the base64 path, the resize and the normalisation.
 *
 * DESIGN
 * Each input is one BYTES element (the driver adds the length prefix) decoded to a 16x16
 * RGB NCHW tensor, with small limits (1,000,000 pixels, 1 MiB per file) so that libFuzzer's
 * memory limit is never what stops a run. The contract: KEEL_OK, or KEEL_EINVAL/KEEL_ENOMEM
 * with a NUL-terminated message starting with "image 0: "; never a crash, leak or undefined
 * behaviour (AddressSanitizer, UndefinedBehaviorSanitizer, LeakSanitizer). On KEEL_OK every
 * value is finite (pixels are 0..255, the normalisation divides by std = 0.25).
 * Build and run: fuzz/README.md.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "workers/image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    keel__image_spec s;
    static float out[3 * 16 * 16];
    uint8_t *in;
    uint32_t l = (uint32_t)size;
    char msg[512];
    keel_err err;

    if (size > (1u << 20))
        return 0;
    memset(&s, 0, sizeof(s));
    s.color = KEEL__IMG_RGB;
    s.layout = KEEL__IMG_NCHW;
    s.width = s.height = 16;
    s.scale = 1.0f / 255.0f;
    s.mean[0] = s.mean[1] = s.mean[2] = 0.5f;
    s.std[0] = s.std[1] = s.std[2] = 0.25f;
    s.max_pixels = 1000000;
    s.max_file_bytes = 1u << 20;
    if ((in = malloc(size + 4)) == NULL)
        return 0;
    memcpy(in, &l, 4);
    memcpy(in + 4, data, size);
    msg[0] = '\0';
    err = keel__image_batch(&s, in, size + 4, 1, out, msg, sizeof(msg));
    free(in);
    if (err == KEEL_OK) {
        for (size_t i = 0; i < sizeof(out) / sizeof(out[0]); i++) {
            if (!isfinite(out[i])) {
                fprintf(stderr, "fuzz_image: value %zu is not finite\n", i);
                abort();
            }
        }
    } else if ((err != KEEL_EINVAL && err != KEEL_ENOMEM) ||
               memchr(msg, '\0', sizeof(msg)) == NULL || strncmp(msg, "image 0: ", 9) != 0) {
        fprintf(stderr, "fuzz_image: contract broken: %d %.200s\n", (int)err, msg);
        abort();
    }
    return 0;
}
