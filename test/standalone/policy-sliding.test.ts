// The sliding policy on synthetic ledgers: no model, no KV cache.
import { describe, expect, it } from 'vitest';
import { getProbes } from '../../src/local/binding.ts';

const plan = (n: number, pinned: (i: number) => boolean, windowSize: number, need: number, want: number) =>
  getProbes().planEviction(
    { policy: 'sliding', maxTokens: 1000, windowSize, sinkTokens: 4 },
    Array.from({ length: n }, (_, i) => ({ pinned: pinned(i) })),
    need,
    want,
  ).ranges;

const count = (ranges: [number, number][]) => ranges.reduce((s, [b, e]) => s + (e - b), 0);

describe('sliding policy', () => {
  it('evicts the oldest unpinned tokens outside the window, up to want', () => {
    const r = plan(100, (i) => i < 10, 20, 5, 30);
    expect(r).toEqual([[10, 40]]);
  });

  it('stops at the window when want exceeds what lies outside it', () => {
    const r = plan(100, (i) => i < 10, 20, 5, 500);
    expect(r).toEqual([[10, 80]]);
  });

  it('takes the oldest window tokens only when need cannot be met otherwise', () => {
    const r = plan(100, (i) => i < 10, 20, 75, 75);
    expect(count(r)).toBe(75);
    expect(r).toEqual([[10, 85]]);
  });

  it('never plans a pinned token, even interleaved ones', () => {
    const pinned = (i: number) => i < 4 || i % 7 === 0;
    const r = plan(200, pinned, 30, 60, 90);
    expect(count(r)).toBe(90);
    for (const [b, e] of r) for (let i = b; i < e; i++) expect(pinned(i)).toBe(false);
    // Oldest first: every unpinned token before the last evicted one is evicted too.
    const last = Math.max(...r.map(([, e]) => e));
    const evicted = new Set(r.flatMap(([b, e]) => Array.from({ length: e - b }, (_, k) => b + k)));
    for (let i = 0; i < last; i++) if (!pinned(i)) expect(evicted.has(i)).toBe(true);
  });

  it('returns sorted, disjoint ranges', () => {
    const r = plan(300, (i) => i % 5 === 0, 50, 100, 150);
    for (let k = 1; k < r.length; k++) expect(r[k]![0]).toBeGreaterThan(r[k - 1]![1] - 1);
  });

  it('rejects an unknown policy with a typed error', () => {
    expect(() =>
      getProbes().planEviction({ policy: 'nope', maxTokens: 10, windowSize: 2, sinkTokens: 1 }, [], 0, 0).ranges,
    ).toThrow(expect.objectContaining({ code: 'INVALID_OPTION' }));
  });
});
