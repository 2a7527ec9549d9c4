// C side of nolad's image decoding: libjpeg and libpng report errors by longjmp, which Swift cannot
// survive, so every call into them happens here behind setjmp and comes back as a status code + message.
#ifndef NOLAD_IMAGE_SUPPORT_H
#define NOLAD_IMAGE_SUPPORT_H

#include <stddef.h>
#include <stdint.h>

#include "cpu_features.h"  // the start-up CPU check shares this baseline-compiled target

typedef enum {
    NOLAD_IMG_OK = 0,
    NOLAD_IMG_TRUNCATED = 1,   // data ended before the image did
    NOLAD_IMG_CORRUPT = 2,     // the codec rejected the data
    NOLAD_IMG_TOO_LARGE = 3,   // width*height above the caller's pixel limit
    NOLAD_IMG_NO_MEMORY = 4,
} nolad_img_status;

typedef struct {
    int width;            // output size (after the DCT scale for JPEG)
    int height;
    int source_width;     // size stored in the file
    int source_height;
    int orientation;      // EXIF orientation 1...8, 0 when absent
    char message[200];    // codec's message on failure
} nolad_img_info;

/// Decodes a whole JPEG to 8-bit RGB as Pillow's open(...).convert("RGB") does (ISLOW IDCT, fancy
/// upsampling; grayscale replicated; CMYK/YCCK inverted as Adobe writes them, then Pillow's cmyk2rgb).
/// Two calls: with out == NULL it reads the header only (fills info, checks the pixel limit); then with
/// out pointing at width*height*3 bytes it decodes. scale_denom 1, 2, 4 or 8 selects a reduced DCT scale.
nolad_img_status nolad_jpeg_decode(const uint8_t *data, size_t size, int scale_denom, uint64_t max_pixels,
                                   uint8_t *out, nolad_img_info *info);

/// Decodes a whole PNG to 8-bit RGB as Pillow's convert("RGB") does (palette looked up, alpha and tRNS
/// dropped, 16-bit RGB/alpha channels keep their high byte, 16-bit gray clipped to 255, 1/2/4-bit gray
/// scaled to 0...255). Same two-call protocol as nolad_jpeg_decode.
nolad_img_status nolad_png_decode(const uint8_t *data, size_t size, uint64_t max_pixels, uint8_t *out,
                                  nolad_img_info *info);

#endif
