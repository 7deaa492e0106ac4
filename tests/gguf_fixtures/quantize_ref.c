// Runs llama.cpp's reference quantizers (ggml/src/ggml-quants.c) on float32 rows from stdin and writes
// the blocks to stdout: `quantize_ref TYPE N_VALUES < values.f32 > blocks.bin`. Built by generate.py.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-quants.h"

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s q8_0|q5_0|q5_1|q4_K|q5_K|q6_K N_VALUES\n", argv[0]);
        return 2;
    }
    const char * type = argv[1];
    const long n = atol(argv[2]);
    float * x = malloc(n * sizeof(float));
    unsigned char * y = calloc(n * 2, 1);  // every type here takes under 2 bytes a value
    if (fread(x, sizeof(float), n, stdin) != (size_t) n) {
        fprintf(stderr, "expected %ld float32 values on stdin\n", n);
        return 1;
    }
    size_t size;
    if (!strcmp(type, "q8_0")) { quantize_row_q8_0_ref(x, (block_q8_0 *) y, n); size = n / 32 * sizeof(block_q8_0); }
    else if (!strcmp(type, "q5_0")) { quantize_row_q5_0_ref(x, (block_q5_0 *) y, n); size = n / 32 * sizeof(block_q5_0); }
    else if (!strcmp(type, "q5_1")) { quantize_row_q5_1_ref(x, (block_q5_1 *) y, n); size = n / 32 * sizeof(block_q5_1); }
    else if (!strcmp(type, "q4_K")) { quantize_row_q4_K_ref(x, (block_q4_K *) y, n); size = n / 256 * sizeof(block_q4_K); }
    else if (!strcmp(type, "q5_K")) { quantize_row_q5_K_ref(x, (block_q5_K *) y, n); size = n / 256 * sizeof(block_q5_K); }
    else if (!strcmp(type, "q6_K")) { quantize_row_q6_K_ref(x, (block_q6_K *) y, n); size = n / 256 * sizeof(block_q6_K); }
    else { fprintf(stderr, "unknown type %s\n", type); return 2; }
    fwrite(y, 1, size, stdout);
    return 0;
}
