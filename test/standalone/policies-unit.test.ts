// Each policy's choice on synthetic ledgers: no model, no KV cache, no llama.cpp decode.
import { describe, expect, it } from 'vitest';
import { getProbes, type SyntheticLedgerEntry } from '../../src/local/binding.ts';

const SYSTEM = 0, USER = 1, ASSISTANT = 2, SUMMARY = 3;
const base = { maxTokens: 1000, sinkTokens: 4 };

function plan(policy: string, entries: SyntheticLedgerEntry[], windowSize: number, need: number, want: number, extra: Record<string, number | string> = {}) {
  const r = getProbes().planEviction({ policy, windowSize, ...base, ...extra }, entries, need, want);
  const evicted = new Set(r.ranges.flatMap(([b, e]) => Array.from({ length: e - b }, (_, k) => b + k)));
  return { ...r, evicted };
}

function checkCommon(entries: SyntheticLedgerEntry[], evicted: Set<number>, windowSize: number, need: number) {
  expect(evicted.size).toBeGreaterThanOrEqual(need);
  for (const i of evicted) expect(entries[i]!.pinned).toBe(false);
  // The recent window is kept whenever the rest suffices.
  const outside = entries.filter((e, i) => !e.pinned && i < entries.length - windowSize).length;
  if (need <= outside) for (let i = entries.length - windowSize; i < entries.length; i++) expect(evicted.has(i)).toBe(false);
}

const ledger = (n: number, f: (i: number) => Partial<SyntheticLedgerEntry> = () => ({})): SyntheticLedgerEntry[] =>
  Array.from({ length: n }, (_, i) => ({ pinned: i < 8, role: i < 8 ? SYSTEM : USER, turn: Math.floor(i / 10), ...f(i) }));

describe('importance', () => {
  it('evicts the lowest scores outside the window and keeps the highest', () => {
    // Scores: a pseudo-random permutation, so recency and score are unrelated.
    const entries = ledger(200, (i) => ({ score: ((i * 7919) % 200) / 10 }));
    const { evicted } = plan('importance', entries, 40, 50, 60, { importanceGranularity: 'token' });
    checkCommon(entries, evicted, 40, 50);
    expect(evicted.size).toBe(60);
    const candidates = entries.map((e, i) => ({ i, s: e.score! })).filter(({ i }) => i >= 8 && i < 160);
    const maxEvicted = Math.max(...[...evicted].map((i) => entries[i]!.score!));
    const keptCandidates = candidates.filter(({ i }) => !evicted.has(i));
    for (const { s } of keptCandidates) expect(s).toBeGreaterThanOrEqual(maxEvicted);
  });

  it('span granularity evicts whole spans with the lowest mean score', () => {
    // Spans of 5 tokens (sentence ends); span k has mean score k % 7.
    const entries = ledger(200, (i) => ({ score: Math.floor(i / 5) % 7, sentenceEnd: i % 5 === 4, turn: 0 }));
    const { evicted } = plan('importance', entries, 40, 20, 20);
    expect(evicted.size).toBe(20);
    // Only spans scoring 0 go (there are enough of them), and each evicted span goes whole.
    for (const i of evicted) expect(entries[i]!.score).toBe(0);
    for (const i of evicted) for (let j = i - (i % 5); j < i - (i % 5) + 5; j++) expect(evicted.has(j)).toBe(true);
  });

  it('only eats into the window when need exceeds what lies outside it', () => {
    const entries = ledger(100, (i) => ({ score: i % 3 }));
    const { evicted } = plan('importance', entries, 40, 70, 70);
    expect(evicted.size).toBe(70);
    for (let i = 8; i < 60; i++) expect(evicted.has(i)).toBe(true);
  });
});

describe('semantic', () => {
  it('keeps at least one span of every cluster (topic)', () => {
    // Four topics in consecutive blocks of 48 tokens, each a direction in a 4-d embedding space;
    // spans end at sentence ends every 5 tokens. Keeping by recency would keep only the last topic.
    const topic = (i: number) => Math.min(3, Math.floor(Math.max(0, i - 8) / 48));
    const entries = ledger(208, (i) => {
      const e = [0, 0, 0, 0];
      e[topic(i)] = 1;
      e[(topic(i) + 1) % 4] = 0.05 * ((i * 13) % 7);
      return { embedding: e, sentenceEnd: i % 5 === 4, turn: Math.floor(i / 20) };
    });
    const { evicted } = plan('semantic', entries, 8, 150, 170, { semanticClusters: 4, spanMaxTokens: 32 });
    checkCommon(entries, evicted, 8, 150);
    const keptTopics = new Set<number>();
    for (let i = 8; i < 200; i++) if (!evicted.has(i)) keptTopics.add(topic(i));
    expect(keptTopics).toEqual(new Set([0, 1, 2, 3]));
  });

  it('keeps the newest token with windowSize 0 (as importance and hybrid do), whatever it clusters with', () => {
    for (const policy of ['semantic', 'rolling_summary']) {
      // The newest span an outlier of the one cluster: ranked last, it was evicted with its newest token.
      const entries = ledger(24, (i) => ({ embedding: i >= 20 ? [0, 1] : [1, 0], sentenceEnd: i % 4 === 3, turn: i >= 20 ? 3 : Math.floor(i / 10) }));
      const { evicted } = plan(policy, entries, 0, 4, 10, { semanticClusters: 1, spanMaxTokens: 4 });
      expect(evicted.has(23), policy).toBe(false);
    }
  });

  it('is deterministic for a seed', () => {
    const entries = ledger(120, (i) => ({ embedding: [Math.sin(i), Math.cos(i * 0.7), (i % 5) / 5], sentenceEnd: i % 6 === 5 }));
    const a = plan('semantic', entries, 16, 40, 50, { policySeed: 7 });
    const b = plan('semantic', entries, 16, 40, 50, { policySeed: 7 });
    expect(a.ranges).toEqual(b.ranges);
  });
});

describe('rolling_summary', () => {
  it('takes whole oldest turns plus the previous summary, and asks for a summary', () => {
    const entries = ledger(120, (i) => (i >= 8 && i < 14 ? { role: SUMMARY, turn: 0 } : { role: i % 20 < 10 ? USER : ASSISTANT }));
    const { evicted, summarize, ranges } = plan('rolling_summary', entries, 30, 10, 25);
    expect(summarize).toBe(true);
    checkCommon(entries, evicted, 30, 10);
    for (let i = 8; i < 14; i++) expect(evicted.has(i)).toBe(true);     // the old summary rolls
    // Whole turns: every evicted turn is evicted completely (outside the window).
    const turns = new Set([...evicted].map((i) => entries[i]!.turn));
    for (let i = 14; i < 90; i++) if (turns.has(entries[i]!.turn)) expect(evicted.has(i)).toBe(true);
    // The summary takes the place of the first evicted token: right after the pinned prefix.
    expect(ranges[0]![0]).toBe(8);
  });
});

describe('hybrid', () => {
  it('keeps heavy hitters and semantic representatives, evicts the old summary, asks for a new one', () => {
    const entries = ledger(300, (i) => ({
      role: i >= 8 && i < 12 ? SUMMARY : USER,
      score: i % 37 === 0 ? 100 : 0,
      embedding: [i % 3 === 0 ? 1 : 0, i % 3 === 1 ? 1 : 0, i % 3 === 2 ? 1 : 0],
      sentenceEnd: i % 4 === 3,
    }));
    const { evicted, summarize } = plan('hybrid', entries, 50, 100, 150, { semanticClusters: 3 });
    expect(summarize).toBe(true);
    checkCommon(entries, evicted, 50, 100);
    for (let i = 8; i < 12; i++) expect(evicted.has(i)).toBe(true);
    // Heavy hitters outside the window survive (the kept middle is split, half by importance).
    for (let i = 12; i < 250; i++) if (entries[i]!.score === 100) expect(evicted.has(i)).toBe(false);
  });

  it('without summaries (summaryTokens 0) does not ask for one', () => {
    const entries = ledger(100);
    expect(plan('hybrid', entries, 20, 10, 20, { summaryTokens: 0 }).summarize).toBe(false);
  });
});

describe.each(['sliding', 'importance', 'semantic', 'rolling_summary', 'hybrid'])('%s on random ledgers', (policy) => {
  it('never evicts pinned tokens and always frees at least need', () => {
    let seed = 1234;
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    for (let trial = 0; trial < 40; trial++) {
      const n = 20 + Math.floor(rand() * 300);
      const entries = Array.from({ length: n }, (_, i) => ({
        pinned: i < 4 || rand() < 0.05, role: Math.floor(rand() * 4), turn: Math.floor(i / 15), score: rand(),
        sentenceEnd: rand() < 0.2, embedding: [rand(), rand()],
      }));
      const unpinned = entries.filter((e) => !e.pinned).length;
      const need = Math.floor(rand() * unpinned);
      const want = Math.min(unpinned, need + Math.floor(rand() * 40));
      const windowSize = Math.floor(rand() * n);
      const { evicted } = plan(policy, entries, windowSize, need, want);
      expect(evicted.size).toBeGreaterThanOrEqual(need);
      for (const i of evicted) expect(entries[i]!.pinned).toBe(false);
    }
  });
});
