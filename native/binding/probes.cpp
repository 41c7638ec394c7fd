// Probes for tests and benchmarks, linked into the test build of the addon only (the shipped one
// links binding/no-probes.cpp). Exported as `probes`: functions that take a NativeChat or model.
// Synchronous on purpose: they wait for the chat's scheduler between steps.
#include <napi.h>

#include "binding/chat.h"
#include "binding/common.h"
#include "binding/model.h"
#include "binding/options.h"
#include "model/model.h"
#include "probes/evict-bench.h"
#include "probes/swa-cost.h"
#include "probes/chat-probes.h"

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

namespace fml {

namespace {

js_chat & chat_arg(const Napi::CallbackInfo & info) {
    return *unwrap_tagged<js_chat>(info.Env(), info[0], CHAT_TYPE_TAG, "NativeChat");
}

// Runs `fn(chat, engine)` on the chat's scheduler; the chat must be idle.
template <typename F>
auto on_scheduler(const Napi::CallbackInfo & info, F fn) -> decltype(fn(std::declval<chat &>(), std::declval<engine &>())) {
    Napi::Env env = info.Env();
    js_chat & jc = chat_arg(info);
    chat & s = jc.require(env);
    if (s.busy().load()) {
        throw_error(env, FML_ERR_BUSY, "chat is busy");
    }
    return guarded(env, [&] { return jc.rt()->run_sync([&] { return fn(s, jc.rt()->engine_for(s)); }); });
}

Napi::Float32Array floats(Napi::Env env, const std::vector<float> & v) {
    Napi::Float32Array arr = Napi::Float32Array::New(env, v.size());
    std::copy(v.begin(), v.end(), arr.Data());
    return arr;
}

Napi::Value probe_logits(const Napi::CallbackInfo & info) {
    const int32_t token = info[1].ToNumber().Int32Value();
    return floats(info.Env(), on_scheduler(info, [&](chat & s, engine & e) { return chat_probes::probe_logits(s, e, token); }));
}

Napi::Value recurrent_state(const Napi::CallbackInfo & info) {
    const std::vector<uint8_t> bytes = on_scheduler(info, [&](chat & s, engine & e) { return chat_probes::recurrent_state(s, e); });
    Napi::Uint8Array arr = Napi::Uint8Array::New(info.Env(), bytes.size());
    std::copy(bytes.begin(), bytes.end(), arr.Data());
    return arr;
}

Napi::Value summary_prompt(const Napi::CallbackInfo & info) {
    const std::vector<int32_t> tokens = on_scheduler(info, [](chat & s, engine &) { return chat_probes::summary_prompt(s); });
    Napi::Int32Array arr = Napi::Int32Array::New(info.Env(), tokens.size());
    std::copy(tokens.begin(), tokens.end(), arr.Data());
    return arr;
}

Napi::Value tool_frames_fast(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const int fast = on_scheduler(info, [](chat & s, engine &) { return chat_probes::tool_frames_fast(s); });
    return fast < 0 ? env.Null() : Napi::Boolean::New(env, fast == 1);
}

// holdPrepare(chat, timeoutMs) -> release(): the chat's next turn preparations wait until release()
// is called; one still waiting after timeoutMs fails its turn (INTERNAL). A preparation on the JS
// thread could only time out: JS cannot call release() while it runs.
Napi::Value hold_prepare(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    js_chat & jc = chat_arg(info);
    chat & s = jc.require(env);
    if (s.busy().load()) {
        throw_error(env, FML_ERR_BUSY, "chat is busy");
    }
    const auto timeout = std::chrono::milliseconds(info[1].ToNumber().Int64Value());
    struct gate {
        std::mutex mu;
        std::condition_variable cv;
        bool open = false;
    };
    auto g = std::make_shared<gate>();
    chat_probes::set_prepare_hook(s, [g, timeout] {
        std::unique_lock<std::mutex> lock(g->mu);
        if (!g->cv.wait_for(lock, timeout, [&] { return g->open; })) {
            throw fml_error(FML_ERR_INTERNAL, "the turn's preparation was held and never released (it blocked the JS thread)");
        }
    });
    return Napi::Function::New(env, [g](const Napi::CallbackInfo &) {
        {
            std::lock_guard<std::mutex> lock(g->mu);
            g->open = true;
        }
        g->cv.notify_all();
    });
}

Napi::Value shift_positions(const Napi::CallbackInfo & info) {
    const int32_t delta = info[1].ToNumber().Int32Value();
    on_scheduler(info, [&](chat & s, engine & e) { chat_probes::shift_positions(s, e, delta); return 0; });
    return info.Env().Undefined();
}

Napi::Value window_round_trip(const Napi::CallbackInfo & info) {
    on_scheduler(info, [&](chat & s, engine & e) { chat_probes::window_round_trip(s, e); return 0; });
    return info.Env().Undefined();
}

Napi::Value evaluate_tokens(const Napi::CallbackInfo & info) {
    if (info.Length() < 3 || !info[1].IsTypedArray()) {
        throw_error(info.Env(), FML_ERR_INVALID_OPTION, "evaluateTokens(chat, Int32Array, chunk)");
    }
    Napi::Int32Array arr = info[1].As<Napi::Int32Array>();
    std::vector<int32_t> toks(arr.Data(), arr.Data() + arr.ElementLength());
    const size_t chunk = (size_t) info[2].ToNumber().Int64Value();
    return floats(info.Env(), on_scheduler(info, [&](chat & s, engine & e) { return chat_probes::evaluate_tokens(s, e, toks, chunk); }));
}

Napi::Value replay_history(const Napi::CallbackInfo & info) {
    return Napi::Number::New(info.Env(), on_scheduler(info, [](chat & s, engine & e) { return chat_probes::replay_history(s, e); }));
}

Napi::Value plain_decode(const Napi::CallbackInfo & info) {
    const int32_t n = info[1].ToNumber().Int32Value();
    return Napi::Number::New(info.Env(), on_scheduler(info, [&](chat & s, engine & e) { return chat_probes::plain_decode(s, e, n); }));
}

// engineStats(chat, own?) -> the figures of every engine of the chat's model, or (own) of its own engine
Napi::Value engine_stats_of(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    js_chat & jc = chat_arg(info);
    jc.require(env);
    const bool own = info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
    const engine_stats st = guarded(env, [&] { return own ? jc.rt()->stats_of(*jc.core()) : jc.rt()->stats(); });
    Napi::Object o = Napi::Object::New(env);
    o.Set("steps", (double) st.steps);
    o.Set("decodes", (double) st.decodes);
    o.Set("sharedDecodes", (double) st.shared_decodes);
    o.Set("tokens", (double) st.tokens);
    o.Set("parked", (double) st.parked);
    o.Set("restored", (double) st.restored);
    o.Set("grown", (double) st.grown);
    o.Set("shiftSteps", (double) st.shift_steps);
    o.Set("deferredMoves", (double) st.deferred_moves);
    o.Set("rotatedMoves", (double) st.rotated_moves);
    o.Set("sideTokens", (double) st.side_tokens);
    o.Set("slots", (double) st.slots);
    o.Set("engines", (double) st.engines);
    o.Set("threadPools", (double) st.thread_pools);
    return o;
}

// planEviction(policyOptions, entries[{pinned}], need, want) -> { ranges: [[begin, end], ...], summarize }
// Runs a policy on a synthetic ledger, so policies are testable without a model or a KV cache.
Napi::Value plan_eviction(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const policy_options opts = guarded(env, [&] { return resolve_chat_options(options_arg(info, 0), 1, true).policy; });
    if (info.Length() < 4 || !info[1].IsArray()) {
        throw_error(env, FML_ERR_INVALID_OPTION, "planEviction(options, entries, need, want)");
    }
    const auto number = [](const Napi::Object & o, const char * key, double def) {
        Napi::Value v = o.Get(key);
        return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : def;
    };
    Napi::Array entries = info[1].As<Napi::Array>();
    token_ledger ledger;
    size_t dim = 0;
    if (entries.Length() > 0) {
        Napi::Value emb = entries.Get((uint32_t) 0).As<Napi::Object>().Get("embedding");
        if (emb.IsArray()) {
            dim = emb.As<Napi::Array>().Length();
            ledger.set_embedding_dim(dim);
        }
    }
    for (uint32_t i = 0; i < entries.Length(); ++i) {
        Napi::Object e = entries.Get(i).As<Napi::Object>();
        const token_role role = (token_role) (int) number(e, "role", TOKEN_ROLE_USER);
        ledger.append((int32_t) number(e, "token", 0), (uint32_t) number(e, "turn", 0), role, e.Get("pinned").ToBoolean(), e.Get("sentenceEnd").ToBoolean());
        ledger.at(i).score[SCORE_IMPORTANCE] = (float) number(e, "score", 0.0);
        Napi::Value emb = e.Get("embedding");
        if (dim > 0 && emb.IsArray() && emb.As<Napi::Array>().Length() == dim) {
            Napi::Array a = emb.As<Napi::Array>();
            float * out = ledger.embedding_mut(i);
            for (uint32_t k = 0; k < dim; ++k) {
                out[k] = (float) a.Get(k).ToNumber().DoubleValue();
            }
        }
    }
    const eviction_request req{ (size_t) info[2].ToNumber().Int64Value(), (size_t) info[3].ToNumber().Int64Value() };
    const eviction_plan plan = guarded(env, [&] { return make_policy(opts)->plan(ledger, req); });
    Napi::Object out = Napi::Object::New(env);
    out.Set("ranges", ranges_to_js(env, plan.ranges));
    out.Set("summarize", plan.summarize);
    return out;
}

class evict_bench_worker : public promise_worker {
public:
    evict_bench_worker(Napi::Env env, std::shared_ptr<fml_model> model, int32_t context, std::vector<int32_t> counts, int32_t reps, int32_t threads)
        : promise_worker(env), model_(std::move(model)), context_(context), counts_(std::move(counts)), reps_(reps), threads_(threads) {}
protected:
    void run() override { result_ = run_evict_bench(*model_, context_, counts_, reps_, threads_); }
    Napi::Value result(Napi::Env env) override {
        Napi::Object o = Napi::Object::New(env);
        o.Set("context", result_.context);
        o.Set("fillMs", result_.fill_ms);
        o.Set("kvBytes", result_.kv_bytes);
        o.Set("kBytes", result_.k_bytes);
        Napi::Array cases = Napi::Array::New(env, result_.cases.size());
        for (size_t i = 0; i < result_.cases.size(); ++i) {
            const evict_bench_case & c = result_.cases[i];
            Napi::Object x = Napi::Object::New(env);
            x.Set("pattern", c.pattern);
            x.Set("positions", c.positions);
            x.Set("evicted", c.evicted);
            x.Set("rmAddMs", c.rm_add_ms);
            x.Set("nextDecodeMs", c.next_decode_ms);
            x.Set("plainDecodeMs", c.plain_decode_ms);
            x.Set("seqRmCalls", c.seq_rm_calls);
            x.Set("seqAddCalls", c.seq_add_calls);
            cases[(uint32_t) i] = x;
        }
        o.Set("cases", cases);
        return o;
    }
private:
    std::shared_ptr<fml_model> model_;
    int32_t context_;
    std::vector<int32_t> counts_;
    int32_t reps_;
    int32_t threads_;
    evict_bench_result result_;
};

// benchEvict(model, context, evictCounts, reps, threads) -> Promise
Napi::Value bench_evict(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto model = unwrap_tagged<js_model>(env, info[0], MODEL_TYPE_TAG, "NativeModel")->require(env);
    std::vector<int32_t> counts;
    Napi::Array a = info[2].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
        counts.push_back(a.Get(i).ToNumber().Int32Value());
    }
    return queue_worker<evict_bench_worker>(env, model, info[1].ToNumber().Int32Value(), counts, info[3].ToNumber().Int32Value(),
                                            info[4].ToNumber().Int32Value());
}

// benchPolicyPlan(options, n, want, embdDim, reps) -> median ms
Napi::Value bench_policy_plan(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    const policy_options opts = guarded(env, [&] { return resolve_chat_options(options_arg(info, 0), 1, true).policy; });
    return Napi::Number::New(env, guarded(env, [&] {
        return run_policy_plan_bench(opts, info[1].ToNumber().Int32Value(), info[2].ToNumber().Int32Value(),
                                     info[3].ToNumber().Int32Value(), info[4].ToNumber().Int32Value());
    }));
}

Napi::Value bench_memcpy(const Napi::CallbackInfo & info) {
    return Napi::Number::New(info.Env(), run_memcpy_bench((size_t) info[0].ToNumber().Int64Value(), info[1].ToNumber().Int32Value()));
}

// swaCost(model, context, steps, threads) -> Promise<{ context, filled, off, on, window* }>
class swa_cost_worker : public promise_worker {
public:
    swa_cost_worker(Napi::Env env, std::shared_ptr<fml_model> model, int32_t context, int32_t steps, int32_t threads)
        : promise_worker(env), model_(std::move(model)), context_(context), steps_(steps), threads_(threads) {}
protected:
    void run() override { r_ = run_swa_cost(*model_, context_, steps_, threads_); }
    Napi::Value result(Napi::Env env) override {
        auto side = [&](const swa_cost_side & s) {
            Napi::Object o = Napi::Object::New(env);
            o.Set("canShift", s.can_shift);
            o.Set("kvBytes", s.kv_bytes);
            o.Set("decodeMs", s.decode_ms);
            return o;
        };
        Napi::Object o = Napi::Object::New(env);
        o.Set("context", r_.context);
        o.Set("filled", r_.filled);
        o.Set("off", side(r_.off));
        o.Set("on", side(r_.on));
        o.Set("windowBytes", r_.window_bytes);
        o.Set("windowSaveMs", r_.window_save_ms);
        o.Set("windowRestoreMs", r_.window_restore_ms);
        o.Set("prefillTokens", r_.prefill_tokens);
        o.Set("prefillMs", r_.prefill_ms);
        return o;
    }
private:
    std::shared_ptr<fml_model> model_;
    int32_t context_;
    int32_t steps_;
    int32_t threads_;
    swa_cost_result r_;
};

Napi::Value swa_cost(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    auto model = unwrap_tagged<js_model>(env, info[0], MODEL_TYPE_TAG, "NativeModel")->require(env);
    return queue_worker<swa_cost_worker>(env, model, info[1].ToNumber().Int32Value(), info[2].ToNumber().Int32Value(), info[3].ToNumber().Int32Value());
}

// Live native objects (tests check that finalizers free what GC collects).
Napi::Value live_objects(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("chats", (double) chat::live_count());
    o.Set("models", (double) fml_model::live_count());
    o.Set("runtimes", (double) runtime::live_count());
    return o;
}

} // namespace

void register_probes(Napi::Env env, Napi::Object exports) {
    enable_test_options();   // the test build accepts the chat options' test hooks
    Napi::Object p = Napi::Object::New(env);
    p.Set("probeLogits", Napi::Function::New(env, probe_logits));
    p.Set("recurrentState", Napi::Function::New(env, recurrent_state));
    p.Set("summaryPrompt", Napi::Function::New(env, summary_prompt));
    p.Set("toolFramesFast", Napi::Function::New(env, tool_frames_fast));
    p.Set("holdPrepare", Napi::Function::New(env, hold_prepare));
    p.Set("shiftPositions", Napi::Function::New(env, shift_positions));
    p.Set("windowRoundTrip", Napi::Function::New(env, window_round_trip));
    p.Set("evaluateTokens", Napi::Function::New(env, evaluate_tokens));
    p.Set("replayHistory", Napi::Function::New(env, replay_history));
    p.Set("plainDecode", Napi::Function::New(env, plain_decode));
    p.Set("engineStats", Napi::Function::New(env, engine_stats_of));
    p.Set("planEviction", Napi::Function::New(env, plan_eviction));
    p.Set("benchEvict", Napi::Function::New(env, bench_evict));
    p.Set("benchPolicyPlan", Napi::Function::New(env, bench_policy_plan));
    p.Set("benchMemcpy", Napi::Function::New(env, bench_memcpy));
    p.Set("swaCost", Napi::Function::New(env, swa_cost));
    p.Set("liveObjects", Napi::Function::New(env, live_objects));
    exports.Set("probes", p);
}

} // namespace fml
