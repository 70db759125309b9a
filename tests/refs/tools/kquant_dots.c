/* ember's own program (no llama.cpp code): prints what llama.cpp's CPU backend returns from
 * ggml_get_type_traits_cpu(T)->vec_dot for the weights and activations tests/kquant_kernels.rs
 * draws (xorshift64; exact integer-to-float steps only), after quantising the activations with
 * the vec_dot type's own from_float. Each line: type, blocks, the f32 bits, the value.
 *
 *   L=/work/lc-cpu/llama.cpp
 *   gcc -O1 -o kquant_dots tests/refs/tools/kquant_dots.c -I$L/ggml/include \
 *       -L$L/build/bin -lggml-cpu -lggml-base -Wl,-rpath,$L/build/bin
 *   ./kquant_dots q2_K q3_K
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"

static uint64_t st;
static uint32_t next(void) { st ^= st << 13; st ^= st >> 7; st ^= st << 17; return (uint32_t)(st >> 32); }
static float gfloat(void) { return (float)((int32_t)(next() >> 8) - (1 << 23)) * (1.0f / (float)(1 << 23)); }
static uint16_t ghalf(void) { uint32_t u = next(); return (uint16_t)(0x2000 | (u & 0x0FFF) | (u & 0x8000)); }

struct kind { const char *name; int ty; int bl; int bsz; int nhalves; int halves[2]; };
static const struct kind KINDS[] = {
    {"q2_K", GGML_TYPE_Q2_K, 256, 84, 2, {80, 82}},
    {"q3_K", GGML_TYPE_Q3_K, 256, 110, 1, {108}},
};

int main(int argc, char **argv) {
    ggml_cpu_init();
    const int counts[] = {1, 3, 7, 18};
    for (int a = 1; a < argc; a++) {
        const struct kind *k = NULL;
        for (size_t i = 0; i < sizeof KINDS / sizeof KINDS[0]; i++) if (!strcmp(KINDS[i].name, argv[a])) k = &KINDS[i];
        if (!k) { fprintf(stderr, "unknown type %s\n", argv[a]); return 1; }
        for (int c = 0; c < 4; c++) {
            int nb = counts[c];
            st = 0x9E3779B97F4A7C15ull ^ (uint64_t)(k->ty * 1000 + nb);
            uint8_t *w = malloc((size_t)k->bsz * nb);
            for (int i = 0; i < k->bsz * nb; i++) w[i] = (uint8_t)next();
            for (int b = 0; b < nb; b++)
                for (int h = 0; h < k->nhalves; h++) { uint16_t v = ghalf(); memcpy(w + b * k->bsz + k->halves[h], &v, 2); }
            int n = k->bl * nb;
            float *x = malloc(sizeof(float) * n);
            for (int i = 0; i < n; i++) x[i] = gfloat();
            const struct ggml_type_traits_cpu *t = ggml_get_type_traits_cpu(k->ty);
            void *y = malloc(ggml_row_size(t->vec_dot_type, n));
            ggml_get_type_traits_cpu(t->vec_dot_type)->from_float(x, y, n);
            float s = 0;
            t->vec_dot(n, &s, 0, w, 0, y, 0, 1);
            uint32_t bits; memcpy(&bits, &s, 4);
            printf("%s %d %08x %.9g\n", k->name, nb, bits, s);
            free(w); free(x); free(y);
        }
    }
    return 0;
}
