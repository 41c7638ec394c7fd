/**
 * Who may ask: the API key (`Authorization: Bearer <key>` on every route but /health and the page at /, compared as SHA-256
 * digests with timingSafeEqual: no early exit on the first differing byte, equal lengths always), and
 * without a key, the host names a request may use (a guard against DNS rebinding).
 */
import { timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import { HttpError, sha256 } from './wire.js';

/** A check for requests: undefined when they pass, the 401 to answer otherwise. No key: everything passes. */
export function apiKeyCheck(apiKey: string | undefined): (url: string, authorization: string | undefined) => HttpError | undefined {
  if (apiKey === undefined) return () => undefined;
  const expected = sha256(apiKey);
  return (url, authorization) => {
    const path = url.split('?')[0];
    if (path === '/health' || path === '/') return undefined;   // the page holds no data; its API calls carry the key
    const m = /^Bearer\s+(.+)$/i.exec(authorization ?? '');
    if (m && timingSafeEqual(sha256(m[1]!.trim()), expected)) return undefined;
    return new HttpError(401, 'invalid_request_error', 'invalid_api_key', 'Missing or invalid API key (Authorization: Bearer <key>)');
  };
}

/**
 * Without an API key, requests must name the server by IP address or as localhost (Host header), or
 * by a name in `allowedHosts`: a web page the user visits can otherwise reach a server on their
 * machine by DNS rebinding (its own name resolving to 127.0.0.1, so the browser sees one origin) and
 * read every session's memory. With a key that page cannot authenticate, so any name passes. `*` in
 * `allowedHosts` allows every name. /health is exempt (load balancers' probes name what they like).
 */
export function hostCheck(apiKey: string | undefined, allowedHosts: readonly string[]): (url: string, host: string | undefined) => HttpError | undefined {
  const allowed = new Set(allowedHosts.map((h) => h.toLowerCase()));
  if (apiKey !== undefined || allowed.has('*')) return () => undefined;
  return (url, host) => {
    if (url.split('?')[0] === '/health' || host === undefined || host === '') return undefined;
    const name = (host.startsWith('[') ? host.slice(1, host.indexOf(']')) : host.replace(/:\d*$/, '')).toLowerCase().replace(/\.$/, '');
    if (isIP(name) !== 0 || name === 'localhost' || name.endsWith('.localhost') || allowed.has(name)) return undefined;
    return new HttpError(403, 'invalid_request_error', 'forbidden_host',
      `This server has no API key, so it answers only requests that name it by IP address or as localhost (Host '${name.slice(0, 100)}'); set an API key, or list the name in allowedHosts (--allowed-hosts)`);
  };
}
