/**
 * GGUF v3 writer and generators of small models with seeded random weights (the package's
 * `finite-memory-llm/gguf-writer` entry point). Only Node built-ins are used.
 *
 *   gguf/format.ts     value and tensor types, the streaming writer
 *   gguf/encode.ts     f16 / Q8_0 encodings
 *   gguf/random.ts     seeded PRNG
 *   gguf/vocab.ts      SentencePiece-style vocabulary with byte fallback
 *   gguf/templates.ts  the families' chat templates and their control tokens
 *   gguf/model-options.ts  the model families, their options and defaults
 *   gguf/models.ts     a model file: metadata, embeddings, output (the families in model-options.ts)
 *   gguf/layers.ts     the families' transformer blocks
 */
export * from './format.js';
export * from './encode.js';
export * from './random.js';
export * from './vocab.js';
export * from './templates.js';
export * from './models.js';
