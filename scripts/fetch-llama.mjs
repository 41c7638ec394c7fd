#!/usr/bin/env node
// Clones llama.cpp from the git bundle shipped inside the pinned node-llama-cpp package into
// deps/llama.cpp (git-ignored). llama.cpp source never lives in this repository.
// LLAMA_CPP_DIR=<checkout> skips the clone and builds against that checkout instead.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const target = join(root, 'deps', 'llama.cpp');
// The exact commit of node-llama-cpp@3.21.1's bundle (llama.cpp release v0.4.0).
const EXPECTED_COMMIT = '80fb11ac73e6';

if (process.env.LLAMA_CPP_DIR) {
  const dir = resolve(process.env.LLAMA_CPP_DIR);
  if (!existsSync(join(dir, 'include', 'llama.h'))) {
    console.error(`LLAMA_CPP_DIR=${dir} does not look like a llama.cpp checkout (include/llama.h missing)`);
    process.exit(1);
  }
  console.log(`[fetch-llama] using LLAMA_CPP_DIR=${dir}`);
  process.exit(0);
}

if (existsSync(join(target, 'include', 'llama.h'))) {
  process.exit(0);
}

let bundle;
try {
  const require = createRequire(import.meta.url);
  bundle = join(dirname(require.resolve('node-llama-cpp/package.json')), 'llama', 'gitRelease.bundle');
} catch {
  bundle = join(root, 'node_modules', 'node-llama-cpp', 'llama', 'gitRelease.bundle');
}
if (!existsSync(bundle)) {
  console.error(
    '[fetch-llama] llama.cpp source not found. Install devDependencies (node-llama-cpp@3.21.1 ships ' +
      'llama/gitRelease.bundle) or point LLAMA_CPP_DIR at a llama.cpp checkout.',
  );
  process.exit(1);
}
console.log(`[fetch-llama] cloning llama.cpp from ${bundle} into deps/llama.cpp`);
execFileSync('git', ['-c', 'advice.detachedHead=false', 'clone', '--quiet', bundle, target], { stdio: 'inherit' });
const head = execFileSync('git', ['-C', target, 'rev-parse', 'HEAD']).toString().trim();
if (!head.startsWith(EXPECTED_COMMIT)) {
  console.warn(`[fetch-llama] warning: bundle HEAD ${head} differs from the pinned ${EXPECTED_COMMIT}`);
}
const info = JSON.parse(
  readFileSync(join(dirname(bundle), 'binariesGithubRelease.json'), 'utf8'),
);
console.log(`[fetch-llama] llama.cpp ${info.release} at ${head.slice(0, 12)}`);
