// The command line: flags checked before a model loads (usage and exit 2), an empty --api-key refused,
// and `chat` reading piped input as a conversation that one failed turn does not end.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { testModelPath } from '../helpers.ts';

const cli = join(import.meta.dirname, '..', '..', 'src', 'cli.ts');
const run = (args: string[], input?: string) => {
  const r = spawnSync(process.execPath, ['--import', 'tsx', cli, ...args], { input, encoding: 'utf8', timeout: 60_000, env: { ...process.env, FINITE_MEMORY_API_KEY: '' } });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

describe('finite-memory-llm (cli)', () => {
  it('bad flags are usage errors (exit 2) found before the model loads; --help exits 0', () => {
    // A model path that does not exist: a load would fail with MODEL_NOT_FOUND (exit 1) instead.
    for (const args of [['--port', ''], ['--shutdown-timeout-ms', '30s'], ['--threads', '0'], ['--max-queue', '-1'], ['--bogus']]) {
      const r = run(['serve', '--model', '/nonexistent.gguf', ...args]);
      expect(r.code, `${args.join(' ')}: ${r.err}`).toBe(2);
      expect(r.err).toContain('Usage:');
      expect(r.err).not.toContain('MODEL_NOT_FOUND');
    }
    expect(run(['--help']).code).toBe(0);
    expect(run([]).code).toBe(2);
  });

  it('an empty --api-key is refused, never a server without a key', () => {
    const r = run(['serve', '--model', testModelPath(), '--port', '0', '--api-key', '', '--quiet']);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/apiKey/);
  });

  it('chat answers every piped line, and a line too long for the budget is an error the conversation survives', () => {
    const input = ['My name is Ana.', 'word '.repeat(400), 'What is my name?', ''].join('\n');
    const r = run(['chat', '--model', testModelPath(), '--max-tokens', '64', '--threads', '1'], input);
    expect(r.code, r.err).toBe(0);
    expect(r.out.match(/\n\[(eos|maxTokens|stop|abort)\]/g)).toHaveLength(2);
    expect(r.err).toContain('PROMPT_TOO_LARGE');
  });
});
