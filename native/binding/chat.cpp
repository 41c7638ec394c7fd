#include "binding/chat.h"

#include "binding/common.h"
#include "binding/model.h"
#include "binding/options.h"
#include "engine/checkpoint.h"

#include <array>

namespace fml {

namespace {

Napi::Array tool_calls_to_js(Napi::Env env, const std::vector<tool_call> & calls) {
    Napi::Array out = Napi::Array::New(env, calls.size());
    for (size_t i = 0; i < calls.size(); ++i) {
        Napi::Object c = Napi::Object::New(env);
        c.Set("id", calls[i].id);
        c.Set("name", calls[i].name);
        c.Set("arguments", calls[i].arguments);
        out[(uint32_t) i] = c;
    }
    return out;
}

Napi::Object stats_to_js(Napi::Env env, const turn_stats & s) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("turn", s.turn);
    o.Set("promptTokens", s.prompt_tokens);
    o.Set("generatedTokens", s.generated_tokens);
    o.Set("prefillMs", s.prefill_ms);
    o.Set("decodeMs", s.decode_ms);
    o.Set("tokensPerSecond", s.tokens_per_second);
    o.Set("firstTokenMs", s.first_token_ms);
    o.Set("prepareMs", s.prepare_ms);
    o.Set("policyMs", s.policy_ms);
    o.Set("evictMs", s.evict_ms);
    o.Set("evictedTokens", s.evicted_tokens);
    o.Set("evictions", s.evictions);
    o.Set("compactions", s.compactions);
    o.Set("compactMs", s.compact_ms);
    o.Set("retainedTokens", s.retained_tokens);
    o.Set("latencyMs", s.latency_ms);
    o.Set("fallback", s.fallback);
    o.Set("summaryMs", s.summary_ms);
    o.Set("summaryTokens", s.summary_tokens);
    o.Set("grammarPasses", s.grammar_passes);
    o.Set("grammarMs", s.grammar_ms);
    o.Set("policy", s.policy);
    Napi::Array log = Napi::Array::New(env, s.eviction_log.size());
    for (size_t i = 0; i < s.eviction_log.size(); ++i) {
        const eviction_record & r = s.eviction_log[i];
        Napi::Object e = Napi::Object::New(env);
        e.Set("evictedTokens", r.evicted);
        e.Set("positions", ranges_to_js(env, r.positions));
        e.Set("policyMs", r.policy_ms);
        e.Set("evictMs", r.evict_ms);
        e.Set("fallback", r.fallback);
        e.Set("pastReasoning", r.past_reasoning);
        e.Set("summaryTokens", r.summary_tokens);
        e.Set("summaryPromptTokens", r.summary_prompt_tokens);
        e.Set("phase", r.during_generation ? "generation" : "prefill");
        log[(uint32_t) i] = e;
    }
    o.Set("evictionLog", log);
    return o;
}

// ---- a turn's way back to JS ----

struct turn_event {
    enum kind_t { PIECE, DONE, FAILED } kind;
    std::string text;      // PIECE: the piece; FAILED: the message
    std::string code;      // FAILED
    turn_result result;    // DONE
    bool reasoning = false;   // PIECE: of the reply's reasoning
};

struct turn_context {
    explicit turn_context(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
    Napi::Promise::Deferred deferred;
    Napi::FunctionReference on_piece;
    Napi::ObjectReference chat_ref;        // keeps the JS chat alive while the turn runs
    Napi::ObjectReference callback_error;  // { value }: the first exception onToken threw (any value)
    js_chat * jc = nullptr;
    bool ingest = false;
};

void deliver(Napi::Env env, Napi::Function, turn_context * ctx, turn_event * ev) {
    std::unique_ptr<turn_event> event(ev);
    if (env == nullptr || ctx == nullptr) {
        return;   // the environment is going away
    }
    switch (event->kind) {
        case turn_event::PIECE:
            if (!ctx->on_piece.IsEmpty() && ctx->callback_error.IsEmpty()) {
                try {
                    ctx->on_piece.Call({ Napi::String::New(env, event->text), Napi::Boolean::New(env, event->reasoning) });
                } catch (const Napi::Error & e) {
                    // A throwing callback stops the turn (as an abort); the result carries the error.
                    // Held in an object: a thrown string or number cannot be referenced (N-API < 10),
                    // and referencing it threw from here, so the turn went on and the error was lost.
                    Napi::Object holder = Napi::Object::New(env);
                    holder.Set("value", e.Value());
                    ctx->callback_error = Napi::Persistent(holder);
                    ctx->jc->core()->request_abort();
                    ctx->jc->rt()->wake();
                }
            }
            return;
        case turn_event::DONE: {
            Napi::Value result;
            if (ctx->ingest) {
                result = Napi::Number::New(env, event->result.stats.prompt_tokens);
            } else {
                Napi::Object o = Napi::Object::New(env);
                o.Set("response", event->result.response);
                o.Set("reasoning", event->result.reasoning);
                o.Set("stopReason", stop_reason_name(event->result.reason));
                o.Set("toolCalls", tool_calls_to_js(env, event->result.tool_calls));
                Napi::Object stats = stats_to_js(env, event->result.stats);
                // What this turn's scores came from: none where no decode of it gave a signal.
                const char * signal = event->result.stats.signal_reads > 0 ? importance_signal_name(ctx->jc->core()->signal()) : "";
                stats.Set("importanceSignal", *signal ? Napi::Value(Napi::String::New(env, signal)) : env.Null());
                o.Set("stats", stats);
                result = o;
            }
            ctx->jc->finished();   // may complete a dispose requested meanwhile
            // A throwing callback stopped the turn, which is kept: the result says what was generated
            // and carries the callback's error (the JS side reports it as a CallbackError).
            if (!ctx->callback_error.IsEmpty() && result.IsObject()) {
                result.As<Napi::Object>().Set("callbackError", ctx->callback_error.Value().Get("value"));
            }
            ctx->deferred.Resolve(result);
            return;
        }
        case turn_event::FAILED:
            ctx->jc->finished();
            ctx->deferred.Reject(make_error(env, event->code, event->text).Value());
            return;
    }
}

using turn_tsfn = Napi::TypedThreadSafeFunction<turn_context, turn_event, deliver>;

// A turn's preparation on a libuv worker: the message framed and tokenized, a tool turn set up, a
// grammar compiled, the fit checked; then the turn goes to the scheduler from there. None of it runs
// on the event loop, where a long message, a JSON schema or a tool exchange took milliseconds (a
// first required call's set-up with 128 tools, 0.2 s: bench/tools.ts) from every other request of
// the process.
// Its outcome reaches JS only through the turn's thread-safe function (a failed preparation as the
// turn's error, exactly once), so the worker's own completion has nothing to do.
class prepare_worker : public Napi::AsyncWorker {
public:
    prepare_worker(Napi::Env env, std::shared_ptr<runtime> rt, std::shared_ptr<chat> core, turn_preparer prepare, turn_callbacks cb)
        : Napi::AsyncWorker(env, "finite-memory-llm prepare"), rt_(std::move(rt)), core_(std::move(core)), prepare_(std::move(prepare)), cb_(std::move(cb)),
          called_(std::chrono::steady_clock::now()) {}
    ~prepare_worker() override {
        // Never run (its work was cancelled: the environment is going away): the turn still settles,
        // and its thread-safe function is released.
        if (!ran_) cb_.on_error(fml_error(FML_ERR_ABORTED, "the turn was not prepared"));
    }
    void Execute() override {
        ran_ = true;
        std::function<void(const fml_error &)> on_error = cb_.on_error;
        try {
            const auto t0 = std::chrono::steady_clock::now();
            core_->before_prepare();
            turn_request req = prepare_(*core_);
            req.prepare_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            req.called_at = called_;
            req.cb = std::move(cb_);
            rt_->submit(core_, std::move(req));
        } catch (const fml_error & e) {
            on_error(e);
        } catch (const std::exception & e) {   // std::bad_alloc tokenizing a huge message too
            on_error(fml_error(FML_ERR_INTERNAL, e.what()));
        }
    }
    void OnOK() override {}
    void OnError(const Napi::Error &) override {}

private:
    std::shared_ptr<runtime> rt_;
    std::shared_ptr<chat> core_;
    turn_preparer prepare_;
    turn_callbacks cb_;
    std::chrono::steady_clock::time_point called_;
    bool ran_ = false;   // set on the worker; read in the destructor, on the JS thread after the work completed
};

// Starts a turn (the chat claimed): prepared on a worker, its promise settled through the thread-safe function.
Napi::Value start_turn(Napi::Env env, js_chat & jc, Napi::Object chat_obj, turn_preparer && prepare, bool ingest, Napi::Function on_piece) {
    auto * ctx = new turn_context(env);
    ctx->jc = &jc;
    ctx->ingest = ingest;
    ctx->chat_ref = Napi::Persistent(chat_obj);
    if (!on_piece.IsEmpty()) {
        ctx->on_piece = Napi::Persistent(on_piece);
    }
    Napi::Promise promise = ctx->deferred.Promise();
    turn_tsfn tsfn;
    try {
        tsfn = turn_tsfn::New(env, "finite-memory-llm turn", 0, 1, ctx, [](Napi::Env, void *, turn_context * c) { delete c; });
    } catch (...) {
        delete ctx;
        jc.finished();
        throw;
    }
    turn_callbacks cb;
    cb.on_piece = [tsfn](const std::string & piece, bool reasoning) mutable {
        tsfn.NonBlockingCall(new turn_event{ turn_event::PIECE, piece, {}, {}, reasoning });
    };
    cb.on_done = [tsfn](turn_result && r) mutable {
        tsfn.NonBlockingCall(new turn_event{ turn_event::DONE, {}, {}, std::move(r) });
        tsfn.Release();
    };
    cb.on_error = [tsfn](const fml_error & e) mutable {
        tsfn.NonBlockingCall(new turn_event{ turn_event::FAILED, e.what(), e.code(), {} });
        tsfn.Release();
    };
    try {
        (new prepare_worker(env, jc.rt(), jc.core(), std::move(prepare), std::move(cb)))->Queue();
    } catch (...) {
        // N-API could not make or queue the work (the environment is closing): the chat is free again.
        // A worker made but not queued is left (its destructor would settle the turn a second time).
        tsfn.Release();
        jc.finished();
        throw;
    }
    return promise;
}

} // namespace

// ---- NativeChat ----

Napi::Function js_chat::define(Napi::Env env) {
    return DefineClass(env, "NativeChat", {
        InstanceMethod("send", &js_chat::js_send),
        InstanceMethod("ingestExchange", &js_chat::js_ingest_exchange),
        InstanceMethod("sendToolResults", &js_chat::js_send_tool_results),
        InstanceMethod("ingestToolExchange", &js_chat::js_ingest_tool_exchange),
        InstanceMethod("parseToolReply", &js_chat::js_parse_tool_reply),
        InstanceMethod("abort", &js_chat::js_abort),
        InstanceMethod("stats", &js_chat::js_stats),
        InstanceMethod("memory", &js_chat::js_memory),
        InstanceMethod("cacheState", &js_chat::js_cache_state),
        InstanceMethod("countTurnTokens", &js_chat::js_count_turn_tokens),
        InstanceMethod("reset", &js_chat::js_reset),
        InstanceMethod("dispose", &js_chat::js_dispose),
        InstanceMethod("saveCheckpoint", &js_chat::js_save_checkpoint),
        InstanceMethod("checkpoint", &js_chat::js_checkpoint),
        InstanceMethod("restoredTranscript", &js_chat::js_restored_transcript),
        InstanceMethod("resolvedOptions", &js_chat::js_resolved_options),
        InstanceMethod("pin", &js_chat::js_pin),
        InstanceMethod("unpin", &js_chat::js_unpin),
        InstanceMethod("pins", &js_chat::js_pins),
        InstanceMethod("forget", &js_chat::js_forget),
    });
}

js_chat::js_chat(const Napi::CallbackInfo & info) : Napi::ObjectWrap<js_chat>(info) {
    Napi::Env env = info.Env();
    info.This().As<Napi::Object>().TypeTag(&CHAT_TYPE_TAG);
    if (info.Length() >= 1 && info[0].IsExternal()) {
        restored_chat * r = info[0].As<Napi::External<restored_chat>>().Data();
        rt_ = r->rt;
        core_ = r->seq;
        return;
    }
    js_model * m = unwrap_tagged<js_model>(env, info[0], MODEL_TYPE_TAG, "NativeModel");
    auto model = m->require(env);
    const chat_options opts = guarded(env, [&] { return resolve_chat_options(options_arg(info, 1), m->load_options.threads,
                                                                                model->info().backend == "cpu" && chat::reads_attention_weights(model->info())); });
    core_ = guarded(env, [&] { return std::make_shared<chat>(model, opts, m->load_options.threads); });
    rt_ = m->require_runtime(env);
}

js_chat::~js_chat() {
    // The finalizer of a chat dropped without dispose(): its slot is freed by the scheduler.
    release();
}

void js_chat::release() {
    if (core_) {
        rt_->release(core_);
        core_.reset();
        rt_.reset();
    }
}

chat & js_chat::require(Napi::Env env) {
    if (!core_) {
        throw_error(env, FML_ERR_DISPOSED, "chat is disposed");
    }
    return *core_;
}

void js_chat::claim(Napi::Env env, const char * busy_message) {
    chat & s = require(env);
    bool expected = false;
    if (!s.busy().compare_exchange_strong(expected, true)) {
        throw_error(env, FML_ERR_BUSY, busy_message);
    }
    // An abort requested before this operation is not for it.
    s.clear_abort();
}

void js_chat::finished() {
    if (core_) {
        core_->busy().store(false);
    }
    if (dispose_pending_) {
        release();
    }
}

Napi::Value js_chat::start_claimed(Napi::Env env, const char * busy_message, turn_preparer && prepare, bool ingest, Napi::Function on_piece) {
    require(env);
    if (rt_->stopping()) {
        throw_error(env, FML_ERR_DISPOSED, "the model is shutting down");
    }
    claim(env, busy_message);
    return start_turn(env, *this, Value(), std::move(prepare), ingest, on_piece);
}

Napi::Value js_chat::start_generating(const Napi::CallbackInfo & info, generating_preparer && prepare) {
    Napi::Env env = info.Env();
    generation_options gen = guarded(env, [&] { return resolve_generation_options(options_arg(info, 1)); });
    Napi::Function on_piece = info.Length() > 2 && info[2].IsFunction() ? info[2].As<Napi::Function>() : Napi::Function();
    const bool pin = info.Length() > 3 && info[3].IsBoolean() && info[3].As<Napi::Boolean>().Value();
    return start_claimed(env, "a turn is already running on this chat; await it (or abort it) before sending again",
                         [prepare = std::move(prepare), gen = std::move(gen), pin](chat & s) mutable { return prepare(s, std::move(gen), pin); },
                         false, on_piece);
}

Napi::Value js_chat::js_send(const Napi::CallbackInfo & info) {
    require(info.Env());
    std::string text = string_arg(info, 0, "message");
    return start_generating(info, [text = std::move(text)](chat & s, generation_options gen, bool pin) { return s.prepare_turn(text, std::move(gen), pin); });
}

namespace {

// Tool results and calls cross as arrays of three strings each ([callId, name, content] and [id,
// name, arguments]), checked by TypeScript (src/local/chat.ts, src/server/chats.ts); their types again here.
std::vector<std::array<std::string, 3>> string_triples(const Napi::CallbackInfo & info, size_t i, const char * what) {
    Napi::Env env = info.Env();
    if (info.Length() <= i || !info[i].IsArray()) {
        throw_error(env, FML_ERR_INVALID_OPTION, std::string("expected an array of ") + what);
    }
    Napi::Array list = info[i].As<Napi::Array>();
    std::vector<std::array<std::string, 3>> out;
    for (uint32_t k = 0; k < list.Length(); ++k) {
        Napi::Value v = list[k];
        Napi::Array triple = v.IsArray() ? v.As<Napi::Array>() : Napi::Array::New(env);
        if (triple.Length() != 3 || !triple.Get((uint32_t) 0).IsString() || !triple.Get(1).IsString() || !triple.Get(2).IsString()) {
            throw_error(env, FML_ERR_INVALID_OPTION, std::string("expected three strings for each of ") + what);
        }
        out.push_back({ triple.Get((uint32_t) 0).As<Napi::String>().Utf8Value(), triple.Get(1).As<Napi::String>().Utf8Value(),
                        triple.Get(2).As<Napi::String>().Utf8Value() });
    }
    return out;
}

std::vector<tool_result> tool_results_arg(const Napi::CallbackInfo & info, size_t i) {
    std::vector<tool_result> out;
    for (auto & t : string_triples(info, i, "tool results")) out.push_back({ std::move(t[0]), std::move(t[1]), std::move(t[2]) });
    return out;
}

} // namespace

Napi::Value js_chat::js_send_tool_results(const Napi::CallbackInfo & info) {
    require(info.Env());
    std::vector<tool_result> results = tool_results_arg(info, 0);
    return start_generating(info, [results = std::move(results)](chat & s, generation_options gen, bool pin) {
        return s.prepare_tool_results(results, std::move(gen), pin);
    });
}

Napi::Value js_chat::js_ingest_tool_exchange(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    std::string user = string_arg(info, 0, "user message");
    std::vector<tool_result> results = tool_results_arg(info, 1);
    std::string reply = string_arg(info, 2, "assistant message");
    std::vector<tool_call> calls;
    for (auto & t : string_triples(info, 3, "tool calls")) calls.push_back({ std::move(t[0]), std::move(t[1]), std::move(t[2]) });
    return start_claimed(env, "a turn is running on this chat",
                         [user = std::move(user), results = std::move(results), reply = std::move(reply), calls = std::move(calls)](chat & s) {
                             return s.prepare_ingest_tools(user, results, reply, calls);
                         },
                         true, Napi::Function());
}

Napi::Value js_chat::js_parse_tool_reply(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    chat & s = require(env);
    const std::string reasoning = string_arg(info, 0, "reasoning");
    const std::string answer = string_arg(info, 1, "answer");
    const bool partial = info.Length() > 2 && info[2].IsBoolean() && info[2].As<Napi::Boolean>().Value();
    const tool_reply r = guarded(env, [&] { return s.parse_tool_reply(reasoning, answer, partial); });
    Napi::Object o = Napi::Object::New(env);
    o.Set("content", r.content);
    o.Set("toolCalls", tool_calls_to_js(env, r.calls));
    return o;
}

Napi::Value js_chat::js_ingest_exchange(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    std::string user = string_arg(info, 0, "user message");
    std::string reply = string_arg(info, 1, "assistant message");
    return start_claimed(env, "a turn is running on this chat",
                         [user = std::move(user), reply = std::move(reply)](chat & s) { return s.prepare_ingest(user, reply); }, true, Napi::Function());
}

Napi::Value js_chat::js_abort(const Napi::CallbackInfo & info) {
    if (core_) {
        core_->request_abort();
        rt_->wake();
    }
    return info.Env().Undefined();
}

Napi::Value js_chat::js_stats(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    chat & s = require(env);
    const cumulative_stats c = s.stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("turns", (double) c.turns);
    o.Set("tokensSeen", (double) c.tokens_seen);
    o.Set("tokensRetained", (double) s.retained_tokens());
    o.Set("tokensEvicted", (double) c.tokens_evicted);
    o.Set("evictions", (double) c.evictions);
    o.Set("fallbackCount", (double) c.fallback_count);
    o.Set("compactions", (double) c.compactions);
    o.Set("kvBytes", (double) s.kv_bytes());
    o.Set("summary", s.summary_text());
    return o;
}

Napi::Value js_chat::js_memory(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const std::vector<memory_entry> mem = require(env).memory();
    Napi::Array arr = Napi::Array::New(env, mem.size());
    for (size_t i = 0; i < mem.size(); ++i) {
        Napi::Object o = Napi::Object::New(env);
        o.Set("token", mem[i].token);
        o.Set("position", mem[i].pos);
        o.Set("turn", mem[i].turn);
        o.Set("role", token_role_name(mem[i].role));
        o.Set("pinned", mem[i].pinned);
        o.Set("score", mem[i].score);
        o.Set("text", mem[i].text);
        arr[i] = o;
    }
    return arr;
}

// The ledger's and llama.cpp's view of this chat's cache (the demo and tests check them against
// each other). Read on the scheduler thread, which owns the cache; waits for the current step.
Napi::Value js_chat::js_cache_state(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    chat & s = require(env);
    const runtime::cache_report snap = guarded(env, [&] { return rt_->cache_state(s); });
    Napi::Object o = Napi::Object::New(env);
    o.Set("ledgerTokens", (double) snap.view.ledger_tokens);
    o.Set("pinnedTokens", (double) snap.view.pinned_tokens);
    o.Set("cachePosMin", snap.view.cache_pos_min);
    o.Set("cachePosMax", snap.view.cache_pos_max);
    o.Set("positionsContiguous", snap.view.positions_contiguous);
    o.Set("positionsIncreasing", snap.view.positions_increasing);
    o.Set("ledgerPosFirst", snap.view.ledger_pos_first);
    o.Set("ledgerPosLast", snap.view.ledger_pos_last);
    o.Set("positionLimit", snap.view.position_limit);
    o.Set("contextSize", snap.view.cells);
    o.Set("carriedTokens", (double) snap.view.carried_tokens);
    o.Set("pendingSystemTokens", (double) snap.view.pending_system_tokens);
    o.Set("slot", snap.view.slot);
    o.Set("parked", snap.view.parked);
    o.Set("scratchPosMax", snap.view.scratch_pos_max);
    o.Set("windowIntact", snap.view.window_intact);
    o.Set("windowRepairs", (double) snap.view.window_repairs);
    o.Set("attentionRowsChecked", (double) snap.attention_rows_checked);
    o.Set("causalViolations", (double) snap.causal_violations);
    o.Set("signalLayoutMismatches", (double) snap.layout_mismatches);
    o.Set("kvBytes", (double) s.kv_bytes());
    return o;
}

Napi::Value js_chat::js_count_turn_tokens(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    chat & s = require(env);
    const std::string text = string_arg(info, 0, "text");
    return Napi::Number::New(env, (double) guarded(env, [&] { return s.count_turn_tokens(text); }));
}

Napi::Value js_chat::js_reset(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    chat & s = require(env);
    if (s.busy().load()) {
        throw_error(env, FML_ERR_BUSY, "cannot reset while a turn is running");
    }
    s.reset();
    return env.Undefined();
}

Napi::Value js_chat::js_dispose(const Napi::CallbackInfo & info) {
    if (core_) {
        if (core_->busy().load()) {
            core_->request_abort();
            rt_->wake();
            dispose_pending_ = true;   // the running operation releases the chat when it finishes
        } else {
            release();
        }
    }
    return info.Env().Undefined();
}

Napi::Value js_chat::js_resolved_options(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    return from_option_map(env, chat_options_to_map(require(env).options(), false));
}

// ---- checkpoints ----

namespace {

// Saves a chat, to a file (`path`) or as bytes (the promise's Uint8Array): the scheduler snapshots it
// between steps (applying a pending K-shift first; the ledger kind is read without it), this worker
// thread encodes (and writes) it. The chat is claimed busy until then.
class save_checkpoint_worker : public promise_worker {
public:
    save_checkpoint_worker(Napi::Env env, js_chat & jc, Napi::Object chat_obj, std::string path, bool ledger_only, std::string transcript)
        : promise_worker(env), chat_(jc), rt_(jc.rt()), core_(jc.core()), path_(std::move(path)), ledger_only_(ledger_only),
          transcript_(std::move(transcript)) {
        chat_ref_ = Napi::Persistent(chat_obj);
    }
    void OnOK() override { chat_.finished(); promise_worker::OnOK(); }
    void OnError(const Napi::Error & e) override { chat_.finished(); promise_worker::OnError(e); }
protected:
    void run() override {
        // The ledger kind is read without waiting for the scheduler's current step (a server turn's
        // write-through would otherwise wait for other chats' decodes): runtime::export_chat.
        chat_state state = rt_->export_chat(*core_, !ledger_only_);
        state.transcript = std::move(transcript_);
        if (path_.empty()) {
            bytes_ = encode_checkpoint(core_->model_fingerprint(), state, ledger_only_);
        } else {
            write_checkpoint(path_, core_->model_fingerprint(), state);
        }
    }
    Napi::Value result(Napi::Env env) override {
        if (!path_.empty()) {
            return env.Undefined();
        }
        Napi::Uint8Array out = Napi::Uint8Array::New(env, bytes_.size());
        std::copy(bytes_.begin(), bytes_.end(), out.Data());
        return out;
    }
private:
    js_chat & chat_;
    Napi::ObjectReference chat_ref_;
    std::shared_ptr<runtime> rt_;
    std::shared_ptr<chat> core_;
    std::string path_;
    bool ledger_only_;
    std::string transcript_;
    std::vector<uint8_t> bytes_;
};

// Restores a chat: the file is read and validated here, the KV state goes into a slot on the
// scheduler (checked against the ledger there), or stays parked when every slot is busy.
class load_checkpoint_worker : public promise_worker {
public:
    load_checkpoint_worker(Napi::Env env, std::shared_ptr<runtime> rt, int32_t threads_override)
        : promise_worker(env), rt_(std::move(rt)), threads_(threads_override) {}
    std::string path;
    std::vector<uint8_t> bytes;   // instead of a path
protected:
    void run() override {
        const std::shared_ptr<fml_model> & model = rt_->model();
        chat_state state = path.empty() ? decode_checkpoint(bytes.data(), bytes.size(), model->info().fingerprint)
                                        : read_checkpoint(path, model->info().fingerprint);
        bytes.clear();
        if (threads_ > 0) {
            state.options.threads = threads_;
        }
        try {
            core_ = std::make_shared<chat>(model, state.options, rt_->options().threads);
        } catch (const fml_error & e) {
            throw fml_error(FML_ERR_CHECKPOINT_CORRUPT, std::string("the checkpoint's options are not valid for this model: ") + e.what());
        }
        core_->adopt_state(std::move(state));
        rt_->place_restored(*core_);
    }
    Napi::Value result(Napi::Env env) override {
        restored_chat r{ rt_, core_ };
        auto holder = Napi::External<restored_chat>::New(env, &r);
        return env.GetInstanceData<addon_data>()->chat_ctor.New({ holder });
    }
private:
    std::shared_ptr<runtime> rt_;
    int32_t threads_;
    std::shared_ptr<chat> core_;
};

} // namespace

// saveCheckpoint(path, transcript) / checkpoint(ledgerOnly, transcript) -> Uint8Array
Napi::Value js_chat::js_save_checkpoint(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    const std::string path = string_arg(info, 0, "path");
    const std::string transcript = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
    claim(env, "a turn is running on this chat; save the checkpoint after it");
    return queue_worker<save_checkpoint_worker>(env, *this, Value(), path, false, transcript);
}

Napi::Value js_chat::js_checkpoint(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    const bool ledger_only = info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value();
    const std::string transcript = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
    claim(env, "a turn is running on this chat; take the checkpoint after it");
    return queue_worker<save_checkpoint_worker>(env, *this, Value(), std::string(), ledger_only, transcript);
}

Napi::Value js_chat::js_restored_transcript(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    return Napi::String::New(env, require(env).restored_transcript());
}

namespace {

uint32_t turn_arg(const Napi::CallbackInfo & info) {
    if (info.Length() < 1 || !info[0].IsNumber()) {
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, "expected a turn number");
    }
    const double t = info[0].As<Napi::Number>().DoubleValue();
    if (!(t >= 0 && t <= 4294967295.0) || t != (double) (uint32_t) t) {
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, "a turn number is a non-negative integer");
    }
    return (uint32_t) t;
}

// Evicts one turn in place on the scheduler thread (the cache is its); the chat is claimed busy until then.
class forget_worker : public promise_worker {
public:
    forget_worker(Napi::Env env, js_chat & jc, Napi::Object chat_obj, uint32_t turn)
        : promise_worker(env), chat_(jc), rt_(jc.rt()), core_(jc.core()), turn_(turn) {
        chat_ref_ = Napi::Persistent(chat_obj);
    }
    void OnOK() override { chat_.finished(); promise_worker::OnOK(); }
    void OnError(const Napi::Error & e) override { chat_.finished(); promise_worker::OnError(e); }
protected:
    void run() override {
        evicted_ = rt_->forget_turn(*core_, turn_);
    }
    Napi::Value result(Napi::Env env) override { return Napi::Number::New(env, (double) evicted_); }
private:
    js_chat & chat_;
    Napi::ObjectReference chat_ref_;
    std::shared_ptr<runtime> rt_;
    std::shared_ptr<chat> core_;
    uint32_t turn_;
    int64_t evicted_ = 0;
};

} // namespace

// A synchronous ledger operation of an idle chat: claimed for its duration, errors typed.
template <typename F>
Napi::Value idle_ledger_call(Napi::Env env, js_chat & jc, const char * busy_message, F fn) {
    jc.claim(env, busy_message);
    size_t n = 0;
    try {
        n = guarded(env, [&] { return fn(*jc.core()); });
    } catch (...) {
        jc.finished();
        throw;
    }
    jc.finished();
    return Napi::Number::New(env, (double) n);
}

Napi::Value js_chat::js_pin(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    const uint32_t turn = turn_arg(info);
    const bool with_reply = info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
    return idle_ledger_call(env, *this, "a turn is running on this chat; pin after it", [&](chat & s) { return s.pin_turn(turn, with_reply); });
}

Napi::Value js_chat::js_unpin(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    const uint32_t turn = turn_arg(info);
    return idle_ledger_call(env, *this, "a turn is running on this chat; unpin after it", [&](chat & s) { return s.unpin_turn(turn); });
}

Napi::Value js_chat::js_pins(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const auto pins = require(env).pinned_turns();
    Napi::Array arr = Napi::Array::New(env, pins.size());
    for (size_t i = 0; i < pins.size(); ++i) {
        Napi::Object o = Napi::Object::New(env);
        o.Set("turn", pins[i].first);
        o.Set("tokens", (double) pins[i].second);
        arr[(uint32_t) i] = o;
    }
    return arr;
}

Napi::Value js_chat::js_forget(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    require(env);
    const uint32_t turn = turn_arg(info);
    claim(env, "a turn is running on this chat; forget after it");
    return queue_worker<forget_worker>(env, *this, Value(), turn);
}

Napi::Value js_load_chat(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsObject()) {
        throw_error(env, FML_ERR_INVALID_OPTION, "loadChat(model, path, threads)");
    }
    js_model * m = unwrap_tagged<js_model>(env, info[0], MODEL_TYPE_TAG, "NativeModel");
    // A path, or the checkpoint's bytes (a Uint8Array).
    std::string path;
    std::vector<uint8_t> bytes;
    if (info[1].IsTypedArray() && info[1].As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array) {
        Napi::Uint8Array a = info[1].As<Napi::Uint8Array>();
        bytes.assign(a.Data(), a.Data() + a.ByteLength());
    } else {
        path = string_arg(info, 1, "path");
    }
    // An override of the stored thread count, validated like createChat's.
    int32_t threads = 0;
    if (info.Length() > 2 && !info[2].IsUndefined()) {
        const option_map o = { { "threads", to_option_value(info[2]) } };
        threads = guarded(env, [&] { return resolve_chat_options(o, 1, true).threads; });
        if (threads > m->load_options.threads) {
            throw_error(env, FML_ERR_INVALID_OPTION, "Expected an integer between 1 and " + std::to_string(m->load_options.threads) +
                        " (the model's thread budget) for threads but received number " + std::to_string(threads));
        }
    }
    auto * w = new load_checkpoint_worker(env, m->require_runtime(env), threads);
    w->path = path;
    w->bytes = std::move(bytes);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
}

} // namespace fml
