// Sets a reply's reasoning apart from its answer, token by token as it is sampled: which part each
// token belongs to (the ledger keeps reasoning tokens under their own role, so pastReasoning can
// evict them) and what text it adds to which part. Markers and framing (<think>, </think>, harmony's
// headers) add no text. Some tokens are only placed later (a harmony header is known to open the
// analysis channel only at its <|message|>; a </think> that was never opened makes everything before
// it reasoning): the step then says which earlier tokens change part.
#pragma once

#include "model/model.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace fml {

enum class reply_part : uint8_t { content, reasoning };

// Where the reply starts: in a think block the prompt opened, right after reasoning the prompt
// skipped (send's thinking false), or fresh.
enum class reply_start : uint8_t { fresh, in_reasoning, after_reasoning };

struct split_step {
    reply_part part = reply_part::content;   // this token's part, as far as known now
    bool has_text = false;                    // the token's piece is text of `part` (not a marker)
    size_t text_from = 0;                     // ... from this byte (a name line's end inside the piece)
    // Tokens [relabel_from, this one) of the reply now belong to `relabel_part` (SIZE_MAX: none).
    size_t relabel_from = SIZE_MAX;
    reply_part relabel_part = reply_part::content;
    // keep_markup: markup the answer's text takes here, before this token's own text if it has any: a
    // message's header held until its <|message|>; an analysis message's header and end (its text is
    // the reasoning's), so the answer's markup has every message in its place.
    std::string answer_markup;
};

// True when the text is whitespace only (the blank lines around think-block markers).
bool is_blank(const std::string & text);

class reasoning_splitter {
public:
    // `markers`: the model's, which outlive the splitter. `keep_markup` (harmony, a chat with tools):
    // the answer's text keeps the markup of its messages (headers, a call's recipient, <|end|>), for
    // the tools' parser, and an analysis message's too, without its text (which is the reasoning).
    reasoning_splitter(const reasoning_markers & markers, reply_start start, bool keep_markup = false);
    // The reply's next token and its piece (rendered as text).
    split_step push(int32_t token, const std::string & piece);
    // What push would say, without taking the token (a candidate's part, before it is chosen).
    split_step peek(int32_t token, const std::string & piece) const;
    // The reply is in its answer now: its next text would be the answer's (an end of generation
    // here ends the answer).
    bool in_answer() const;

private:
    split_step push_think(int32_t token, const std::string & piece);
    split_step push_harmony(int32_t token, const std::string & piece);

    enum class state : uint8_t { text, name, after_open, after_close, role, header };
    const reasoning_markers & m_;   // the model's (it outlives the turn): a peek's copy copies none of it
    state state_ = state::text;
    reply_part part_ = reply_part::content;   // the part text goes to now (harmony: the message's channel)
    bool think_seen_ = false;                 // a think block was opened in this reply (or by the prompt)
    size_t index_ = 0;                        // tokens pushed so far
    size_t header_begin_ = 0;                 // harmony: the first token of the header being read
    std::string header_;                      // ... and its text
    bool keep_markup_ = false;
    std::string role_;                        // harmony: the role line's text since <|start|> (" to=functions.x" names a call)
    size_t recipient_begin_ = SIZE_MAX;       // ... the first token of a recipient there
    bool first_line_ = true;                  // keep_markup: no message started yet (text may be the prompt's role line's recipient)
    std::string markup_;                      // keep_markup: the next message's markup so far (given out at its <|message|>)
};

} // namespace fml
