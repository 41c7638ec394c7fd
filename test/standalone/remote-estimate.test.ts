// The remote backend's token estimate without a tokenizer: a local budget that must not undercount
// the scripts a BPE vocabulary spends a token (or more) per character on.
import { describe, expect, it } from 'vitest';
import { estimateTokens } from '../../src/remote/chat.ts';

describe('estimateTokens', () => {
  it('counts ASCII by 4 characters and every other character as a token', () => {
    expect(estimateTokens('')).toBe(0);
    expect(estimateTokens('abcd')).toBe(1);
    expect(estimateTokens('abcde')).toBe(2);
    expect(estimateTokens('你好，世界')).toBe(5);        // chars / 4 said 2
    expect(estimateTokens('héllo wörld')).toBe(3 + 2);  // 9 ASCII, 2 accented
    expect(estimateTokens('👋🏽')).toBe(2);              // code points, not UTF-16 units
  });
});
