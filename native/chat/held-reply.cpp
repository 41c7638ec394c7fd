// A reply held to send's grammar (or JSON schema): which of its tokens the grammar holds, where a
// pass over the vocabulary runs when the sampler's own choice does not fit (in the step, or on a
// thread of its own while the steps go on without this chat: where a core is spare), and taking
// the token it found. What sampling under a grammar is: engine/sampler.cpp; the grammar: engine/grammar.cpp.
#include "chat/chat.h"

#include "chat/turn-state.h"

#include <system_error>

namespace fml {

void chat::sample_held_reply(step_context & e, int32_t logits_row) {
    turn_state & t = *turn_;
    // What reads the turn here (the splitter) stays as it is while a pass runs: the chat waits for
    // it. The turn itself, not turn_: a turn that ends meanwhile (an abort) is moved out of turn_
    // and destroyed only once the pass is joined.
    const auto held = [this, &t](int32_t c) { return held_by_grammar(t, c); };
    const std::vector<int32_t> & non_text = refused_in_answer(t);
    const sampler_chain::held_step step = t.sampler->sample_held(e.ctx(), logits_row, *t.req.grammar, non_text, held);
    if (step.decided) {
        take_grammar_token(step, e);
        return;
    }
    const auto pass_in_step = [&] {
        const auto t0 = clock_type::now();
        const sampler_chain::held_step rest = t.sampler->sample_rest(*t.req.grammar, non_text, model_->first_bytes(), held);
        count_grammar_pass(t, ms_since(t0));
        take_grammar_token(rest, e);
    };
    const int8_t on = t.req.gen.sampling.test_grammar_pass_on;
    if (on == 1 || (on == 0 && !grammar_thread_)) {
        // In the step: the cores all decode (a thread of its own only competed with them: slower for
        // this chat, no faster for the others; bench/structured.ts).
        pass_in_step();
        return;
    }
    // The pass over the vocabulary (milliseconds to seconds on a large one, by the grammar's width)
    // runs on a thread of its own: the next steps go on without this chat, whose token is taken at
    // its next contribution (tokens_wanted says when the pass is done).
    t.pending = -1;
    auto pass = std::make_unique<grammar_pass>();
    grammar_pass * p = pass.get();
    std::function<void()> wake = e.waker();
    try {
        // The tokens refused live in the turn's tool set-up or the model, both outliving the pass.
        p->worker = std::thread([this, &t, p, held, wake, refused = &non_text] {
            const auto t0 = clock_type::now();
            try {
                p->step = t.sampler->sample_rest(*t.req.grammar, *refused, model_->first_bytes(), held, &p->cancel);
            } catch (...) {
                p->error = std::current_exception();
            }
            p->ms = ms_since(t0);
            p->done.store(true);
            try {
                wake();
            } catch (...) {
                // Nothing escapes the thread (it would end the process); the next step finds it done.
            }
        });
    } catch (const std::system_error &) {
        pass_in_step();   // no thread to be had
        return;
    }
    t.pass = std::move(pass);
}

void chat::count_grammar_pass(turn_state & t, double ms) {
    t.result.stats.grammar_passes++;
    t.result.stats.grammar_ms += ms;
}

const std::vector<int32_t> & chat::refused_in_answer(const turn_state & t) const {
    // A grammar refuses the tokens whose text it would misread (control tokens: their special text,
    // which the answer's text does not have); a tool call's grammar reads the format's preserved
    // markers as the reply does. A lazy one waiting for its trigger holds nothing, so refuses nothing.
    static const std::vector<int32_t> none;
    if (t.req.grammar->waiting()) {
        return none;
    }
    return t.req.grammar_of_tools ? t.req.tools->non_text : model_->non_text_tokens();
}

bool chat::held_by_grammar(const turn_state & t, int32_t tok) const {
    // The grammar holds the answer from its first text on (a marker after it would leave the answer:
    // held too, so refused), and its end; the reasoning and the framing before it stay free.
    if (t.answer_held) {
        return true;
    }
    if (model_->is_eog(tok)) {
        return t.splitter->in_answer();
    }
    const split_step s = t.splitter->peek(tok, reply_piece(t, tok));
    return s.has_text && s.part == reply_part::content;
}

void chat::take_grammar_token(const sampler_chain::held_step & step, step_context & e) {
    turn_state & t = *turn_;
    t.answer_held = t.answer_held || (step.held && step.token >= 0 && !model_->is_eog(step.token));
    take_sampled(step.token, e);
}

bool chat::take_grammar_pass(step_context & e) {
    turn_state & t = *turn_;
    if (!t.pass->done.load()) {
        return false;
    }
    std::unique_ptr<grammar_pass> pass = std::move(t.pass);
    pass->worker.join();
    count_grammar_pass(t, pass->ms);
    if (pass->error) {
        // Only this turn fails: the pass touched no cache and no ledger.
        try {
            std::rethrow_exception(pass->error);
        } catch (const fml_error & err) {
            fail_turn(err, e);
        } catch (const std::exception & ex) {
            fail_turn(fml_error(FML_ERR_INTERNAL, std::string("a grammar's pass failed: ") + ex.what()), e);
        }
        return true;
    }
    take_grammar_token(pass->step, e);
    return true;
}

} // namespace fml
