// Chat templates: the Jinja2 subset real tokenizer_config.json templates use,
// rendered as transformers' apply_chat_template does (trim_blocks and
// lstrip_blocks on), plus built-in templates for models that ship none.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace tmc {

struct ChatMessage {
    std::string role;
    std::string content;
};

struct ChatRenderOptions {
    bool add_generation_prompt = true;
    std::string bos_token;
    std::string eos_token;
};

class ChatTemplate {
public:
    // Parses the template. Throws tmc::Error "chat template: line L, column C: ...".
    explicit ChatTemplate(const std::string& source);
    ~ChatTemplate();
    ChatTemplate(ChatTemplate&&) noexcept;
    ChatTemplate& operator=(ChatTemplate&&) noexcept;

    // A built-in template: llama2, llama3, chatml, internlm2, vicuna (also
    // "qwen" and "smollm" for chatml). Throws tmc::Error for another name.
    static ChatTemplate builtin(const std::string& name);
    static std::vector<std::string> builtin_names();

    // `messages_json` is a JSON array of message objects (role, content and
    // any other fields the template reads). Errors (including the template's
    // raise_exception) throw tmc::Error with the template position.
    std::string render_json(const std::string& messages_json, const ChatRenderOptions& opt) const;
    std::string render(const std::vector<ChatMessage>& messages, const ChatRenderOptions& opt) const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace tmc
