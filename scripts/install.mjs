#!/usr/bin/env node
// npm install hook: use a prebuilt binary when one matches this platform, otherwise build from
// source (cmake-js, with progress), otherwise fail with a message that says what is missing.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const log = (m) => console.log(`[finite-memory-llm] ${m}`);

if (process.env.FML_SKIP_INSTALL === '1') process.exit(0);

try {
  const found = require('node-gyp-build').path(root);
  // Loading it proves it runs here (glibc, CPU features), not just that a file exists.
  require(found);
  log(`using ${found.startsWith(join(root, 'prebuilds')) ? 'prebuilt binary' : 'existing build'} ${found}`);
  process.exit(0);
} catch {
  // no usable binary: build from source below
}

const missing = [];
const has = (cmd) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
if (!has('cmake')) missing.push('cmake (>= 3.18)');
if (!has('c++') && !has('g++') && !has('clang++')) missing.push('a C++17 compiler (g++ or clang++)');
const llamaSource = process.env.LLAMA_CPP_DIR
  ? join(process.env.LLAMA_CPP_DIR, 'include', 'llama.h')
  : join(root, 'deps', 'llama.cpp', 'include', 'llama.h');
// node-llama-cpp's package.json is not in its exports map, so look in node_modules directly too.
const bundles = [join(root, 'node_modules', 'node-llama-cpp', 'llama', 'gitRelease.bundle')];
try {
  bundles.push(join(dirname(require.resolve('node-llama-cpp/package.json')), 'llama', 'gitRelease.bundle'));
} catch {}
if (!existsSync(llamaSource) && !bundles.some((b) => existsSync(b))) {
  missing.push('the llama.cpp source: set LLAMA_CPP_DIR to a llama.cpp checkout (release v0.4.0, commit 80fb11a), or install node-llama-cpp@3.21.1 next to this package');
}
if (missing.length > 0) {
  console.error(`[finite-memory-llm] no prebuilt binary for ${process.platform}-${process.arch} (glibc), and building from source needs:\n  - ${missing.join('\n  - ')}`);
  process.exit(1);
}
log(`no prebuilt binary for ${process.platform}-${process.arch}: building from source (llama.cpp + addon, a few minutes on 2 cores)`);
try {
  execFileSync(process.execPath, [join(root, 'scripts', 'fetch-llama.mjs')], { cwd: root, stdio: 'inherit' });
  // The shipped addon only (its target): the unit tests and the addon with probes are the repository's,
  // not a user's. Only the target, not FML_BUILD_TESTS=OFF: that would stay in build/'s CMake cache, and
  // a developer's `npm run build` in the same tree (CI: npm ci, then npm test) would never build them.
  execFileSync(process.execPath, [require.resolve('cmake-js/bin/cmake-js'), 'compile', '--parallel', process.env.FML_JOBS ?? '2', '--target', 'finite_memory_llm'], { cwd: root, stdio: 'inherit' });
} catch (err) {
  console.error(`[finite-memory-llm] building from source failed: ${err.message}`);
  process.exit(1);
}
log('built build/Release/finite_memory_llm.node');
