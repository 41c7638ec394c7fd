export { loadModel, Model } from './model.js';
export { Chat } from './chat.js';
export {
  FiniteMemoryError,
  ModelNotFoundError,
  ModelInvalidError,
  ModelLoadError,
  InvalidOptionError,
  PromptTooLargeError,
  ChatBusyError,
  DisposedError,
  InferenceError,
  NativeBindingError,
  CheckpointError,
  type ErrorCode,
} from './errors.js';
export type { LoadModelOptions, ChatOptions, SendOptions, PolicyName, KvType } from './options.js';
export type { TurnResult, TurnStats, ChatStats, MemoryEntry, ModelInfo, StopReason, Transcript } from './types.js';
export { POLICIES } from './options.js';
export type { Telemetry, TurnEvent, EvictionEvent } from './telemetry.js';
export { createPrometheusTelemetry, type PrometheusTelemetry, type PrometheusTelemetryOptions } from './prometheus.js';

import { getBinding } from './binding.js';
/** llama.cpp's CPU feature line and version this addon was built with. */
export function systemInfo(): { llamaCpp: string; features: string } {
  const b = getBinding();
  return { llamaCpp: b.llamaCppVersion, features: b.systemInfo() };
}
