export { loadModel, Model, readCheckpointMessages, type ImportTranscriptOptions, type PrepareToolsOptions } from './local/model.js';
export { Chat } from './local/chat.js';
export { jsonSchemaToGrammar } from './local/grammar.js';
export {
  FiniteMemoryError,
  ModelNotFoundError,
  ModelInvalidError,
  ModelLoadError,
  InvalidOptionError,
  PromptTooLargeError,
  PinLimitError,
  ChatBusyError,
  AbortedError,
  DisposedError,
  InferenceError,
  UnsupportedModelError,
  NativeBindingError,
  CallbackError,
  CheckpointError,
  type ErrorCode,
} from './shared/errors.js';
export type { LoadModelOptions, ChatOptions, SendOptions } from './local/options.js';
export type { PolicyName, KvType } from './shared/types.js';
export type { TurnResult, TurnStats, ChatStats, MemoryEntry, ModelInfo, StopReason, Transcript, ToolCall, ToolResult, ToolDefinition, ToolChoice } from './shared/types.js';
export { POLICIES } from './shared/types.js';
export type { Telemetry, TurnEvent, EvictionEvent } from './shared/telemetry.js';
export { createPrometheusTelemetry, type PrometheusTelemetry, type PrometheusTelemetryOptions } from './shared/prometheus.js';

import { getBinding, loadedBinary } from './local/binding.js';
/** The binary in use (CPU or CUDA variant and its path), llama.cpp's version and CPU feature line. */
export function systemInfo(): { llamaCpp: string; features: string; variant: 'cpu' | 'cuda'; binary: string; gpuDevices: number } {
  const b = getBinding();
  const loaded = loadedBinary()!;
  return { llamaCpp: b.llamaCppVersion, features: b.systemInfo(), variant: loaded.variant, binary: loaded.path, gpuDevices: b.gpuDeviceCount() };
}
export {
  connectRemote,
  RemoteChat,
  RemoteHttpError,
  RemoteUnavailableError,
  RemoteTimeoutError,
  CircuitOpenError,
  type RemoteOptions,
  type RemoteChatOptions,
  type RemoteSendOptions,
  type RemoteTurnResult,
  type RemoteTurnStats,
  type RemoteChatStats,
  type RemoteMemoryEntry,
  type RemoteTelemetry,
  type RemoteTurnEvent,
  type RemoteConnection,
  type RemotePolicyName,
  type RemoteTokenizer,
  type RetryOptions,
  type CircuitOptions,
} from './remote/index.js';

// One chat surface: code written against ChatSurface runs on a local and a remote chat alike.
import type { Chat } from './local/chat.js';
import type { RemoteChat } from './remote/index.js';
import type { ChatSurface } from './shared/chat-surface.js';
export type { ChatSurface, CommonSendOptions, CommonTurnResult, CommonChatStats } from './shared/chat-surface.js';
/** What only a local chat has (the KV cache's own operations: pins, forget, checkpoints, token-level memory). */
export type LocalOnly = Exclude<keyof Chat, keyof ChatSurface>;
/** What only a remote chat has. */
export type RemoteOnly = Exclude<keyof RemoteChat, keyof ChatSurface>;
