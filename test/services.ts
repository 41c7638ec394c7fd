/**
 * Real services for tests (Debian's redis-server and haproxy, our own `serve` processes), each started
 * by the test on a free loopback port and stopped after it. Without the package a test skips with a
 * message naming it; under CI=true it fails instead, so CI cannot pass by skipping.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Where the services keep their files (data, configs, certificates). */
const servicesDir = mkdtempSync(join(tmpdir(), 'fml-services-'));

/** The binary's path, or undefined (with the reason printed) when its package is missing and CI is not set. */
export function requireBinary(binary: string, pkg: string): string | undefined {
  const found = ['/usr/bin', '/usr/sbin', '/usr/local/bin'].map((d) => join(d, binary)).find((p) => spawnSync(p, ['--version']).error === undefined);
  if (found) return found;
  const msg = `${binary} not found: install the Debian package '${pkg}' (apt-get install -y ${pkg}) to run these tests`;
  if (process.env.CI === 'true') throw new Error(`${msg} (CI=true: a missing service fails the run)`);
  console.warn(`skipping: ${msg}`);
  return undefined;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** Resolves once something accepts connections on the port. */
export async function waitForPort(port: number, timeoutMs = 15_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = connect(port, '127.0.0.1');
      c.once('connect', () => { c.destroy(); resolve(true); });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`nothing listens on port ${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const exited = (p: ChildProcess) => new Promise<void>((resolve) => (p.exitCode !== null || p.signalCode !== null ? resolve() : p.once('exit', () => resolve())));

export interface Service {
  readonly port: number;
  readonly process: ChildProcess;
  /** SIGKILL (kill -9): no chance to clean up. */
  kill9(): Promise<void>;
  /** SIGTERM, then waits for the exit (its code). */
  terminate(): Promise<number | null>;
  stderr(): string;
}

function service(p: ChildProcess, port: number): Service {
  let err = '';
  p.stderr?.on('data', (d: Buffer) => { err += d.toString(); });
  return {
    port, process: p, stderr: () => err,
    async kill9() { p.kill('SIGKILL'); await exited(p); },
    async terminate() { p.kill('SIGTERM'); await exited(p); return p.exitCode; },
  };
}

/** redis-server on a free port, persisting to an append-only file in its own dir (a restart keeps the data). */
export async function startRedis(bin: string, port?: number, dir?: string, extra: string[] = []): Promise<Service & { url: string; dir: string }> {
  const p0 = port ?? (await freePort());
  const d = dir ?? mkdtempSync(join(servicesDir, 'redis-'));
  const proc = spawn(bin, ['--port', String(p0), '--bind', '127.0.0.1', '--dir', d, '--save', '', '--appendonly', 'yes', '--appendfsync', 'everysec', '--protected-mode', 'no', ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
  await waitForPort(p0);
  return { ...service(proc, p0), url: `redis://127.0.0.1:${p0}/0`, dir: d };
}

/** redis-server serving TLS only, with a CA and a server certificate made here by openssl (undefined without openssl). */
export async function startRedisTls(bin: string): Promise<(Service & { url: string; ca: string }) | undefined> {
  const openssl = requireBinary('openssl', 'openssl');
  if (!openssl) return undefined;
  const d = mkdtempSync(join(servicesDir, 'redis-tls-'));
  const run = (args: string[]) => {
    const r = spawnSync(openssl, args, { cwd: d });
    if (r.status !== 0) throw new Error(`openssl ${args[0]} failed: ${r.stderr.toString()}`);
  };
  run(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=test-ca', '-keyout', 'ca.key', '-out', 'ca.pem']);
  run(['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', 'server.key', '-out', 'server.csr']);
  writeFileSync(join(d, 'san.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  run(['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '1', '-extfile', 'san.ext', '-out', 'server.pem']);
  const port = await freePort();
  const proc = spawn(bin, ['--port', '0', '--tls-port', String(port), '--bind', '127.0.0.1', '--dir', d, '--save', '', '--tls-cert-file', join(d, 'server.pem'),
    '--tls-key-file', join(d, 'server.key'), '--tls-ca-cert-file', join(d, 'ca.pem'), '--tls-auth-clients', 'no'], { stdio: ['ignore', 'ignore', 'pipe'] });
  await waitForPort(port);
  return { ...service(proc, port), url: `rediss://127.0.0.1:${port}/0`, ca: readFileSync(join(d, 'ca.pem'), 'utf8') };
}

/**
 * HAProxy in front of `backends`, routing on X-Session-Id with consistent hashing; a dead backend's share goes to the others.
 * `http-server-close`: each request opens its own connection to a backend, so a request after a backend was killed
 * meets a refused connection, which `retry-on conn-failure` sends elsewhere. Reusing the idle connection to the dead
 * backend instead failed after the request was written, and HAProxy closed the client's connection ("other side closed").
 */
export async function startHaproxy(bin: string, backends: number[]): Promise<Service> {
  const port = await freePort();
  const cfg = join(mkdtempSync(join(servicesDir, 'haproxy-')), 'haproxy.cfg');
  writeFileSync(cfg, `global
  maxconn 1000
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  retries 2
  option redispatch 1
  retry-on conn-failure
  option http-server-close
frontend fe
  bind 127.0.0.1:${port}
  default_backend instances
backend instances
  balance hdr(X-Session-Id)
  hash-type consistent
  option httpchk GET /health
  http-check expect status 200
${backends.map((b, i) => `  server i${i} 127.0.0.1:${b} check inter 200 fall 1 rise 1`).join('\n')}
`);
  const proc = spawn(bin, ['-f', cfg, '-db'], { stdio: ['ignore', 'ignore', 'pipe'] });
  await waitForPort(port);
  return service(proc, port);
}

/** `finite-memory-llm serve` as its own process (so it can be killed), on `port`; `timeoutMs` for a large model to load. */
export async function startServe(port: number, args: string[], timeoutMs = 30_000): Promise<Service> {
  const cli = join(import.meta.dirname, '..', 'src', 'cli.ts');
  const proc = spawn(process.execPath, ['--import', 'tsx', cli, 'serve', '--port', String(port), '--threads', '1', '--quiet', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const s = service(proc, port);
  await Promise.race([
    waitForPort(port, timeoutMs),
    exited(proc).then(() => { throw new Error(`serve exited: ${s.stderr()}`); }),
  ]);
  return s;
}
