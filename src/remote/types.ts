/** The remote chat's public types (options, results, stats, memory entries, telemetry). */
import type { TelemetryHooks } from '../shared/telemetry.js';
import type { CommonChatStats, CommonSendOptions, CommonTurnResult, StopReason, ToolDefinition } from '../shared/types.js';

export type RemotePolicyName = 'sliding' | 'rolling_summary' | 'hybrid';

export interface RemoteChatOptions {
  /** Default 'sliding'. 'importance' and 'semantic' need the local KV cache and are refused. */
  policy?: RemotePolicyName;
  /** Most tokens the request's messages (system prompt, summary, history) may hold after a turn. Default 4096. */
  maxTokens?: number;
  systemPrompt?: string;
  /** rolling_summary/hybrid: longest summary (tokens, also its `max_tokens`). Default max(8, min(256, maxTokens / 8)). */
  summaryTokens?: number;
  /** hybrid: when summarizing, history is cut down to this many tokens of newest messages. Default maxTokens / 2. */
  windowSize?: number;
  /** OpenAI's tool list, sent with every request (the remote renders it; its tokens count in no budget here). */
  tools?: ToolDefinition[];
  telemetry?: RemoteTelemetry;
}

/** The common send() options (temperature, seed and stop are sent as they are); what differs is documented here. */
export interface RemoteSendOptions extends CommonSendOptions {
  /** Sent as `max_tokens`. Default 256. */
  maxNewTokens?: number;
  /** Streams the reply (SSE) and receives each piece. A stream that breaks after its first piece is not retried. */
  onToken?: (piece: string) => void;
  /** Aborts at once (also during a backoff sleep); the turn resolves with stopReason 'abort'. */
  signal?: AbortSignal;
}

export interface RemoteTurnStats {
  /** Tokens of the messages sent (counted locally, see tokenCounter). */
  promptTokens: number;
  /** The server's `usage.completion_tokens`, else the reply counted locally. */
  generatedTokens: number;
  /** Tokens retained after the turn (<= maxTokens). */
  retainedTokens: number;
  evictedTokens: number;
  evictedMessages: number;
  /** Summary requests made this turn and their time. */
  summaries: number;
  summaryMs: number;
  summaryTokens: number;
  /** HTTP attempts of the turn's completion request (1 = no retry). */
  attempts: number;
  latencyMs: number;
  tokenCounter: 'model' | 'estimate';
  policy: RemotePolicyName;
}

export interface RemoteTurnResult extends CommonTurnResult {
  stats: RemoteTurnStats;
}

export interface RemoteChatStats extends CommonChatStats {
  messagesRetained: number;
  summaries: number;
  tokenCounter: 'model' | 'estimate';
}

/** One message the chat still sends. */
export interface RemoteMemoryEntry {
  role: 'system' | 'summary' | 'user' | 'assistant' | 'tool';
  content: string;
  tokens: number;
}

export interface RemoteTurnEvent {
  chatId: string;
  policy: RemotePolicyName;
  turn: number;
  stopReason: StopReason;
  stats: RemoteTurnStats;
  chat: RemoteChatStats;
}

/** Same hooks and contract as a local chat's `Telemetry` (one emitter runs both); no eviction events. */
export type RemoteTelemetry = Omit<TelemetryHooks<RemoteTurnEvent>, 'onEviction'>;
