// Runs the C++ unit tests of the ledger, the policies and the flash-attention weights (test/native/, built by CMake
// with the addon as build/UnitTests/fml_unit_tests), so `npm test` fails when one of them does.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const binary = join(import.meta.dirname, '..', '..', 'build', 'UnitTests', 'fml_unit_tests');

describe('C++ unit tests (ledger, policies, flash-attention weights)', () => {
  it('build/UnitTests/fml_unit_tests passes', () => {
    expect(existsSync(binary), `${binary} is missing: npm run build:native builds it`).toBe(true);
    let out = '';
    try {
      out = execFileSync(binary, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string };
      throw new Error(`C++ unit tests failed:\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
    }
    expect(out).toMatch(/\d+ tests, \d+ checks, 0 failed/);
  });
});
