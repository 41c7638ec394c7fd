// What tool calling costs, side by side in one run, on a Qwen2.5-0.5B-shaped model with a vocabulary
// as large as Qwen's (~152k) and Qwen2.5's own chat template (calls in <tool_call> tags):
//   - set-up: createChat with 1, 16 and 128 tools (the calling thread), the first time (the template
//     read, every schema checked, the frames rendered) and again (the set-up kept); prepareTools, that
//     and a first turn's set-up (its grammar and parser) on a worker thread; a first required call,
//     its turn set up at send or prepared; a turn of a call's result framed with every tool through
//     llama.cpp's full apply or the fast way. A send's set-up and framing run on a worker: the calling
//     thread's part is measured apart from the preparation there (stats.prepareMs);
//   - per token, round-robin turn by turn: free decoding against a required call (the answer held to
//     the template's call grammar, its arguments to a schema whose calls run on), against 'auto' (a
//     lazy grammar waits for a call's first marker: every token is checked and its text kept for the
//     trigger) and against 'auto' with the reply streamed (every piece read by llama.cpp's partial
//     parser, as llama-server streams);
//   - long replies: 2,000 tokens with toolChoice 'none' (no grammar, nothing read), 'auto' (the lazy
//     grammar's trigger searched in the whole text at every token, as llama.cpp does) and 'auto' streamed.
//   npx tsx bench/tools.ts [--no-write] [--turns 6]
import { availableParallelism } from 'node:os';
import { parseArgs } from 'node:util';
import { TEMPLATES, writeLlamaModel, writeModel } from '../src/gguf/index.ts';
import { loadModel, type SendOptions, type ToolDefinition, type TurnResult } from '../src/index.ts';
import { cachedModel, machine, median, REALISTIC_MODEL, writeResultsSection } from './common.ts';

const { values } = parseArgs({ options: { 'no-write': { type: 'boolean' }, turns: { type: 'string' } } });
const TURNS = Number(values.turns ?? 6);
const TOKENS = 64;
const VOCAB_EXTRA = 151_000;

/** A tool as agents write them: a few typed parameters, an enum, an optional nested object. */
const tool = (i: number): ToolDefinition => ({
  type: 'function',
  function: {
    name: `tool_${i}`,
    description: `Does thing number ${i} of the agent's list and returns what it found.`,
    parameters: {
      type: 'object',
      properties: {
        query: { type: 'string', description: 'What to look for' },
        limit: { type: 'integer', minimum: 1, maximum: 100 },
        mode: { enum: ['fast', 'thorough', 'cached'] },
        filters: { type: 'object', properties: { since: { type: 'string' }, tags: { type: 'array', items: { type: 'string' } } } },
      },
      required: ['query'],
    },
  },
});
/** A call whose arguments run on (at least 50 notes): every case decodes TOKENS tokens. */
const NOTES_TOOL: ToolDefinition = {
  type: 'function',
  function: { name: 'save_notes', parameters: { type: 'object', properties: { notes: { type: 'array', items: { type: 'string' }, minItems: 50 } }, required: ['notes'] } },
};

const CASES: { label: string; options: SendOptions }[] = [
  { label: 'free (no tools)', options: { maxNewTokens: TOKENS, ignoreEos: true } },
  { label: "toolChoice 'required' (held to the call grammar)", options: { maxNewTokens: TOKENS, ignoreEos: true, toolChoice: 'required' } },
  { label: "toolChoice 'auto' (a lazy grammar waits for a call)", options: { maxNewTokens: TOKENS, ignoreEos: true } },
  { label: "toolChoice 'auto', streamed (each piece read)", options: { maxNewTokens: TOKENS, ignoreEos: true, onToken: () => {} } },
];

async function main() {
  const path = cachedModel('qwen2.5-0.5b-shape-vocab152k-q8_0-seed1-qwen25-template.gguf', (p) => writeLlamaModel(p, { ...REALISTIC_MODEL, vocabExtra: VOCAB_EXTRA, chatTemplate: TEMPLATES.chatml.text }));
  const threads = availableParallelism();
  const model = await loadModel(path, { threads, slots: CASES.length + 2 });
  const small = await loadModel(cachedModel('tiny-qwen2-seed7.gguf', (p) => writeModel(p, { family: 'qwen2', seed: 7 })), { threads });

  // Set-up on the calling thread, and on a worker (each with a system prompt of its own: nothing kept).
  const setup: string[] = [];
  for (const n of [1, 16, 128]) {
    const tools = Array.from({ length: n }, (_, i) => tool(i));
    const timed = (f: () => void) => {
      const t0 = performance.now();
      f();
      return performance.now() - t0;
    };
    const opts = { maxTokens: 65536, tools, systemPrompt: `You are agent ${n}.` };
    let chat = model.createChat({ maxTokens: 64, policy: 'sliding' });
    const cold = timed(() => {
      chat.dispose();
      chat = model.createChat(opts);
    });
    const kept = timed(() => {
      chat.dispose();
      chat = model.createChat(opts);
    });
    const tokens = chat._internals().cacheState().pendingSystemTokens;
    chat.dispose();
    const t0 = performance.now();
    await model.prepareTools(tools, { systemPrompt: `You are agent ${n}, again.` });
    const worker = performance.now() - t0;
    // A first required call: its turn's set-up (template, grammar, parser) at send, or prepared first
    // with the turn's options: the calling thread's part, and the preparation on the worker
    // (stats.prepareMs; the turn is aborted as soon as send returns, before its long prefill).
    const firstRequired = async (prepared: boolean) => {
      const systemPrompt = `You are agent ${n}, ${prepared ? 'prepared' : 'not prepared'}.`;
      await model.prepareTools(tools, { systemPrompt, ...(prepared ? { toolChoice: 'required' as const } : {}) });
      const c = model.createChat({ ...opts, systemPrompt });
      const ac = new AbortController();
      const t1 = performance.now();
      const turn = c.send('Go', { toolChoice: 'required', maxNewTokens: 1, signal: ac.signal });
      const sync = performance.now() - t1;
      ac.abort();
      const { stats } = await turn;
      c.dispose();
      return `${sync.toFixed(2)} / ${stats.prepareMs.toFixed(1)}`;
    };
    const unprepared = await firstRequired(false);
    const prepared = await firstRequired(true);
    // A tool exchange (medians of 5, after a first): a reply's call, then a turn of its result sent,
    // framed with every tool through llama.cpp's full apply, or the fast way (the called tool alone):
    // the calling thread's part of the send, and its preparation on the worker (stats.prepareMs: the
    // framing). On a small model of the same template: the framing costs the same, its prefills take moments.
    const framing = async (full: boolean) => {
      const call = '<tool_call>\n{"name": "tool_0", "arguments": {"query": "x"}}\n</tool_call>';
      const c = small.createChat({ ...opts, systemPrompt: `You are agent ${n}.`, testFullToolFrames: full, testReply: call });
      const sync: number[] = [];
      const prepared: number[] = [];
      for (let k = 0; k < 6; k++) {
        const r = await c.send(`Go ${k}`, { maxNewTokens: 64 });
        const t1 = performance.now();
        const turn = c.send({ toolResults: [{ toolCallId: r.toolCalls[0]!.id, name: 'tool_0', content: 'found it' }] }, { maxNewTokens: 1 });
        const t2 = performance.now();
        const { stats } = await turn;
        if (k > 0) {
          sync.push(t2 - t1);
          prepared.push(stats.prepareMs);
        }
      }
      c.dispose();
      return `${median(sync).toFixed(2)} / ${median(prepared).toFixed(1)}`;
    };
    const fullFrames = await framing(true);
    const fastFrames = await framing(false);
    setup.push(`| ${n} | ${JSON.stringify(tools).length.toLocaleString('en-US')} | ${tokens.toLocaleString('en-US')} | ${cold.toFixed(1)} | ${kept.toFixed(2)} | ${worker.toFixed(1)} | ${unprepared}; ${prepared} | ${fullFrames}; ${fastFrames} |`);
  }

  // Per token, round-robin.
  const chats = CASES.map((c, i) => model.createChat({ maxTokens: 2048, policy: 'sliding', systemPrompt: 'You are terse.', ...(i === 0 ? {} : { tools: [NOTES_TOOL] }) }));
  const turns: TurnResult[][] = CASES.map(() => []);
  const walls: number[][] = CASES.map(() => []);
  for (let t = 0; t < TURNS; t++) {
    for (let i = 0; i < CASES.length; i++) {
      const t0 = performance.now();
      turns[i]!.push(await chats[i]!.send(`Note ${t}: save what you remember.`, { ...CASES[i]!.options, seed: t }));
      walls[i]!.push((performance.now() - t0) / Math.max(1, turns[i]!.at(-1)!.stats.generatedTokens));
    }
    console.log(`turn ${t + 1}: ${CASES.map((c, i) => `${c.label} ${turns[i]!.at(-1)!.stats.decodeMs.toFixed(0)} ms`).join('; ')}`);
  }
  const call = turns[1]!.at(-1)!;
  for (const c of chats) c.dispose();

  // A message too large for the budget: refused once tokenized (on a worker), the calling thread's part apart.
  const refuser = model.createChat({ maxTokens: 4096, policy: 'sliding' });
  const huge = 'The quick brown fox jumps over the lazy dog. '.repeat(4000);
  const refusals: { sync: number; whole: number }[] = [];
  for (let k = 0; k < 5; k++) {
    const t0 = performance.now();
    const turn = refuser.send(huge, { maxNewTokens: 1 });
    const sync = performance.now() - t0;
    await turn.catch(() => {});
    refusals.push({ sync, whole: performance.now() - t0 });
  }
  refuser.dispose();
  const hugeTokens = model.tokenize(huge).length;

  // Long replies: the lazy grammar's trigger search and the streamed reading, over the whole answer.
  const long = { maxNewTokens: 2000, ignoreEos: true } as const;
  const LONG: { label: string; options: SendOptions }[] = [
    { label: "'none'", options: { toolChoice: 'none' } },
    { label: "'auto'", options: {} },
    { label: "'auto' streamed", options: { onToken: () => {} } },
  ];
  const longWalls: number[][] = LONG.map(() => []);
  const reader = model.createChat({ maxTokens: 8192, policy: 'sliding', tools: [NOTES_TOOL] });
  for (let t = 0; t < 2; t++) {
    // Wall time: the reading runs on the calling thread, beside the decode. The order turns round
    // each time (a noisy machine drifts).
    for (const i of t % 2 === 0 ? [0, 1, 2] : [2, 1, 0]) {
      reader.reset();
      const t0 = performance.now();
      await reader.send(`Long ${t}`, { ...long, ...LONG[i]!.options, seed: t });
      longWalls[i]!.push(performance.now() - t0);
    }
  }
  reader.dispose();
  const info = model.info;
  model.dispose();
  small.dispose();

  const perToken = (rs: TurnResult[]) => median(rs.map((r) => r.stats.decodeMs / Math.max(1, r.stats.generatedTokens)));
  const base = perToken(turns[0]!);
  const wallBase = median(walls[0]!);
  const lines = CASES.map((c, i) => `| ${c.label} | ${median(turns[i]!.map((r) => r.stats.generatedTokens))} | ${perToken(turns[i]!).toFixed(2)} (${(perToken(turns[i]!) / base).toFixed(2)}x) | ${median(walls[i]!).toFixed(2)} (${(median(walls[i]!) / wallBase).toFixed(2)}x) |`);
  const out = [
    '## Tool calls: set-up and cost per token (`npx tsx bench/tools.ts`)',
    '',
    `- machine: ${machine()}`,
    `- model: Qwen2.5-0.5B geometry (24 layers, n_embd 896, 14/2 heads x 64, FFN 4864, Q8_0, seeded random weights) with a ${info.nVocab.toLocaleString('en-US')}-token vocabulary and Qwen2.5's chat template (tools in the system turn, calls in <tool_call> tags), ${threads} threads, ${info.backend}`,
    '- tools as agents write them (a string, an integer with bounds, an enum, an optional object with an array); createChat\'s set-up runs on the calling thread; a send\'s set-up and framing on a worker (calling thread / worker: the time send held the calling thread, and the turn\'s preparation on the worker, stats.prepareMs); a turn of results is framed on a small model of the same template (`writeModel({ family: \'qwen2\' })`: the framing costs the same, the prefills take moments)',
    `- a required call's start: ${JSON.stringify(call.toolCalls[0] ? `${call.toolCalls[0].name} ${call.toolCalls[0].arguments.slice(0, 50)}` : call.response.slice(0, 60))}`,
    '',
    '| tools | JSON bytes | system prompt tokens | createChat, first (ms) | createChat, set-up kept (ms) | prepareTools on a worker: the template, the schemas, the frames and a first turn\'s set-up (ms) | a first required call\'s send, calling thread / worker: its set-up at send; prepareTools({ toolChoice }) first (ms) | a turn of a call\'s result sent, calling thread / worker: framed with every tool; with the called tool alone (ms) |',
    '|---|---|---|---|---|---|---|---|',
    ...setup,
    '',
    `Per token (${TURNS} turns per case, round-robin, ${TOKENS} tokens each; medians):`,
    '',
    '| case | tokens | decode ms / token (/ free) | wall ms / token, the calling thread\'s reading included (/ free) |',
    '|---|---|---|---|',
    ...lines,
    '',
    `A message of ${hugeTokens.toLocaleString('en-US')} tokens refused as too large for maxTokens 4,096 (medians of ${refusals.length}): send held the calling thread ${median(refusals.map((r) => r.sync)).toFixed(2)} ms; refused ${median(refusals.map((r) => r.whole)).toFixed(1)} ms later, tokenized on a worker.`,
    '',
    `A 2,000-token reply of a chat with a tool (wall time of the turn, medians of ${longWalls[0]!.length}): ${LONG.map((c, i) => `${c.label} ${median(longWalls[i]!).toFixed(0)} ms (${(median(longWalls[i]!) / median(longWalls[0]!)).toFixed(2)}x)`).join(', ')}.`,
  ].join('\n');
  console.log(out);
  if (!values['no-write']) writeResultsSection('tools', out);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
