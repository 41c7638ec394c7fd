// Small budgets and batch sizes, every policy and every entry point that decodes, each in a child
// process: llama.cpp aborts the whole process on a batch larger than n_batch (it did, for the summary
// instruction of rolling_summary/hybrid), which a test in this process could not survive.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { POLICIES } from '../../src/index.ts';
import { SHARED_MODELS, testDir, testModelPath } from '../helpers.ts';

const child = join(import.meta.dirname, 'fixtures', 'budget-sweep-child.ts');
const stories = join(SHARED_MODELS, 'stories260K.gguf');
const models: [string, () => string][] = [
  ['generated model, ChatML template', () => testModelPath()],
  ['generated model, no template (plain framing)', () => testModelPath({ chatTemplate: null })],
];
if (existsSync(stories)) models.push(['stories260K (trained, no template)', () => stories]);
else console.warn(`[skip] ${stories} is absent: the sweep runs on generated models only`);

describe.each(models)('%s', (_name, path) => {
  it.each(POLICIES)('%s: no abort at any budget or batch size; the minimum createChat names is the one that works', (policy) => {
    const dir = mkdtempSync(join(testDir, `sweep-${policy}-`));
    const r = spawnSync(process.execPath, ['--import', 'tsx', child, path(), policy, dir], { encoding: 'utf8', timeout: 300_000 });
    const lines = r.stdout.trim().split('\n');
    const context = `exit ${r.status} signal ${r.signal}; last: ${lines.slice(-2).join(' | ')}\n${r.stderr.slice(-2000)}`;
    expect(r.status, context).toBe(0);
    expect(lines.at(-1)).toBe('done');
    const [, minimum, named] = /minimum (\d+) named (\d+)/.exec(lines[0] ?? '') ?? [];
    expect(Number(minimum)).toBeGreaterThanOrEqual(16);
    expect(named).toBe(minimum);
  });
});
