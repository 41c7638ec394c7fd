/**
 * Every error this library throws is a `FiniteMemoryError` with a stable string `code`. Errors from
 * the native core arrive with the same codes (native/util/error.h) and are mapped to these classes.
 */
export type ErrorCode =
  | 'MODEL_NOT_FOUND'
  | 'MODEL_INVALID'
  | 'MODEL_LOAD_FAILED'
  | 'CONTEXT_CREATE_FAILED'
  | 'INVALID_OPTION'
  | 'PROMPT_TOO_LARGE'
  | 'PIN_LIMIT'
  | 'DECODE_FAILED'
  | 'KV_OPERATION_FAILED'
  | 'CHAT_BUSY'
  | 'ABORTED'
  | 'DISPOSED'
  | 'TEMPLATE_FAILED'
  | 'UNSUPPORTED_MODEL'
  | 'NATIVE_BINDING_NOT_FOUND'
  | 'CHECKPOINT_IO'
  | 'CHECKPOINT_CORRUPT'
  | 'CHECKPOINT_VERSION'
  | 'CHECKPOINT_MODEL_MISMATCH'
  | 'REMOTE_HTTP_ERROR'
  | 'REMOTE_UNAVAILABLE'
  | 'REMOTE_TIMEOUT'
  | 'CIRCUIT_OPEN'
  | 'CALLBACK_FAILED'
  | 'INTERNAL';

export class FiniteMemoryError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The model file is missing or unreadable. */
export class ModelNotFoundError extends FiniteMemoryError {
  constructor(message: string) { super('MODEL_NOT_FOUND', message); }
}
/** The file is not a valid GGUF model (bad magic, malformed or truncated). */
export class ModelInvalidError extends FiniteMemoryError {
  constructor(message: string) { super('MODEL_INVALID', message); }
}
/** llama.cpp refused the model or a context could not be created for it. */
export class ModelLoadError extends FiniteMemoryError {
  constructor(message: string, code: 'MODEL_LOAD_FAILED' | 'CONTEXT_CREATE_FAILED' = 'MODEL_LOAD_FAILED') { super(code, message); }
}
/** An option or argument has the wrong type or an impossible value. */
export class InvalidOptionError extends FiniteMemoryError {
  constructor(message: string) { super('INVALID_OPTION', message); }
}
/** A message (or system prompt) cannot fit in the chat's token budget even after eviction. */
export class PromptTooLargeError extends FiniteMemoryError {
  constructor(message: string) { super('PROMPT_TOO_LARGE', message); }
}
/** Pinning would leave no room for the next turn: pins count against maxTokens. Nothing was pinned. */
export class PinLimitError extends FiniteMemoryError {
  constructor(message: string) { super('PIN_LIMIT', message); }
}
/** A second `send` was made while a turn was still running on the same chat. */
export class ChatBusyError extends FiniteMemoryError {
  constructor(message = 'a turn is already running on this chat; await it (or abort it) before sending again') { super('CHAT_BUSY', message); }
}
/** An operation that has no partial result (a transcript import) was aborted through its signal. */
export class AbortedError extends FiniteMemoryError {
  constructor(message = 'the operation was aborted') { super('ABORTED', message); }
}
/** The object was disposed. */
export class DisposedError extends FiniteMemoryError {
  constructor(what: string, message = `${what} is disposed`) { super('DISPOSED', message); }
}
/** llama.cpp failed while evaluating tokens or mutating the KV cache. */
export class InferenceError extends FiniteMemoryError {
  constructor(code: 'DECODE_FAILED' | 'KV_OPERATION_FAILED' | 'TEMPLATE_FAILED' | 'INTERNAL', message: string) { super(code, message); }
}
/**
 * A checkpoint could not be written or read: `CHECKPOINT_IO` (path missing, a directory, not writable),
 * `CHECKPOINT_CORRUPT` (truncated, bad checksum, malformed), `CHECKPOINT_VERSION` (written by a newer
 * format), `CHECKPOINT_MODEL_MISMATCH` (made with another model). The chat involved is left untouched.
 */
export class CheckpointError extends FiniteMemoryError {
  constructor(code: 'CHECKPOINT_IO' | 'CHECKPOINT_CORRUPT' | 'CHECKPOINT_VERSION' | 'CHECKPOINT_MODEL_MISMATCH', message: string) { super(code, message); }
}
/** The native addon could not be loaded. */
export class NativeBindingError extends FiniteMemoryError {
  constructor(message: string, cause?: unknown) { super('NATIVE_BINDING_NOT_FOUND', message, { cause }); }
}

/** The model's architecture cannot keep a finite memory in place (M-RoPE, recurrent or hybrid state); the message names it and why. */
export class UnsupportedModelError extends FiniteMemoryError {
  constructor(message: string) { super('UNSUPPORTED_MODEL', message); }
}

/**
 * A callback of the caller threw. `onToken`: the turn stopped at that piece (as an abort does) and is
 * kept, in memory, stats and transcript alike, with what was generated up to there (`result`).
 * loadModel's `onProgress`: the load finished and the model was disposed (`result` undefined). `cause`
 * is what the callback threw.
 */
export class CallbackError<R = unknown> extends FiniteMemoryError {
  constructor(readonly result: R, cause: unknown) {
    const what = result === undefined ? 'the onProgress callback threw' : 'the onToken (or onReasoning) callback threw';
    const then = result === undefined ? 'the model was not kept' : 'the turn stopped there and is kept';
    super('CALLBACK_FAILED', `${what} (${cause instanceof Error ? cause.message : String(cause)}); ${then}`, { cause });
  }
}

// The remote backend's errors (src/remote/).
/** The remote answered with an HTTP error (4xx, or 429/5xx after the retries). `status` is the HTTP status. */
export class RemoteHttpError extends FiniteMemoryError {
  constructor(readonly status: number, message: string, readonly attempts: number) {
    super('REMOTE_HTTP_ERROR', message);
  }
}
/** The remote could not be reached, or the connection dropped (after the retries, or mid-stream). */
export class RemoteUnavailableError extends FiniteMemoryError {
  constructor(message: string, readonly attempts: number, cause?: unknown) {
    super('REMOTE_UNAVAILABLE', message, { cause });
  }
}
/** An attempt ran past `timeoutMs` (after the retries). */
export class RemoteTimeoutError extends FiniteMemoryError {
  constructor(message: string, readonly attempts: number) {
    super('REMOTE_TIMEOUT', message);
  }
}
/** The circuit breaker is open: the request was refused without reaching the remote. */
export class CircuitOpenError extends FiniteMemoryError {
  constructor(readonly retryAfterMs: number) {
    super('CIRCUIT_OPEN', `the remote failed repeatedly; requests fail fast for another ${Math.ceil(retryAfterMs)} ms`);
  }
}

/** The class of each code the native core throws (FML_ERROR_CODES in native/util/error.h; a test checks both lists agree). */
export const NATIVE_ERROR_CLASSES: Readonly<Record<string, (message: string) => FiniteMemoryError>> = {
  MODEL_NOT_FOUND: (m) => new ModelNotFoundError(m),
  MODEL_INVALID: (m) => new ModelInvalidError(m),
  MODEL_LOAD_FAILED: (m) => new ModelLoadError(m),
  CONTEXT_CREATE_FAILED: (m) => new ModelLoadError(m, 'CONTEXT_CREATE_FAILED'),
  INVALID_OPTION: (m) => new InvalidOptionError(m),
  PROMPT_TOO_LARGE: (m) => new PromptTooLargeError(m),
  PIN_LIMIT: (m) => new PinLimitError(m),
  DECODE_FAILED: (m) => new InferenceError('DECODE_FAILED', m),
  KV_OPERATION_FAILED: (m) => new InferenceError('KV_OPERATION_FAILED', m),
  CHAT_BUSY: (m) => new ChatBusyError(m),
  ABORTED: (m) => new AbortedError(m),
  DISPOSED: (m) => new DisposedError('object', m),
  TEMPLATE_FAILED: (m) => new InferenceError('TEMPLATE_FAILED', m),
  UNSUPPORTED_MODEL: (m) => new UnsupportedModelError(m),
  CHECKPOINT_IO: (m) => new CheckpointError('CHECKPOINT_IO', m),
  CHECKPOINT_CORRUPT: (m) => new CheckpointError('CHECKPOINT_CORRUPT', m),
  CHECKPOINT_VERSION: (m) => new CheckpointError('CHECKPOINT_VERSION', m),
  CHECKPOINT_MODEL_MISMATCH: (m) => new CheckpointError('CHECKPOINT_MODEL_MISMATCH', m),
  INTERNAL: (m) => new InferenceError('INTERNAL', m),
};

/**
 * Maps an error thrown by the native addon to its typed class. `callerStack` (an `new Error().stack`
 * taken where the public method was called, before any await) replaces the native stack, which
 * would otherwise point into the addon or the event loop.
 */
export function fromNativeError(err: unknown, callerStack?: string): FiniteMemoryError {
  if (err instanceof FiniteMemoryError) return err;
  const e = err as { code?: unknown; message?: unknown };
  const message = typeof e?.message === 'string' ? e.message : String(err);
  const make = (typeof e?.code === 'string' && Object.hasOwn(NATIVE_ERROR_CLASSES, e.code) ? NATIVE_ERROR_CLASSES[e.code] : undefined) ?? NATIVE_ERROR_CLASSES.INTERNAL!;
  const out = make(message);
  if (callerStack) out.stack = `${out.name}: ${message}\n${callerStack.split('\n').slice(1).join('\n')}`;
  return out;
}
