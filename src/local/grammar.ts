/**
 * Structured output: send's `jsonSchema` as the native table takes it (JSON text), and the grammar a
 * schema becomes (llama.cpp's converter, as llama-server converts a `response_format`).
 */
import { getBinding } from './binding.js';
import { fromNativeError, InvalidOptionError } from '../shared/errors.js';

/**
 * An option given as an object or array (a schema, a tool list), as JSON text for the native table,
 * which has no objects; text is taken as it is (the native side parses it).
 */
export function jsonText(value: unknown, option = 'jsonSchema'): unknown {
  if (value === null || typeof value !== 'object') return value;
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch (err) {
    throw new InvalidOptionError(`Expected a JSON-serializable value for ${option}: ${(err as Error).message}`);
  }
  if (text === undefined) throw new InvalidOptionError(`Expected a JSON-serializable value for ${option}`);
  return text;
}

/** A schema's JSON text, or InvalidOptionError when it is neither an object nor text. */
function schemaTextOf(schema: unknown): string {
  const text = jsonText(schema);
  if (typeof text !== 'string') throw new InvalidOptionError('Expected a JSON schema (an object, or its JSON text) for jsonSchema');
  return text;
}

/**
 * The GBNF grammar (llama.cpp's format, start rule `root`) that `send({ jsonSchema })` holds an
 * answer to: to see what a schema allows, or to check one before it is used. Throws
 * InvalidOptionError for a schema it cannot convert (an unsupported keyword, too large, nested too deep).
 */
export function jsonSchemaToGrammar(schema: object | string): string {
  const text = schemaTextOf(schema);
  try {
    return getBinding().jsonSchemaToGrammar(text);
  } catch (err) {
    throw fromNativeError(err);
  }
}

/** jsonSchemaToGrammar on a worker thread: a server converts a request's schema without holding its event loop. */
export async function jsonSchemaToGrammarAsync(schema: object | string): Promise<string> {
  const text = schemaTextOf(schema);
  try {
    return await getBinding().jsonSchemaToGrammarAsync(text);
  } catch (err) {
    throw fromNativeError(err);
  }
}
