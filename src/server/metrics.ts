/**
 * The server's own Prometheus metrics (next to the chats' telemetry, shared/prometheus.ts): requests,
 * sessions, admission and the session store.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export interface ServerMetrics {
  requests: Counter<'route' | 'status'>;
  sessionEvents: Counter<'event'>;
  storeWrites: Histogram<'kind'>;
}

export function createServerMetrics(registry: Registry, read: {
  sessions(): { live: number; stored: number };
  decoding(): number;
  queued(): number;
}): ServerMetrics {
  new Gauge({
    name: 'finite_memory_server_sessions', help: 'Sessions live in this process and held by the session store', labelNames: ['state'] as const, registers: [registry],
    collect() {
      const c = read.sessions();
      this.set({ state: 'live' }, c.live);
      this.set({ state: 'stored' }, c.stored);
    },
  });
  new Gauge({ name: 'finite_memory_server_decoding', help: 'Requests holding a decode slot', registers: [registry], collect() { this.set(read.decoding()); } });
  new Gauge({ name: 'finite_memory_server_queued', help: 'Requests waiting for a decode slot', registers: [registry], collect() { this.set(read.queued()); } });
  return {
    requests: new Counter({ name: 'finite_memory_server_requests_total', help: 'HTTP requests by route and status', labelNames: ['route', 'status'] as const, registers: [registry] }),
    sessionEvents: new Counter({
      name: 'finite_memory_server_session_events_total', help: 'Sessions created, written back and freed (checkpointed), restored, superseded, caught up, expired',
      labelNames: ['event'] as const, registers: [registry],
    }),
    storeWrites: new Histogram({
      name: 'finite_memory_server_store_write_seconds', help: 'Writes to the session store: a turn\'s ledger (write-through, before its response completes) and full checkpoints (write-back)',
      labelNames: ['kind'] as const, buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1], registers: [registry],
    }),
  };
}
