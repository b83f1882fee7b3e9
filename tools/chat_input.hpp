// The terminal chat's input, shared by tm-run and tm-client: Ctrl-C handling,
// line reading that Ctrl-C interrupts, and the slash commands (/reset,
// /system TEXT, /exit; "//" sends a line starting with a slash).
#pragma once

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <optional>
#include <string>

namespace tmc::tool {

inline std::atomic<bool> g_interrupt{false};

// SIGINT sets g_interrupt. restart: system calls resume (batch modes);
// otherwise a blocked read returns EINTR (the chat prompt).
inline void install_sigint(bool restart) {
    struct sigaction sa {};
    sa.sa_handler = [](int) { g_interrupt.store(true); };
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigaction(SIGINT, &sa, nullptr);
}

// Reads a line from the terminal; Ctrl-C discards it (nullopt with
// *interrupted set); EOF returns nullopt.
inline std::optional<std::string> read_line(bool* interrupted) {
    std::string line;
    *interrupted = false;
    for (;;) {
        char c;
        ssize_t n = ::read(0, &c, 1);
        if (n < 0 && errno == EINTR) {
            if (g_interrupt.exchange(false)) {
                *interrupted = true;
                return std::nullopt;
            }
            continue;
        }
        if (n <= 0) return line.empty() ? std::nullopt : std::optional<std::string>(line);
        if (c == '\n') return line;
        line += c;
    }
}

struct ChatLine {
    enum Kind { Quit, Skip, Reset, System, Turn } kind = Skip;
    std::string text;  // System: the prompt; Turn: the user's text
};

// Prints the ">>> " prompt, reads a line and says what it asks for; prints
// the messages of the commands itself (the same in tm-run and tm-client).
inline ChatLine next_chat_line() {
    std::fputs(">>> ", stdout);
    std::fflush(stdout);
    bool intr = false;
    auto line = read_line(&intr);
    if (intr) {  // Ctrl-C at the prompt: the line is dropped
        std::fputs("\n", stdout);
        return {ChatLine::Skip, ""};
    }
    if (!line) {
        std::fputs("\n", stdout);
        return {ChatLine::Quit, ""};
    }
    std::string in = *line;
    while (!in.empty() && (in.back() == '\r' || in.back() == ' ')) in.pop_back();
    if (in.empty()) return {ChatLine::Skip, ""};
    if (in == "/exit" || in == "/quit") return {ChatLine::Quit, ""};
    if (in == "/reset") {
        std::fputs("(new conversation)\n", stdout);
        return {ChatLine::Reset, ""};
    }
    if (in.rfind("/system", 0) == 0 && (in.size() == 7 || in[7] == ' ')) {
        std::fputs("(system prompt set; new conversation)\n", stdout);
        return {ChatLine::System, in.size() > 8 ? in.substr(8) : ""};
    }
    if (in[0] == '/' && in.rfind("//", 0) != 0) {
        std::fprintf(stderr, "commands: /reset, /system TEXT, /exit (start a line with // to send a slash)\n");
        return {ChatLine::Skip, ""};
    }
    if (in.rfind("//", 0) == 0) in.erase(0, 1);
    return {ChatLine::Turn, in};
}

}  // namespace tmc::tool
