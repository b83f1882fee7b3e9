// Built-in chat templates for models whose tokenizer_config.json has none,
// chosen by name as LMDeploy users pass --model-name. Each is the template
// the model family publishes.
#include <map>

#include "tm/chat_template.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace {

const std::map<std::string, const char*>& builtins() {
    static const std::map<std::string, const char*> m = {
        {"llama2",
         "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
         "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
         "{% for message in messages %}"
         "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n') "
         "if loop.first and system else '') + message['content'] | trim + ' [/INST]' }}"
         "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
         "{% endfor %}"},
        {"llama3",
         "{% set loop_messages = messages %}{% for message in loop_messages %}"
         "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
         "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"},
        {"chatml",
         "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
         "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
        {"internlm2",
         "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
         "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
        {"vicuna",
         "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
         "{% set messages = messages[1:] %}{% else %}{% set system = 'A chat between a curious user and an artificial "
         "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
         "{% endif %}{{ system }}{% for message in messages %}{% if message['role'] == 'user' %}"
         "{{ ' USER: ' + message['content'] }}{% elif message['role'] == 'assistant' %}"
         "{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"},
    };
    return m;
}

}  // namespace

ChatTemplate ChatTemplate::builtin(const std::string& name) {
    std::string n = name == "qwen" || name == "qwen2" || name == "qwen3" || name == "smollm" ? "chatml" : name;
    auto it = builtins().find(n);
    if (it == builtins().end()) {
        std::string known;
        for (auto& [k, v] : builtins()) known += (known.empty() ? "" : ", ") + k;
        throw Error("unknown chat template \"" + name + "\" (built in: " + known + ")");
    }
    return ChatTemplate(it->second);
}

std::vector<std::string> ChatTemplate::builtin_names() {
    std::vector<std::string> v;
    for (auto& [k, x] : builtins()) v.push_back(k);
    return v;
}

}  // namespace tmc
