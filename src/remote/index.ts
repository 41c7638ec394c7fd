// The remote backend: connectRemote (connect.ts) makes RemoteChats (chat.ts, with memory.ts and
// options.ts) over one Transport with retries and a circuit breaker (transport.ts).
export * from './connect.js';
export * from './chat.js';
