/**
 * Writes docs/api.md's option table from the native option table (native/engine/options.cpp), the one
 * source of option names, defaults and bounds. `npm run docs:options` rewrites docs/api.md between the
 * markers; `--check` exits 1 when docs/api.md is out of date (test/standalone/options.test.ts runs that check).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { getBinding } from '../src/local/binding.ts';

export const BEGIN = '<!-- options:begin (npm run docs:options) -->';
export const END = '<!-- options:end -->';

export function optionsTable(): string {
  const rows = getBinding().optionDocs().filter((d) => !d.internal);
  const scopes: Record<string, string> = { model: '`loadModel(path, options)`', chat: '`model.createChat(options)`', send: '`chat.send(message, options)`' };
  const out: string[] = [];
  for (const scope of ['model', 'chat', 'send']) {
    out.push('', `${scopes[scope]}:`, '', '| option | type | default | range | what it does |', '|---|---|---|---|---|');
    for (const d of rows.filter((r) => r.scope === scope)) {
      out.push(`| \`${d.name}\` | \`${d.type.replaceAll('|', '\\|')}\` | ${d.default} | ${d.range || ''} | ${d.description} |`);
    }
  }
  return out.join('\n').trim();
}

/** `text` with what stands between the `begin` and `end` markers replaced by `block`. */
export function replaceBetweenMarkers(text: string, begin: string, end: string, block: string): string {
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  if (a < 0 || b < a) throw new Error(`docs/api.md has no ${begin} ... ${end} block`);
  return `${text.slice(0, a + begin.length)}\n${block}\n${text.slice(b)}`;
}

export function readmeWithTable(readme: string): string {
  return replaceBetweenMarkers(readme, BEGIN, END, optionsTable());
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!)) {
  const path = join(import.meta.dirname, '..', 'docs', 'api.md');
  const readme = readFileSync(path, 'utf8');
  const next = readmeWithTable(readme);
  if (process.argv.includes('--check')) {
    if (next !== readme) {
      console.error('docs/api.md option table is out of date: run npm run docs:options');
      process.exit(1);
    }
  } else {
    writeFileSync(path, next);
  }
}
