// Greedy token ids from libllama for given prompt ids, one JSON line per prompt: the ids it
// generates (N steps, or up to the first end-of-generation token) and the top-1/top-2 logit
// margin at each step. Written for ember's test references; only its output is committed
// as a reference, built against a llama.cpp checkout (see ../README.md).
//
// usage: greedy_ids MODEL N_STEPS "ID ID ID" ["ID ID" ...]
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void log_quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) level; (void) text; (void) data;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL N_STEPS \"PROMPT IDS\"...\n", argv[0]);
        return 2;
    }
    llama_log_set(log_quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    // Repacked weights take other float steps (and the AMX kernels SIGILL on the dev VM).
    mp.use_extra_bufts = false;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const int steps = atoi(argv[2]);
    for (int a = 3; a < argc; a++) {
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 256;
        cp.n_batch = 256;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        struct llama_context * ctx = llama_init_from_model(model, cp);
        llama_token prompt[256];
        int n = 0;
        char * s = strdup(argv[a]);
        for (char * t = strtok(s, " "); t && n < 256; t = strtok(NULL, " ")) {
            prompt[n++] = atoi(t);
        }
        printf("{\"prompt_ids\": [");
        for (int i = 0; i < n; i++) {
            printf("%s%d", i ? ", " : "", prompt[i]);
        }
        printf("], \"generated_ids\": [");
        llama_token ids[512];
        float margins[512];
        int got = 0;
        struct llama_batch batch = llama_batch_get_one(prompt, n);
        for (int step = 0; step < steps; step++) {
            if (llama_decode(ctx, batch) != 0) {
                fprintf(stderr, "decode failed\n");
                return 1;
            }
            const float * logits = llama_get_logits_ith(ctx, -1);
            int best = 0;
            for (int v = 1; v < n_vocab; v++) {
                if (logits[v] > logits[best]) best = v;
            }
            float second = -1e30f;
            for (int v = 0; v < n_vocab; v++) {
                if (v != best && logits[v] > second) second = logits[v];
            }
            ids[got] = best;
            margins[got] = logits[best] - second;
            got++;
            if (llama_vocab_is_eog(vocab, best)) break;
            batch = llama_batch_get_one(&ids[got - 1], 1);
        }
        for (int i = 0; i < got; i++) {
            printf("%s%d", i ? ", " : "", ids[i]);
        }
        printf("], \"top1_top2_logit_margin\": [");
        for (int i = 0; i < got; i++) {
            printf("%s%.4f", i ? ", " : "", margins[i]);
        }
        printf("]}\n");
        free(s);
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
