// Backend selection: a CUDA variant that cannot load (no cuBLAS, no GPU here) falls back to the CPU
// variant; FINITE_MEMORY_BACKEND forces one. Runs in child processes: the binding is loaded once per process.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { testDir, testModelPath } from '../helpers.ts';

const root = join(import.meta.dirname, '..', '..');
const dist = join(root, 'dist', 'index.js');
let fakeCuda = '';

beforeAll(() => {
  // A real ELF shared object that needs libcublas.so.13, like ggml-cuda does, linked against a stub
  // that is then removed: dlopen fails exactly as it does for the CUDA variant on this machine.
  const dir = join(testDir, 'fake-cuda');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'stub.c'), 'void cublasCreate_v2(void) {}\n');
  writeFileSync(join(dir, 'addon.c'), 'void cublasCreate_v2(void);\nvoid napi_register_module_v1(void) { cublasCreate_v2(); }\n');
  fakeCuda = join(dir, 'finite-memory-llm.node');
  try {
    execFileSync('cc', ['-shared', '-fPIC', '-o', join(dir, 'libcublas.so.13'), join(dir, 'stub.c'), '-Wl,-soname,libcublas.so.13']);
    execFileSync('cc', ['-shared', '-fPIC', '-o', fakeCuda, join(dir, 'addon.c'), '-L', dir, '-l:libcublas.so.13']);
    rmSync(join(dir, 'libcublas.so.13'));
  } catch {
    writeFileSync(fakeCuda, 'not an ELF file'); // no C compiler: an unloadable file still exercises the fallback
  }
});

function child(env: Record<string, string>) {
  const script = `
    const { loadModel, systemInfo } = await import(${JSON.stringify(dist)});
    try {
      const info = systemInfo();
      const m = await loadModel(${JSON.stringify(testModelPath())}, { threads: 1 });
      const chat = m.createChat({ maxTokens: 64 });
      const r = await chat.send('hi', { maxNewTokens: 3, temperature: 0 });
      console.log(JSON.stringify({ variant: info.variant, backend: m.info.backend, gpuDevices: info.gpuDevices, ok: typeof r.response === 'string' }));
      m.dispose();
    } catch (e) {
      console.log(JSON.stringify({ error: e.code, name: e.name, message: e.message }));
    }`;
  // The loader's own choice is under test: no FML_ADDON_PATH (the suite's test build) in the child.
  const { FML_ADDON_PATH: _testBuild, ...inherited } = process.env;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env: { ...inherited, ...env }, encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!);
}

describe('backend selection', () => {
  it('a CUDA variant that cannot load falls back to CPU when a driver seems present', () => {
    const out = child({ FML_ASSUME_NVIDIA_DRIVER: '1', FML_CUDA_ADDON_PATH: fakeCuda });
    expect(out).toEqual({ variant: 'cpu', backend: 'cpu', gpuDevices: 0, ok: true });
  });

  it('a CUDA variant that loads but reports no CUDA device is not used: CPU instead, or a typed error when forced', () => {
    // The CPU build stands in for a CUDA build on a machine whose driver sees no device: it loads and
    // gpuDeviceCount() is 0.
    const cpuBuild = join(root, 'build', 'Release', 'finite_memory_llm.node');
    if (!existsSync(cpuBuild)) return; // installed from a prebuild only: nothing to stand in
    expect(child({ FML_ASSUME_NVIDIA_DRIVER: '1', FML_CUDA_ADDON_PATH: cpuBuild })).toEqual({ variant: 'cpu', backend: 'cpu', gpuDevices: 0, ok: true });
    const forced = child({ FINITE_MEMORY_BACKEND: 'cuda', FML_CUDA_ADDON_PATH: cpuBuild });
    expect(forced.error).toBe('NATIVE_BINDING_NOT_FOUND');
    expect(forced.message).toMatch(/loaded, but no CUDA device is usable/);
  });

  it('FINITE_MEMORY_BACKEND=cuda with an unusable CUDA variant is a typed error that says why', () => {
    const out = child({ FINITE_MEMORY_BACKEND: 'cuda', FML_CUDA_ADDON_PATH: fakeCuda });
    expect(out.error).toBe('NATIVE_BINDING_NOT_FOUND');
    expect(out.message).toMatch(/FINITE_MEMORY_BACKEND=cuda/);
    expect(out.message).toMatch(/libcublas|ELF|invalid/);
  });

  it('FINITE_MEMORY_BACKEND=cpu uses the CPU variant; a bad value is refused', () => {
    expect(child({ FINITE_MEMORY_BACKEND: 'cpu', FML_ASSUME_NVIDIA_DRIVER: '1', FML_CUDA_ADDON_PATH: fakeCuda })).toMatchObject({ variant: 'cpu', ok: true });
    expect(child({ FINITE_MEMORY_BACKEND: 'tpu' })).toMatchObject({ error: 'NATIVE_BINDING_NOT_FOUND' });
  });
});
