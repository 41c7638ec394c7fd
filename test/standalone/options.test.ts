// The option table in the native core is the one source of defaults and bounds: what it documents
// is what it resolves, the TypeScript JSDoc says the same defaults, and docs/api.md's table is current.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { getBinding } from '../../src/local/binding.ts';
import { resolveChatOptions } from '../../src/local/options.ts';
import { readmeWithTable } from '../../scripts/options-doc.ts';

const docs = getBinding().optionDocs();
const root = join(import.meta.dirname, '..', '..');

/** Evaluates a documented default such as "maxTokens / 4" or "min(48, maxTokens / 8)" (integer division). */
function evaluate(text: string, maxTokens: number): number | string | boolean | undefined {
  if (/^'.*'$/.test(text)) return text.slice(1, -1);
  if (text === 'true' || text === 'false') return text === 'true';
  const expr = text.replaceAll('maxTokens', String(maxTokens)).replace(/min\(([^,]+), ([^)]+)\)/, (_m, a: string, b: string) => `Math.min(${a}, ${b})`);
  if (!/^[\d\s./()+\-*,Mathmin]+$/.test(expr)) return undefined; // "the model's threads", "llama.cpp's choice"
  return Function(`return (${expr.replaceAll(/(\d+) \/ (\d+)/g, 'Math.floor($1 / $2)')})`)() as number;
}

describe('the native option table', () => {
  it('resolves every chat option to the default it documents', () => {
    expect(evaluate(docs.find((d) => d.name === 'maxTokens')!.default, 0)).toBe(resolveChatOptions({}, 1).maxTokens);
    for (const maxTokens of [64, 1000, 2048]) {
      const resolved = resolveChatOptions(maxTokens === 2048 ? {} : { maxTokens }, 3);
      for (const d of docs.filter((x) => x.scope === 'chat' && !x.internal && x.name !== 'maxTokens')) {
        const expected = evaluate(d.default, maxTokens);
        if (expected === undefined) continue;
        expect(resolved[d.name as keyof typeof resolved], `${d.name} at maxTokens ${maxTokens}`).toBe(expected);
      }
      expect(resolved.maxTokens).toBe(maxTokens);
      expect(resolved.threads).toBe(3);
      expect(resolved.flashAttention).toBeUndefined();
    }
  });

  it('says the same defaults as the TypeScript JSDoc', () => {
    const source = readFileSync(join(root, 'src', 'local', 'options.ts'), 'utf8');
    let checked = 0;
    for (const d of docs.filter((x) => !x.internal)) {
      // The JSDoc block right before `name?:` in the interface of its scope.
      const iface = { model: 'LoadModelOptions', chat: 'ChatOptions', send: 'SendOptions' }[d.scope];
      const body = source.slice(source.indexOf(`export interface ${iface} {`));
      const at = body.indexOf(`  ${d.name}?:`);
      expect(at, `${iface}.${d.name} is declared`).toBeGreaterThan(0);
      const jsdoc = body.slice(body.lastIndexOf('/**', at), at);
      const m = /Default ([^\n]*?)\.(?:\s|\*|$)/.exec(jsdoc.replaceAll(/\n\s*\*\s*/g, ' '));
      if (!m) continue;
      expect(m[1], `${iface}.${d.name}`).toBe(d.default);
      checked++;
    }
    expect(checked).toBeGreaterThan(25);
  });

  it('is what docs/api.md shows (npm run docs:options)', () => {
    const readme = readFileSync(join(root, 'docs', 'api.md'), 'utf8');
    expect(readmeWithTable(readme)).toBe(readme);
  });

  it('names the option, what it expected and what it got', () => {
    expect(() => resolveChatOptions({ windowSize: 5000 }, 1)).toThrow('Expected an integer between 0 and 2047 for windowSize but received number 5000');
    expect(() => resolveChatOptions({ policy: 'lru' }, 1)).toThrow('Expected one of sliding, importance, semantic, rolling_summary, hybrid for policy but received string "lru"');
    expect(() => resolveChatOptions({ maxTokenz: 5 }, 1)).toThrow(/Unknown option options.maxTokenz \(known: kvType, flashAttention, policy, maxTokens/);
    expect(() => resolveChatOptions({ kvType: 'q8_0', flashAttention: false }, 1)).toThrow(/needs flash attention/);
  });
});

describe('the remote chat\'s defaults', () => {
  it('equal the local chat\'s, except where REMOTE_CHAT_DEFAULTS says why (and docs/remote.md says so too)', async () => {
    const { REMOTE_CHAT_DEFAULTS } = await import('../../src/remote/chat.ts');
    const remoteDocs = readFileSync(join(root, 'docs', 'remote.md'), 'utf8');
    const local2048 = resolveChatOptions({}, 1) as unknown as Record<string, unknown>;
    const remoteMax = REMOTE_CHAT_DEFAULTS.maxTokens.value();
    for (const [name, row] of Object.entries(REMOTE_CHAT_DEFAULTS) as [string, { value: (m: number) => unknown; differs?: string }][]) {
      expect(Object.hasOwn(local2048, name), `${name} is a local option too`).toBe(true);
      // Compared at the same maxTokens (the remote default's), so derived defaults compare like for like.
      const local = name === 'maxTokens' ? local2048.maxTokens : (resolveChatOptions({ maxTokens: remoteMax }, 1) as unknown as Record<string, unknown>)[name];
      const remote = row.value(remoteMax);
      if (row.differs === undefined) expect(remote, `${name}: the remote default must be the local one, or say why it differs`).toEqual(local);
      else {
        expect(remote, `${name} is declared different`).not.toEqual(local);
        expect(remoteDocs, `docs/remote.md explains ${name}`).toContain(row.differs);
      }
    }
  });
});

describe('test hooks', () => {
  it('exist only in the test build: the shipped addon refuses testTokenDelayMs as an unknown option', async () => {
    const { spawnSync } = await import('node:child_process');
    const { existsSync } = await import('node:fs');
    const shipped = join(root, 'build', 'Release', 'finite_memory_llm.node');
    expect(existsSync(shipped)).toBe(true);
    const probe = (addon: string) => spawnSync(process.execPath, ['-e', `
      const b = require(${JSON.stringify(addon)});
      try { b.resolveChatOptions({ testTokenDelayMs: 5 }, 1); console.log('accepted'); } catch (e) { console.log(e.code, e.message); }`], { encoding: 'utf8' }).stdout.trim();
    expect(probe(shipped)).toMatch(/^INVALID_OPTION Unknown option options\.testTokenDelayMs/);
    expect(probe(process.env.FML_ADDON_PATH!)).toBe('accepted');
  });
});
