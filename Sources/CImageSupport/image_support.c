// libjpeg / libpng behind setjmp: see include/image_support.h.
#include "image_support.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

// ---------------------------------------------------------------------------------------------------
// EXIF orientation (TIFF IFD0 tag 0x0112) from an "Exif\0\0" payload.

static unsigned read16(const uint8_t *p, int big) { return big ? (p[0] << 8 | p[1]) : (p[1] << 8 | p[0]); }
static uint32_t read32(const uint8_t *p, int big) {
    return big ? ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3])
               : ((uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]);
}

// tiff: bytes starting at the TIFF header ("II*\0" or "MM\0*").
static int exif_orientation(const uint8_t *tiff, size_t size) {
    if (size < 8) return 0;
    int big;
    if (tiff[0] == 'I' && tiff[1] == 'I') big = 0;
    else if (tiff[0] == 'M' && tiff[1] == 'M') big = 1;
    else return 0;
    uint32_t ifd = read32(tiff + 4, big);
    if (ifd > size - 2 || ifd < 8) return 0;
    unsigned count = read16(tiff + ifd, big);
    for (unsigned i = 0; i < count; i++) {
        size_t entry = (size_t)ifd + 2 + (size_t)i * 12;
        if (entry + 12 > size) return 0;
        if (read16(tiff + entry, big) == 0x0112) {
            unsigned type = read16(tiff + entry + 2, big);
            unsigned value = type == 3 ? read16(tiff + entry + 8, big) : type == 4 ? read32(tiff + entry + 8, big) : 0;
            return value >= 1 && value <= 8 ? (int)value : 0;
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// JPEG

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
    char *message;
} jpeg_failure;

static void jpeg_on_error(j_common_ptr cinfo) {
    jpeg_failure *f = (jpeg_failure *)cinfo->err;
    char buffer[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buffer);
    snprintf(f->message, 200, "%s", buffer);
    longjmp(f->jump, 1);
}

// Warnings are ignored as Pillow ignores them, except the end of the data: Pillow reports a truncated file.
static void jpeg_on_message(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        jpeg_failure *f = (jpeg_failure *)cinfo->err;
        f->truncated = 1;
        snprintf(f->message, 200, "premature end of JPEG data");
        longjmp(f->jump, 1);
    }
}

nolad_img_status nolad_jpeg_decode(const uint8_t *data, size_t size, int scale_denom, uint64_t max_pixels,
                                   uint8_t *out, nolad_img_info *info) {
    memset(info, 0, sizeof(*info));
    struct jpeg_decompress_struct *cinfo = calloc(1, sizeof(struct jpeg_decompress_struct));
    jpeg_failure *failure = calloc(1, sizeof(jpeg_failure));
    // volatile: read after longjmp.
    JSAMPLE *volatile cmyk_row = NULL;
    if (!cinfo || !failure) {
        free(cinfo);
        free(failure);
        return NOLAD_IMG_NO_MEMORY;
    }
    volatile nolad_img_status status = NOLAD_IMG_OK;
    cinfo->err = jpeg_std_error(&failure->pub);
    failure->pub.error_exit = jpeg_on_error;
    failure->pub.emit_message = jpeg_on_message;
    failure->message = info->message;
    volatile int created = 0;
    if (setjmp(failure->jump)) {
        status = failure->truncated ? NOLAD_IMG_TRUNCATED : NOLAD_IMG_CORRUPT;
        goto done;
    }
    jpeg_CreateDecompress(cinfo, JPEG_LIB_VERSION, sizeof(struct jpeg_decompress_struct));
    created = 1;
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_save_markers(cinfo, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(cinfo, TRUE);
    info->source_width = (int)cinfo->image_width;
    info->source_height = (int)cinfo->image_height;
    for (jpeg_saved_marker_ptr m = cinfo->marker_list; m; m = m->next) {
        if (m->marker == JPEG_APP0 + 1 && m->data_length > 6 && memcmp(m->data, "Exif\0\0", 6) == 0) {
            info->orientation = exif_orientation(m->data + 6, m->data_length - 6);
            break;
        }
    }
    if ((uint64_t)cinfo->image_width * (uint64_t)cinfo->image_height > max_pixels) {
        status = NOLAD_IMG_TOO_LARGE;
        goto done;
    }
    int cmyk = cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK;
    cinfo->out_color_space = cmyk ? JCS_CMYK : JCS_RGB;  // libjpeg-turbo replicates grayscale into RGB
    cinfo->dct_method = JDCT_ISLOW;
    cinfo->do_fancy_upsampling = TRUE;
    if (scale_denom > 1) {
        cinfo->scale_num = 1;
        cinfo->scale_denom = (unsigned)scale_denom;
    }
    jpeg_calc_output_dimensions(cinfo);
    info->width = (int)cinfo->output_width;
    info->height = (int)cinfo->output_height;
    if (out == NULL) goto done;

    jpeg_start_decompress(cinfo);
    size_t stride = (size_t)cinfo->output_width * 3;
    if (cmyk) {
        cmyk_row = malloc((size_t)cinfo->output_width * 4);
        if (!cmyk_row) {
            status = NOLAD_IMG_NO_MEMORY;
            goto done;
        }
    }
    while (cinfo->output_scanline < cinfo->output_height) {
        uint8_t *row = out + (size_t)cinfo->output_scanline * stride;
        if (!cmyk) {
            JSAMPROW rows[1] = {row};
            jpeg_read_scanlines(cinfo, rows, 1);
            continue;
        }
        JSAMPROW rows[1] = {cmyk_row};
        jpeg_read_scanlines(cinfo, rows, 1);
        // Pillow reads CMYK JPEGs as "CMYK;I" (Adobe's inverted storage), then cmyk2rgb:
        // out = clip(nk - nk*c/255) with nk = 255 - k and Pillow's rounded division by 255.
        for (size_t x = 0; x < cinfo->output_width; x++) {
            int c[4];
            for (int b = 0; b < 4; b++) c[b] = 255 - cmyk_row[x * 4 + b];
            int nk = 255 - c[3];
            for (int b = 0; b < 3; b++) {
                int t = c[b] * nk + 128;
                int v = nk - (((t >> 8) + t) >> 8);
                row[x * 3 + b] = (uint8_t)(v <= 0 ? 0 : v < 256 ? v : 255);
            }
        }
    }
    jpeg_finish_decompress(cinfo);
done:
    if (created) jpeg_destroy_decompress(cinfo);
    free(cmyk_row);
    free(cinfo);
    free(failure);
    return status;
}

// ---------------------------------------------------------------------------------------------------
// PNG

typedef struct {
    const uint8_t *data;
    size_t size;
    size_t offset;
    int truncated;
    char *message;
} png_source;

static void png_on_error(png_structp png, png_const_charp message) {
    png_source *src = (png_source *)png_get_error_ptr(png);
    snprintf(src->message, 200, "%s", message);
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp message) {
    (void)png;
    (void)message;
}

static void png_read_memory(png_structp png, png_bytep out, png_size_t length) {
    png_source *src = (png_source *)png_get_io_ptr(png);
    if (src->size - src->offset < length) {
        src->truncated = 1;
        png_error(png, "unexpected end of PNG data");
    }
    memcpy(out, src->data + src->offset, length);
    src->offset += length;
}

nolad_img_status nolad_png_decode(const uint8_t *data, size_t size, uint64_t max_pixels, uint8_t *out,
                                  nolad_img_info *info) {
    memset(info, 0, sizeof(*info));
    png_source src = {data, size, 0, 0, info->message};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, png_on_error, png_on_warning);
    if (!png) return NOLAD_IMG_NO_MEMORY;
    png_infop pinfo = png_create_info_struct(png);
    if (!pinfo) {
        png_destroy_read_struct(&png, NULL, NULL);
        return NOLAD_IMG_NO_MEMORY;
    }
    // volatile: read after longjmp.
    uint8_t *volatile raw = NULL;
    png_bytep *volatile rows = NULL;
    volatile nolad_img_status status = NOLAD_IMG_OK;
    if (setjmp(png_jmpbuf(png))) {
        status = src.truncated ? NOLAD_IMG_TRUNCATED : NOLAD_IMG_CORRUPT;
        goto done;
    }
    png_set_read_fn(png, &src, png_read_memory);
    // libpng's default 1,000,000-pixel width/height cap would call a valid 2,000,000×1 PNG corrupt;
    // the caller's pixel limit is the guard, as in Pillow.
    png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
    png_read_info(png, pinfo);
    png_uint_32 width = png_get_image_width(png, pinfo), height = png_get_image_height(png, pinfo);
    int depth = png_get_bit_depth(png, pinfo), type = png_get_color_type(png, pinfo);
    info->source_width = info->width = (int)width;
    info->source_height = info->height = (int)height;
#ifdef PNG_eXIf_SUPPORTED
    png_uint_32 exif_size = 0;
    png_bytep exif = NULL;
    if (png_get_eXIf_1(png, pinfo, &exif_size, &exif) && exif) {
        info->orientation = exif_orientation(exif, exif_size);
    }
#endif
    if ((uint64_t)width * (uint64_t)height > max_pixels) {
        status = NOLAD_IMG_TOO_LARGE;
        goto done;
    }
    if (out == NULL) goto done;

    png_colorp palette = NULL;
    int palette_count = 0;
    if (type == PNG_COLOR_TYPE_PALETTE) png_get_PLTE(png, pinfo, &palette, &palette_count);
    if (depth < 8) png_set_packing(png);  // one byte per sample, values unscaled
    png_set_interlace_handling(png);
    png_read_update_info(png, pinfo);
    size_t rowbytes = png_get_rowbytes(png, pinfo);
    raw = malloc(rowbytes * height);
    rows = malloc(sizeof(png_bytep) * height);
    if (!raw || !rows) {
        status = NOLAD_IMG_NO_MEMORY;
        goto done;
    }
    for (png_uint_32 y = 0; y < height; y++) rows[y] = raw + (size_t)y * rowbytes;
    png_read_image(png, rows);

    int channels = png_get_channels(png, pinfo);
    int bytes = depth == 16 ? 2 : 1;  // 16-bit samples are big-endian
    int gray_scale = depth == 1 ? 255 : depth == 2 ? 85 : depth == 4 ? 17 : 1;
    for (png_uint_32 y = 0; y < height; y++) {
        const uint8_t *in = rows[y];
        uint8_t *o = out + (size_t)y * width * 3;
        for (png_uint_32 x = 0; x < width; x++, o += 3) {
            const uint8_t *p = in + (size_t)x * channels * bytes;
            switch (type) {
                case PNG_COLOR_TYPE_PALETTE: {
                    int i = p[0];
                    if (i < palette_count) {
                        o[0] = palette[i].red, o[1] = palette[i].green, o[2] = palette[i].blue;
                    } else {
                        o[0] = o[1] = o[2] = 0;
                    }
                    break;
                }
                case PNG_COLOR_TYPE_GRAY:
                    // Pillow: "I;16" → RGB clips at 255; lower depths are scaled to 0...255.
                    if (depth == 16) {
                        unsigned v = (unsigned)p[0] << 8 | p[1];
                        o[0] = o[1] = o[2] = (uint8_t)(v > 255 ? 255 : v);
                    } else {
                        o[0] = o[1] = o[2] = (uint8_t)(p[0] * gray_scale);
                    }
                    break;
                case PNG_COLOR_TYPE_GRAY_ALPHA:
                    o[0] = o[1] = o[2] = p[0];  // high byte when 16-bit
                    break;
                default:  // RGB, RGBA: high byte when 16-bit
                    o[0] = p[0], o[1] = p[bytes], o[2] = p[2 * bytes];
                    break;
            }
        }
    }
done:
    png_destroy_read_struct(&png, &pinfo, NULL);
    free(raw);
    free(rows);
    return status;
}
