import { join } from 'node:path';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Native work is CPU-bound and these machines have 2 cores: one test file at a time keeps
    // llama.cpp's spin-barrier thread pool from fighting itself.
    pool: 'forks',
    fileParallelism: false,
    // GC tests (finalizers free native memory) call global.gc().
    execArgv: ['--expose-gc'],
    // The test build of the addon: the shipped one plus probes (native/binding/probes.cpp).
    env: { FML_ADDON_PATH: process.env.FML_ADDON_PATH ?? join(import.meta.dirname, 'build', 'Probes', 'finite_memory_llm_probes.node') },
    testTimeout: 120_000,
    hookTimeout: 120_000,
  },
});
