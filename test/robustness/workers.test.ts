// Runtimes belong to the Node environment that created them: a Worker that loads the addon, chats and
// exits (or is terminated mid-turn) stops only its own models; the main thread's keep working. The
// Workers run the built package (dist/, which `npm test` builds first).
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Chat, type Model } from '../../src/index.ts';
import { getProbes } from '../../src/local/binding.ts';
import { testModelPath, THREADS } from '../helpers.ts';

const DIST = join(import.meta.dirname, '..', '..', 'dist', 'index.js');

// CommonJS, evaluated in the Worker: load the package, chat, report, then exit (or be terminated).
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
(async () => {
  const { loadModel } = await import(workerData.dist);
  const model = await loadModel(workerData.model, { threads: 1 });
  const chat = model.createChat({ maxTokens: 64 });
  parentPort.postMessage({ started: true });
  const r = await chat.send('hello from a worker', { maxNewTokens: workerData.tokens, ignoreEos: true });
  parentPort.postMessage({ generated: r.stats.generatedTokens });
  if (workerData.dispose) { chat.dispose(); model.dispose(); }
})().catch((e) => parentPort.postMessage({ error: String((e && e.stack) || e) }));
`;

interface Run { worker: Worker; messages: Record<string, unknown>[]; exited: Promise<number>; started: Promise<void> }

function startWorker(model: string, tokens: number, dispose: boolean): Run {
  const worker = new Worker(WORKER, { eval: true, workerData: { dist: pathToFileURL(DIST).href, model, tokens, dispose } });
  const messages: Record<string, unknown>[] = [];
  let onStart: () => void = () => {};
  const started = new Promise<void>((r) => (onStart = r));
  worker.on('message', (m: Record<string, unknown>) => {
    messages.push(m);
    if (m.started) onStart();
  });
  const exited = new Promise<number>((r) => worker.once('exit', r));
  return { worker, messages, exited, started };
}

describe.skipIf(!existsSync(DIST))('models in Workers', () => {
  let model: Model;
  let chat: Chat;
  const path = testModelPath();
  beforeAll(async () => {
    model = await loadModel(path, { threads: THREADS });
    chat = model.createChat({ maxTokens: 64 });
    await chat.send('the main thread is here', { maxNewTokens: 4 });
  });
  afterAll(() => model?.dispose());

  it('two Workers that chat and exit leave the main thread\'s models working', async () => {
    const before = getProbes().liveObjects();
    const runs = [startWorker(path, 8, false), startWorker(path, 8, false)];
    // The main thread chats meanwhile.
    const during = await chat.send('while the Workers run', { maxNewTokens: 8, ignoreEos: true });
    expect(during.stats.generatedTokens).toBe(8);
    for (const r of runs) expect(await r.exited).toBe(0);
    for (const r of runs) expect(r.messages).toContainEqual({ generated: 8 });
    const after = await chat.send('after the Workers exited', { maxNewTokens: 4, ignoreEos: true });
    expect(after.stats.generatedTokens).toBe(4);
    const other = model.createChat({ maxTokens: 64 });
    expect((await other.send('a new chat too', { maxNewTokens: 2, ignoreEos: true })).stats.generatedTokens).toBe(2);
    other.dispose();
    expect(getProbes().liveObjects().runtimes).toBe(before.runtimes);
  });

  it('a Worker terminated mid-turn stops only its own turn', async () => {
    const run = startWorker(path, 100_000, false);
    await run.started;
    await new Promise((r) => setTimeout(r, 200));
    const main = chat.send('the main thread goes on', { maxNewTokens: 16, ignoreEos: true });
    await run.worker.terminate();
    expect((await main).stats.generatedTokens).toBe(16);
    expect(run.messages.some((m) => 'generated' in m)).toBe(false);
    expect((await chat.send('and on', { maxNewTokens: 2, ignoreEos: true })).stats.generatedTokens).toBe(2);
  });

  it('the addon loads and unloads in 50 Workers in a row without leaking', async () => {
    const before = getProbes().liveObjects();
    for (let i = 0; i < 50; i++) {
      const run = startWorker(path, 2, i % 2 === 0); // half dispose, half leave it to the exit
      expect(await run.exited).toBe(0);
      expect(run.messages).toContainEqual({ generated: 2 });
    }
    expect(getProbes().liveObjects()).toEqual(before);
    expect((await chat.send('still here', { maxNewTokens: 2, ignoreEos: true })).stats.generatedTokens).toBe(2);
  });
});
