#include "model/tp_split.hpp"

#include "tm/error.hpp"

namespace tmc {

TpSplit TpSplit::make(const ModelConfig& m, int tp) {
    if (tp < 1) throw Error("tp must be at least 1");
    TpSplit s;
    s.tp = tp;
    s.num_model_kv_heads = m.num_kv_heads;
    if (m.num_heads % tp)
        throw Error("--tp " + std::to_string(tp) + " does not divide num_attention_heads " + std::to_string(m.num_heads));
    if (m.intermediate_size % tp)
        throw Error("--tp " + std::to_string(tp) + " does not divide intermediate_size " +
                    std::to_string(m.intermediate_size));
    s.heads = m.num_heads / tp;
    if (m.num_kv_heads % tp == 0) {
        s.kv_heads = m.num_kv_heads / tp;
    } else if (tp % m.num_kv_heads == 0) {
        s.kv_heads = 1;  // each KV head is replicated on tp / num_kv_heads ranks
    } else {
        throw Error("--tp " + std::to_string(tp) + " and num_key_value_heads " + std::to_string(m.num_kv_heads) +
                    ": neither divides the other");
    }
    s.inter = m.intermediate_size / tp;
    s.vocab_split = m.vocab_size % tp == 0;
    return s;
}

RankShape rank_shape(const ModelConfig& m, int tp) {
    RankShape r{m, m.vocab_size};
    if (tp == 1) return r;
    const TpSplit sp = TpSplit::make(m, tp);
    r.cfg.num_heads = sp.heads;
    r.cfg.num_kv_heads = sp.kv_heads;
    r.cfg.intermediate_size = sp.inter;
    if (sp.vocab_split && !m.tie_word_embeddings) r.out_rows = m.vocab_size / tp;
    return r;
}

int TpSplit::kv_head_begin(int rank) const {
    if (num_model_kv_heads % tp == 0) return rank * kv_heads;
    return rank / (tp / num_model_kv_heads);
}

}  // namespace tmc
