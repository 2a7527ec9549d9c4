/* Writes a YCCK JPEG (Adobe transform 2) from raw CMYK: Pillow cannot write one.
   Used by make_image_fixtures.py: cc write_ycck_jpeg.c -ljpeg; ./a.out W H < cmyk.raw > out.jpg */
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int w = atoi(argv[1]), h = atoi(argv[2]);
    unsigned char *pixels = malloc((size_t)w * h * 4);
    if (fread(pixels, 4, (size_t)w * h, stdin) != (size_t)w * h) return 3;
    struct jpeg_compress_struct c;
    struct jpeg_error_mgr e;
    c.err = jpeg_std_error(&e);
    jpeg_create_compress(&c);
    jpeg_stdio_dest(&c, stdout);
    c.image_width = w;
    c.image_height = h;
    c.input_components = 4;
    c.in_color_space = JCS_CMYK;
    jpeg_set_defaults(&c);
    jpeg_set_colorspace(&c, JCS_YCCK);
    jpeg_set_quality(&c, 90, TRUE);
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = pixels + (size_t)c.next_scanline * w * 4;
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    free(pixels);
    return 0;
}
