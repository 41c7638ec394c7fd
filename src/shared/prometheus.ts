/**
 * Prometheus metrics on prom-client, as a telemetry adapter:
 *   const telemetry = createPrometheusTelemetry({ registry });
 *   model.createChat({ ..., telemetry });
 *   registry.metrics()  // text exposition
 * Histograms (seconds): turn latency, prefill, decode, policy time, compaction time. Counters: turns,
 * tokens in/out, evicted tokens, evictions, compactions, fallbacks, errors. Gauges (sum over live
 * chats): retained tokens, KV bytes.
 * Everything is labelled by policy.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Telemetry } from './telemetry.js';

export interface PrometheusTelemetryOptions {
  /** Registry to register the metrics in (default: a new one, see `.registry`). */
  registry?: Registry;
  /** Metric name prefix. Default 'finite_memory_'. */
  prefix?: string;
}

export interface PrometheusTelemetry extends Telemetry {
  readonly registry: Registry;
}

// Up to 5 minutes: a CPU turn allowed 1,024 new tokens on a large model runs well past 30 s (it fell in +Inf).
const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];

export function createPrometheusTelemetry(options: PrometheusTelemetryOptions = {}): PrometheusTelemetry {
  const registry = options.registry ?? new Registry();
  const p = options.prefix ?? 'finite_memory_';
  const labelNames = ['policy'] as const;
  const registers = [registry];
  const hist = (name: string, help: string) => new Histogram({ name: p + name, help, labelNames, buckets: LATENCY_BUCKETS, registers });
  const counter = (name: string, help: string) => new Counter({ name: p + name, help, labelNames, registers });
  const turnSeconds = hist('turn_latency_seconds', 'Latency of a whole turn (eviction, prefill, generation)');
  const prefillSeconds = hist('prefill_seconds', 'Prefill time per turn (new tokens only)');
  const decodeSeconds = hist('decode_seconds', 'Generation time per turn');
  const policySeconds = hist('policy_seconds', 'Time a policy spent choosing tokens to evict, per eviction');
  const compactSeconds = hist('compaction_seconds', 'Time the compactions of a turn took (an M-RoPE key rotation, or a re-prefill where keys cannot move; llama.cpp\'s K-shift runs inside the next decode)');
  const turns = counter('turns_total', 'Turns completed');
  const tokensIn = counter('tokens_in_total', 'Tokens prefilled');
  const tokensOut = counter('tokens_out_total', 'Tokens generated');
  const evicted = counter('evicted_tokens_total', 'Tokens evicted from KV caches');
  const evictions = counter('evictions_total', 'Eviction events');
  const fallbacks = counter('fallbacks_total', 'Evictions where the latency guard fell back to sliding');
  const compactions = counter('compactions_total', 'Times a chat numbered its positions 0..n-1 again (at its position limit, or every eviction with positions compact)');
  const grammarPasses = counter('grammar_passes_total', "Passes of a send's grammar over the vocabulary (the sampler's choice did not fit)");
  const grammarSeconds = counter('grammar_seconds_total', 'Time those passes took');
  const errors = new Counter({ name: p + 'errors_total', help: 'Turn and hook errors', labelNames: ['source'] as const, registers });
  const retained = new Gauge({ name: p + 'retained_tokens', help: 'Tokens in KV caches now (sum over live chats)', labelNames, registers });
  const kvBytes = new Gauge({ name: p + 'kv_bytes', help: 'KV cache bytes held by retained tokens (sum over live chats)', labelNames, registers });

  // Per-chat last values, so gauges are sums over live chats.
  const live = new Map<string, { policy: string; retained: number; kvBytes: number }>();
  const refreshGauges = (policy: string) => {
    let r = 0;
    let k = 0;
    for (const c of live.values()) if (c.policy === policy) { r += c.retained; k += c.kvBytes; }
    retained.set({ policy }, r);
    kvBytes.set({ policy }, k);
  };

  return {
    registry,
    onTurn(e) {
      const labels = { policy: e.policy };
      turnSeconds.observe(labels, e.stats.latencyMs / 1000);
      prefillSeconds.observe(labels, e.stats.prefillMs / 1000);
      decodeSeconds.observe(labels, e.stats.decodeMs / 1000);
      turns.inc(labels);
      tokensIn.inc(labels, e.stats.promptTokens);
      tokensOut.inc(labels, e.stats.generatedTokens);
      if (e.stats.grammarPasses > 0) {
        grammarPasses.inc(labels, e.stats.grammarPasses);
        grammarSeconds.inc(labels, e.stats.grammarMs / 1000);
      }
      if (e.stats.compactions > 0) {
        compactions.inc(labels, e.stats.compactions);
        compactSeconds.observe(labels, e.stats.compactMs / 1000);
      }
      live.set(e.chatId, { policy: e.policy, retained: e.chat.tokensRetained, kvBytes: e.chat.kvBytes });
      refreshGauges(e.policy);
    },
    onEviction(e) {
      const labels = { policy: e.policy };
      policySeconds.observe(labels, e.policyMs / 1000);
      evicted.inc(labels, e.evictedTokens);
      evictions.inc(labels);
      if (e.fallback) fallbacks.inc(labels);
    },
    onError(_err, ctx) {
      errors.inc({ source: ctx.source });
    },
    onClose(chatId) {
      const c = live.get(chatId);
      if (c) {
        live.delete(chatId);
        refreshGauges(c.policy);
      }
    },
  };
}
