// Every code the native core throws (FML_ERROR_CODES, exported by the addon) maps to its own class.
import { describe, expect, it } from 'vitest';
import { getBinding } from '../../src/local/binding.ts';
import { FiniteMemoryError, InferenceError, NATIVE_ERROR_CLASSES, fromNativeError } from '../../src/shared/errors.ts';

describe('native error codes', () => {
  it('the addon and src/shared/errors.ts list the same codes', () => {
    expect([...getBinding().errorCodes].sort()).toEqual(Object.keys(NATIVE_ERROR_CLASSES).sort());
  });

  it('each code becomes a FiniteMemoryError with that code, keeping the caller stack', () => {
    for (const code of getBinding().errorCodes) {
      const err = fromNativeError(Object.assign(new Error(`native ${code}`), { code }), new Error().stack);
      expect(err).toBeInstanceOf(FiniteMemoryError);
      expect(err.code).toBe(code);
      expect(err.message).toBe(`native ${code}`);
      expect(err.stack).toContain('errors.test.ts');
      // Only INTERNAL falls to the generic class: every other code has a specific one.
      if (code !== 'INTERNAL') expect(err.constructor).not.toBe(FiniteMemoryError);
    }
  });

  it('an unknown or missing code is INTERNAL, never a crash', () => {
    expect(fromNativeError(Object.assign(new Error('x'), { code: 'NO_SUCH_CODE' })).code).toBe('INTERNAL');
    expect(fromNativeError(Object.assign(new Error('x'), { code: 'toString' }))).toBeInstanceOf(InferenceError);
    expect(fromNativeError('plain string').message).toBe('plain string');
  });
});

describe('server errors', () => {
  it('a session store that fails mid-request is a 503 to retry, as when it is unreachable at the start', async () => {
    const { toHttpError } = await import('../../src/server/wire.ts');
    const { StoreUnavailableError } = await import('../../src/server/store/backend.ts');
    const e = toHttpError(new StoreUnavailableError('The session store (Redis) failed: socket closed'));
    expect(e).toMatchObject({ status: 503, code: 'session_store_unavailable', headers: { 'retry-after': '1' } });
    expect(e.message).not.toContain('socket');
  });
});
