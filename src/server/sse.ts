/**
 * A streamed completion as server-sent events: `chat.completion.chunk` objects, an error event when a
 * turn fails after the stream started, and `data: [DONE]`. The headers go out with the first chunk,
 * so an error before it (a prompt too large) is still a plain 4xx.
 */
import type { ServerResponse } from 'node:http';
import type { FastifyReply } from 'fastify';

export interface ChunkBase {
  id: string;
  created: number;
  model: string;
  system_fingerprint: string;
}

export class EventStream {
  #started = false;
  readonly #res: ServerResponse;

  constructor(
    private readonly reply: FastifyReply,
    private readonly base: ChunkBase,
    private readonly headers: () => Record<string, string>,
  ) {
    this.#res = reply.raw;
  }

  get started(): boolean {
    return this.#started;
  }

  /** Sends the headers and the assistant role chunk (once). */
  start(): void {
    if (this.#started) return;
    this.#started = true;
    this.reply.hijack();
    this.#res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', ...this.headers() });
    this.chunk({ role: 'assistant', content: '' }, null);
  }

  write(data: unknown): void {
    if (!this.#res.destroyed && !this.#res.writableEnded) this.#res.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  chunk(delta: Record<string, unknown>, finish: string | null, extra: Record<string, unknown> = {}): void {
    this.write({ ...this.base, object: 'chat.completion.chunk', choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], ...extra });
  }

  /** An error after the stream started: an error event (OpenAI's error shape), then the end. */
  fail(error: { message: string; type: string; param: string | null; code: string | null }): void {
    this.write({ error });
    this.end();
  }

  end(): void {
    this.#res.end('data: [DONE]\n\n');
  }
}
