/**
 * API key check: `Authorization: Bearer <key>` on every route but /health and the page at /, compared as SHA-256
 * digests with timingSafeEqual (no early exit on the first differing byte, equal lengths always).
 */
import { timingSafeEqual } from 'node:crypto';
import { HttpError, sha256 } from './wire.js';

/** A check for requests: undefined when they pass, the 401 to answer otherwise. No key: everything passes. */
export function apiKeyCheck(apiKey: string | undefined): (url: string, authorization: string | undefined) => HttpError | undefined {
  if (apiKey === undefined) return () => undefined;
  const expected = sha256(apiKey);
  return (url, authorization) => {
    if (url === '/health' || url === '/') return undefined;   // the page holds no data; its API calls carry the key
    const m = /^Bearer\s+(.+)$/i.exec(authorization ?? '');
    if (m && timingSafeEqual(sha256(m[1]!.trim()), expected)) return undefined;
    return new HttpError(401, 'invalid_request_error', 'invalid_api_key', 'Missing or invalid API key (Authorization: Bearer <key>)');
  };
}
