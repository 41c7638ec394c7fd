// Attention weights under flash attention. A GGML_OP_FLASH_ATTN_EXT node never materializes its
// softmax, so importance had only the key-norm proxy there (worse than sliding on bench:recall).
// This recomputes the weights on the host from the node's own inputs — its queries, the cache's
// keys (f16, q8_0, ...), the mask, scale, soft-cap, ALiBi slope and sinks — with ggml's CPU
// kernels (mul_mat, soft_max_ext) on the engine's thread pool: the same rows the non-flash graph's
// kq_soft_max holds. Run inside the eval callback, after the scheduler synchronized the node.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

struct ggml_tensor;
struct ggml_threadpool;

namespace fml {

class flash_weights {
public:
    // (stream, token of the stream, heads): heads[h] is head h's weights over the node's n_kv cells.
    // All heads of a query come together: what reads them can combine the heads before its per-cell work.
    using query_fn = std::function<void(int64_t, int64_t, const float * const *)>;

    // Layer of a flash-attention node's keys (a cache tensor named cache_*k_l<il>), or -1 when the
    // node is not one this can read (no cache keys, a top-k sparse node).
    static int32_t layer_of(const ggml_tensor * fa);
    // [n_kv, tokens per stream, n_head, n_stream] of the weights `fa` would have produced.
    static void shape_of(const ggml_tensor * fa, int64_t ne[4]);

    void bind(ggml_threadpool * pool, int32_t n_threads) { pool_ = pool; n_threads_ = n_threads; }
    // False when the node's inputs are not a layout this reads (then nothing was reported).
    bool compute(ggml_tensor * fa, const query_fn & query);

private:
    const uint8_t * fetch(const ggml_tensor * t, size_t offset, size_t size, std::vector<uint8_t> & buf);

    ggml_threadpool * pool_ = nullptr;
    int32_t n_threads_ = 1;
    std::vector<uint8_t> k_buf_, q_buf_, mask_buf_;   // device tensors' bytes
    std::vector<uint8_t> k_packed_, mask_packed_, work_;
    std::vector<float> q_packed_, weights_;   // weights_: the logits, then the softmax in place
    std::vector<const float *> heads_;       // one query's rows of weights_, by head
};

} // namespace fml
