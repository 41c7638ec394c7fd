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
    testTimeout: 120_000,
    hookTimeout: 120_000,
  },
});
