/** Argument checks shared by every surface: a wrong type or value is an InvalidOptionError naming it. */
import { InvalidOptionError } from './errors.js';

function describe(v: unknown): string {
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)}`;
  if (typeof v === 'number') return `number ${v}`;
  if (v === null) return 'null';
  return typeof v;
}

export function fail(expected: string, name: string, value: unknown): never {
  throw new InvalidOptionError(`Expected ${expected} for ${name} but received ${describe(value)}`);
}

export function checkObject(name: string, value: unknown): Record<string, unknown> {
  if (value === undefined) return {};
  if (value === null || typeof value !== 'object' || Array.isArray(value)) fail('an object', name, value);
  return value as Record<string, unknown>;
}

export function checkInt(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    fail(`an integer between ${min} and ${max}`, name, value);
  }
  return value;
}

export function checkNumber(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max) {
    fail(`a number between ${min} and ${max}`, name, value);
  }
  return value;
}

export function checkString(name: string, value: unknown, maxLength = Number.MAX_SAFE_INTEGER): string {
  if (typeof value !== 'string') fail('a string', name, value);
  if (value.length > maxLength) fail(`a string of at most ${maxLength} characters`, name, value);
  return value;
}

/** A file path: a non-empty string without NUL (a C string would silently end there). */
export function checkPath(name: string, value: unknown): string {
  const path = checkString(name, value);
  if (path.length === 0 || path.includes('\0')) fail('a non-empty path without NUL characters', name, value);
  return path;
}

const MAX_MESSAGE_CHARS = 16 << 20;

export function checkMessage(message: unknown, name = 'message'): string {
  return checkString(name, message, MAX_MESSAGE_CHARS);
}

/** Refuses keys outside `known` (a typo must not be silently ignored). */
export function checkKnownKeys(name: string, value: Record<string, unknown>, known: readonly string[]): void {
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) throw new InvalidOptionError(`Unknown option ${name}.${key} (known: ${known.join(', ')})`);
  }
}

/**
 * send({ toolResults }): the message's shape and each result's known fields, checked; what each field
 * must hold is the chat's (a local chat takes an id or a name, a remote one needs the id).
 */
export function toolResultFields(message: unknown): { at: string; toolCallId: unknown; name: unknown; content: unknown }[] {
  const m = checkObject('message', message) as { toolResults?: unknown };
  checkKnownKeys('message', m, ['toolResults']);
  const list = m.toolResults;
  if (!Array.isArray(list) || list.length === 0 || list.length > 128) fail('an array of 1 to 128 tool results', 'toolResults', list);
  return list.map((r: unknown, i: number) => {
    const at = `toolResults[${i}]`;
    const result = checkObject(at, r);
    checkKnownKeys(at, result, ['toolCallId', 'name', 'content']);
    return { at, toolCallId: result.toolCallId, name: result.name, content: result.content };
  });
}
