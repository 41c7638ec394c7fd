export { loadModel, Model, type ImportTranscriptOptions } from './model.js';
export { Chat } from './chat.js';
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
  CheckpointError,
  type ErrorCode,
} from './errors.js';
export type { LoadModelOptions, ChatOptions, SendOptions, PolicyName, KvType } from './options.js';
export type { TurnResult, TurnStats, ChatStats, MemoryEntry, ModelInfo, StopReason, Transcript } from './types.js';
export { POLICIES } from './options.js';
export type { Telemetry, TurnEvent, EvictionEvent } from './telemetry.js';
export { createPrometheusTelemetry, type PrometheusTelemetry, type PrometheusTelemetryOptions } from './prometheus.js';

import { getBinding, loadedBinary } from './binding.js';
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
} from './remote.js';
