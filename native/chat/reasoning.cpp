#include "chat/reasoning.h"

#include <algorithm>
#include <cctype>

namespace fml {

bool is_blank(const std::string & text) {
    return std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isspace(c) != 0; });
}

reasoning_splitter::reasoning_splitter(const reasoning_markers & markers, reply_start start, bool keep_markup)
    : m_(markers), keep_markup_(keep_markup && markers.harmony()) {
    if (keep_markup_) {
        role_ = "assistant";   // the prompt ends in "<|start|>assistant": the reply may go on with its recipient
    }
    if (start == reply_start::in_reasoning && m_.think()) {
        part_ = reply_part::reasoning;
        think_seen_ = true;
    } else if (start == reply_start::after_reasoning && m_.think()) {
        state_ = state::after_close;   // the skipped block's blank lines are in the prompt; more are blank too
        think_seen_ = true;
    }
}

split_step reasoning_splitter::push(int32_t token, const std::string & piece) {
    split_step s = m_.harmony() ? push_harmony(token, piece) : m_.think() ? push_think(token, piece) : split_step{ reply_part::content, true };
    ++index_;
    return s;
}

split_step reasoning_splitter::peek(int32_t token, const std::string & piece) const {
    reasoning_splitter copy = *this;
    return copy.push(token, piece);
}

bool reasoning_splitter::in_answer() const {
    if (m_.harmony()) {
        return part_ == reply_part::content && state_ == state::text;
    }
    return part_ == reply_part::content;
}

split_step reasoning_splitter::push_think(int32_t token, const std::string & piece) {
    split_step s;
    if (token == m_.think_open) {
        state_ = m_.named ? state::name : state::after_open;
        part_ = reply_part::reasoning;
        think_seen_ = true;
        s.part = reply_part::reasoning;
        return s;
    }
    if (token == m_.think_close && part_ == reply_part::reasoning) {
        state_ = state::after_close;
        part_ = reply_part::content;
        s.part = reply_part::reasoning;
        return s;
    }
    if (token == m_.think_close && m_.named) {
        // An unmatched close of a named channel is framing (Gemma 4 may write one after its answer):
        // only prompts that open a <think> block make a model close what it never opened.
        s.part = part_;
        return s;
    }
    if (token == m_.think_close && !think_seen_) {
        // Closed without being opened: the model was trained on prompts that open the block (Qwen3.5,
        // DeepSeek-R1-0528), so everything before this was reasoning.
        think_seen_ = true;
        state_ = state::after_close;
        part_ = reply_part::content;
        s.part = reply_part::reasoning;
        s.relabel_from = 0;
        s.relabel_part = reply_part::reasoning;
        return s;
    }
    if (state_ == state::name) {
        // The channel's name line (Gemma 4's "thought\n"): framing of the block, not its text; what
        // follows the newline in the same piece is.
        s.part = reply_part::reasoning;
        const size_t nl = piece.find('\n');
        if (nl != std::string::npos) {
            state_ = state::after_open;
            if (!is_blank(piece.substr(nl + 1))) {
                state_ = state::text;
                s.has_text = true;
                s.text_from = nl + 1;
            }
        }
        return s;
    }
    if ((state_ == state::after_open || state_ == state::after_close) && is_blank(piece)) {
        s.part = reply_part::reasoning;   // the blank lines around the block's markers (templates strip them)
        return s;
    }
    state_ = state::text;
    s.part = part_;
    s.has_text = true;
    return s;
}

split_step reasoning_splitter::push_harmony(int32_t token, const std::string & piece) {
    // The prompt ends in "<|start|>assistant": the reply starts with a message's channel, or its text.
    split_step s;
    if (token == m_.channel && state_ != state::header) {
        // The header's part is known at its <|message|>; until then its tokens count as content.
        state_ = state::header;
        header_begin_ = index_;
        header_.clear();
        markup_ += piece;
        s.part = reply_part::content;
        return s;
    }
    // With the markup kept, a header may also end in "<|message|>" spelled in plain tokens (a tool
    // call's grammar holds text, and a weak model may spell the marker): the message starts there too.
    static const std::string MESSAGE = "<|message|>";
    const bool in_header = state_ == state::header || state_ == state::role;
    const std::string so_far = keep_markup_ && in_header && token != m_.message ? markup_ + piece : std::string();
    const bool spelled_message = so_far.size() >= MESSAGE.size() && so_far.compare(so_far.size() - MESSAGE.size(), MESSAGE.size(), MESSAGE) == 0;
    if ((token == m_.message || spelled_message) && in_header) {
        // The channel's name is the header's first word. A recipient (" to=functions.x", in the role
        // line or after the channel) makes the message a tool call, whatever its channel: the answer's.
        const std::string channel = header_.substr(0, header_.find_first_of(" \t\n<"));
        const bool call = (role_ + header_).find("to=") != std::string::npos;
        part_ = state_ == state::header && channel == "analysis" && !(keep_markup_ && call) ? reply_part::reasoning : reply_part::content;
        s.part = part_;
        if (state_ == state::header) {
            // A call's recipient in the role line is the call's too: a past call keeps it when its
            // analysis leaves with "<|start|>assistant" (as the template renders it then).
            s.relabel_from = call && recipient_begin_ < header_begin_ ? recipient_begin_ : header_begin_;
            s.relabel_part = part_;
        }
        if (keep_markup_) {
            s.answer_markup = std::move(markup_);
            if (part_ == reply_part::content) {
                s.has_text = true;   // this token's piece, after the header's markup held so far
            } else {
                s.answer_markup += piece;
            }
        }
        markup_.clear();
        first_line_ = false;
        state_ = state::text;
        return s;
    }
    if (token == m_.end) {
        // The message ends; up to the next header, "<|start|>assistant" belongs with it (a past
        // reply's template rendering has only the final message's header after the prompt's own).
        if (keep_markup_ && state_ == state::text) {
            if (part_ == reply_part::content) {
                s.has_text = true;
            } else {
                s.answer_markup = piece;
            }
        }
        state_ = state::role;
        role_.clear();
        recipient_begin_ = SIZE_MAX;
        first_line_ = false;
        s.part = part_;
        return s;
    }
    if (token == m_.start) {
        state_ = state::role;
        role_.clear();
        recipient_begin_ = SIZE_MAX;
        first_line_ = false;
        markup_ = piece;
        s.part = part_;
        return s;
    }
    if (state_ == state::header) {
        header_ += piece;
        markup_ += piece;
        s.part = reply_part::content;
        return s;
    }
    if (state_ == state::role) {
        if (recipient_begin_ == SIZE_MAX && !role_.empty() && !piece.empty() && std::isspace((unsigned char) piece[0])) {
            recipient_begin_ = index_;   // after the role's name: " to=functions.x"
        }
        role_ += piece;
        markup_ += piece;
        s.part = part_;
        return s;
    }
    if (keep_markup_ && first_line_) {
        // Text right after the prompt's role line, before any header: a recipient there
        // (" to=functions.x<|channel|>...") makes the message a call, whatever its channel.
        if (recipient_begin_ == SIZE_MAX && !piece.empty() && std::isspace((unsigned char) piece[0])) {
            recipient_begin_ = index_;
        }
        role_ += piece;
    }
    s.part = part_;
    s.has_text = true;
    return s;
}

} // namespace fml
