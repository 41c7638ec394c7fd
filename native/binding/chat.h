// NativeChat: one chat (a sequence in its model's shared engine). Turns run on the model's scheduler
// thread; their pieces and results come back through a thread-safe function per turn, in order.
#pragma once

#include <napi.h>

#include "engine/runtime.h"
#include "chat/chat.h"

#include <functional>
#include <memory>

namespace fml {

// What a turn is prepared by, off the JS thread: everything it reads is its own (captured by value).
using turn_preparer = std::function<turn_request(chat &)>;
using generating_preparer = std::function<turn_request(chat &, generation_options, bool pin)>;

class js_chat : public Napi::ObjectWrap<js_chat> {
public:
    static Napi::Function define(Napi::Env env);
    // new NativeChat(nativeModel, options), or new NativeChat(External<restored>) from loadChat.
    explicit js_chat(const Napi::CallbackInfo & info);
    ~js_chat() override;

    // Throws DISPOSED.
    chat & require(Napi::Env env);
    const std::shared_ptr<chat> & core() const { return core_; }
    const std::shared_ptr<runtime> & rt() const { return rt_; }
    // Claims the chat for one operation; throws CHAT_BUSY when a turn (or another operation) runs.
    void claim(Napi::Env env, const char * busy_message);
    // The operation ended (JS thread): the chat is free again, and a dispose requested meanwhile happens.
    void finished();

private:
    Napi::Value js_send(const Napi::CallbackInfo & info);
    Napi::Value js_ingest_exchange(const Napi::CallbackInfo & info);
    Napi::Value js_send_tool_results(const Napi::CallbackInfo & info);
    Napi::Value js_ingest_tool_exchange(const Napi::CallbackInfo & info);
    Napi::Value js_parse_tool_reply(const Napi::CallbackInfo & info);
    Napi::Value js_abort(const Napi::CallbackInfo & info);
    Napi::Value js_stats(const Napi::CallbackInfo & info);
    Napi::Value js_memory(const Napi::CallbackInfo & info);
    Napi::Value js_cache_state(const Napi::CallbackInfo & info);
    Napi::Value js_count_turn_tokens(const Napi::CallbackInfo & info);
    Napi::Value js_reset(const Napi::CallbackInfo & info);
    Napi::Value js_dispose(const Napi::CallbackInfo & info);
    Napi::Value js_save_checkpoint(const Napi::CallbackInfo & info);
    Napi::Value js_checkpoint(const Napi::CallbackInfo & info);
    Napi::Value js_restored_transcript(const Napi::CallbackInfo & info);
    Napi::Value js_resolved_options(const Napi::CallbackInfo & info);
    Napi::Value js_pin(const Napi::CallbackInfo & info);
    Napi::Value js_unpin(const Napi::CallbackInfo & info);
    Napi::Value js_pins(const Napi::CallbackInfo & info);
    Napi::Value js_forget(const Napi::CallbackInfo & info);
    void release();
    // Claims the chat and starts its turn: `prepare` (the chat -> turn_request) runs on a worker, and
    // the turn goes from there to the scheduler. `ingest`: a finished exchange (resolves to its prompt tokens).
    Napi::Value start_claimed(Napi::Env env, const char * busy_message, turn_preparer && prepare, bool ingest, Napi::Function on_piece);
    // send and sendToolResults: the turn's options (info[1]), onPiece (info[2]) and pin (info[3]).
    Napi::Value start_generating(const Napi::CallbackInfo & info, generating_preparer && prepare);

    std::shared_ptr<runtime> rt_;
    std::shared_ptr<chat> core_;
    bool dispose_pending_ = false;
};

// What loadChat hands the NativeChat constructor.
struct restored_chat {
    std::shared_ptr<runtime> rt;
    std::shared_ptr<chat> seq;
};

// loadChat(model, path, threads?) -> Promise<NativeChat>
Napi::Value js_load_chat(const Napi::CallbackInfo & info);

} // namespace fml
