// Tokenizer: Hugging Face tokenizer.json (BPE models: byte-level as in
// Llama 3 / Qwen, and SentencePiece-style with byte fallback as in Llama 2 /
// Mistral), with tokenizer_config.json's special tokens and chat template.
// encode() and decode() give the same ids and text as Hugging Face's
// `tokenizers`; StreamDecoder turns ids arriving one at a time into text.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tmc {

class Tokenizer {
public:
    // Loads DIR/tokenizer.json and DIR/tokenizer_config.json (optional).
    // DIR may also be a workspace (its tokenizer/ directory is used).
    // Throws tmc::Error naming the file and what is unsupported or malformed.
    static std::unique_ptr<Tokenizer> load(const std::string& dir);
    virtual ~Tokenizer() = default;

    // Invalid UTF-8 in `text` is replaced by U+FFFD first (what Hugging Face
    // gets from Python's errors="replace"). With add_special_tokens the
    // post-processor adds BOS/EOS as tokenizer.json says.
    virtual std::vector<int> encode(std::string_view text, bool add_special_tokens = false) const = 0;
    // Always valid UTF-8. Ids out of range are skipped.
    virtual std::string decode(const std::vector<int>& ids, bool skip_special_tokens = false) const = 0;

    virtual int vocab_size() const = 0;  // including added tokens
    virtual std::optional<int> token_to_id(std::string_view token) const = 0;
    virtual std::string id_to_token(int id) const = 0;
    virtual bool is_special(int id) const = 0;

    // From tokenizer_config.json (empty / -1 when absent).
    virtual const std::string& bos_token() const = 0;
    virtual const std::string& eos_token() const = 0;
    virtual int bos_id() const = 0;
    virtual int eos_id() const = 0;
    virtual const std::string& chat_template() const = 0;
};

// Incremental detokenizer: push ids one at a time; each call returns the text
// that became complete (never a partial UTF-8 character). The concatenation
// of all returned pieces and finish() equals tokenizer.decode(all ids).
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer& tok, bool skip_special_tokens = false)
        : tok_(tok), skip_special_(skip_special_tokens) {}
    std::string push(int id);
    std::string finish();
    void reset();

private:
    const Tokenizer& tok_;
    bool skip_special_;
    std::vector<int> ids_;
    size_t prefix_ = 0;  // decode window start
    size_t read_ = 0;    // ids already turned into emitted text
};

}  // namespace tmc
