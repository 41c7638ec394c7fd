// Turns a stream of token pieces (arbitrary byte strings: a token can end mid-character) into
// text chunks that never split a UTF-8 character and never leak the start of a stop string.
#pragma once

#include <string>
#include <vector>

namespace fml {

// Length of the longest prefix of `s` made of complete UTF-8 sequences. Invalid bytes count as
// complete (the decoder on the JS side turns them into U+FFFD) so a bad byte never stalls output.
size_t utf8_complete_prefix(const std::string & s);

// `s` with every ill-formed sequence replaced by U+FFFD, one per maximal subpart (the WHATWG
// decoder's rule, what JS would show): the text a stop string is matched against is the text the
// user sees.
std::string utf8_sanitize(const std::string & s);

class text_stream {
public:
    explicit text_stream(std::vector<std::string> stop_strings);

    // Appends a token's bytes. Returns the text now safe to emit (possibly empty). Sets `stopped`
    // when a stop string appeared; the response then ends right before it.
    std::string push(const std::string & piece);
    // End of generation: whatever is held back is emitted (minus nothing: no stop string matched).
    std::string finish();

    bool stopped() const { return stopped_; }
    const std::string & text() const { return text_; }

private:
    size_t hold_back() const;

    std::vector<std::string> stops_;
    size_t max_stop_ = 0;
    std::string bytes_;      // complete + incomplete bytes received
    std::string text_;       // response text so far (complete characters, cut at a stop string)
    size_t emitted_ = 0;     // bytes of text_ already emitted
    bool stopped_ = false;
};

} // namespace fml
