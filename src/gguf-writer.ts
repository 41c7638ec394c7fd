/**
 * Tiny GGUF v3 writer plus a generator for small llama-architecture models
 * with seeded random weights and a SentencePiece-style ("llama") vocabulary
 * with byte fallback and a ChatML chat template.
 *
 * Only Node built-ins are used. Tensor data is produced and written in
 * chunks, so large-but-shallow models (e.g. 32 layers, wide attention) can
 * be generated without holding the weights in memory.
 *
 * GGUF layout (all little-endian):
 *   magic "GGUF" | u32 version (3) | u64 tensor_count | u64 kv_count
 *   kv_count x (string key, u32 value type, value)
 *   tensor_count x (string name, u32 n_dims, u64 ne[n_dims] (fastest first),
 *                   u32 ggml type, u64 offset relative to the data section)
 *   padding to general.alignment | tensor data (each tensor padded to alignment)
 */
import * as fs from 'node:fs';
import * as os from 'node:os';

// ---------------------------------------------------------------------------
// GGUF constants
// ---------------------------------------------------------------------------

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

/** GGUF metadata value types (gguf_type). */
export const GGUFValueType = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;
export type GGUFValueType = (typeof GGUFValueType)[keyof typeof GGUFValueType];

/** Scalar (non-array) metadata value types. */
export type GGUFScalarType = Exclude<GGUFValueType, typeof GGUFValueType.ARRAY>;

/** ggml tensor types this writer can emit. */
export const GGMLType = {
  F32: 0,
  F16: 1,
  Q8_0: 8,
} as const;
export type GGMLType = (typeof GGMLType)[keyof typeof GGMLType];

/** llama_ftype values for general.file_type. */
const LLAMA_FTYPE: Record<WeightType, number> = { f32: 0, f16: 1, q8_0: 7 };

export const QK8_0 = 32; // values per Q8_0 block
export const Q8_0_BLOCK_BYTES = 2 + QK8_0; // f16 scale + 32 x int8

/** Bytes needed to store `n` values (one row or a whole tensor) of `type`. */
export function ggmlTypeSize(type: GGMLType, n: number): number {
  switch (type) {
    case GGMLType.F32:
      return 4 * n;
    case GGMLType.F16:
      return 2 * n;
    case GGMLType.Q8_0:
      if (n % QK8_0 !== 0) {
        throw new Error(`Q8_0 needs a multiple of ${QK8_0} values, got ${n}`);
      }
      return (n / QK8_0) * Q8_0_BLOCK_BYTES;
    default:
      throw new Error(`unsupported ggml type ${String(type)}`);
  }
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

// ---------------------------------------------------------------------------
// Number conversion helpers
// ---------------------------------------------------------------------------

const LITTLE_ENDIAN = os.endianness() === 'LE';
const convF32 = new Float32Array(1);
const convU32 = new Uint32Array(convF32.buffer);

/** IEEE 754 binary32 -> binary16 bits, round-to-nearest-even (like ggml's conversion). */
export function f32ToF16Bits(value: number): number {
  convF32[0] = value;
  const x = convU32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) {
    return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0); // inf / NaN
  }
  const e = exp - 127 + 15;
  if (e >= 0x1f) {
    return sign | 0x7c00; // overflow -> inf
  }
  if (e <= 0) {
    // subnormal half (or zero)
    if (e < -10) return sign;
    const full = mant | 0x800000;
    const shift = 14 - e;
    let half = full >>> shift;
    const rem = full & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1) !== 0)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1) !== 0)) half++; // carry into exponent is correct
  return sign | half;
}

/** binary16 bits -> number. */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant !== 0 ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** roundf(): half away from zero (Math.round rounds half towards +inf). */
function roundHalfAway(v: number): number {
  return v < 0 ? -Math.round(-v) : Math.round(v);
}

/**
 * Encode `src` (length n) as `type` into `dst` starting at byte `offset`.
 * Returns the number of bytes written. For Q8_0, n must be a multiple of 32
 * (blocks never straddle calls as long as rows are encoded whole).
 */
export function encodeValues(src: Float32Array, type: GGMLType, dst: Buffer, offset: number): number {
  const n = src.length;
  switch (type) {
    case GGMLType.F32: {
      if (LITTLE_ENDIAN) {
        dst.set(new Uint8Array(src.buffer, src.byteOffset, 4 * n), offset);
      } else {
        for (let i = 0; i < n; i++) dst.writeFloatLE(src[i]!, offset + 4 * i);
      }
      return 4 * n;
    }
    case GGMLType.F16: {
      if (LITTLE_ENDIAN && (dst.byteOffset + offset) % 2 === 0) {
        const h = new Uint16Array(dst.buffer, dst.byteOffset + offset, n);
        for (let i = 0; i < n; i++) h[i] = f32ToF16Bits(src[i]!);
      } else {
        for (let i = 0; i < n; i++) dst.writeUInt16LE(f32ToF16Bits(src[i]!), offset + 2 * i);
      }
      return 2 * n;
    }
    case GGMLType.Q8_0: {
      if (n % QK8_0 !== 0) throw new Error(`Q8_0 needs a multiple of ${QK8_0} values, got ${n}`);
      let o = offset;
      for (let b = 0; b < n; b += QK8_0) {
        let amax = 0;
        for (let j = 0; j < QK8_0; j++) {
          const a = Math.abs(src[b + j]!);
          if (a > amax) amax = a;
        }
        const d = amax / 127;
        const id = d !== 0 ? 1 / d : 0;
        dst.writeUInt16LE(f32ToF16Bits(d), o);
        o += 2;
        for (let j = 0; j < QK8_0; j++) {
          dst.writeInt8(roundHalfAway(src[b + j]! * id), o++);
        }
      }
      return o - offset;
    }
    default:
      throw new Error(`unsupported ggml type ${String(type)}`);
  }
}

// ---------------------------------------------------------------------------
// Seeded PRNG
// ---------------------------------------------------------------------------

/** FNV-1a over a string, mixed with a seed; used to derive per-tensor seeds. */
export function hashSeed(seed: number, label: string): number {
  let h = (0x811c9dc5 ^ (seed >>> 0)) >>> 0;
  h = Math.imul(h, 0x01000193) >>> 0;
  for (let i = 0; i < label.length; i++) {
    h ^= label.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  // final avalanche (murmur3 fmix32)
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b) >>> 0;
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35) >>> 0;
  h ^= h >>> 16;
  return h >>> 0;
}

/** mulberry32 uniform PRNG with a Box-Muller normal sampler. Deterministic for a given seed. */
export class SeededRandom {
  private state: number;
  private spare = 0;
  private hasSpare = false;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) | 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** Standard normal sample. */
  normal(): number {
    if (this.hasSpare) {
      this.hasSpare = false;
      return this.spare;
    }
    const u1 = 1 - this.next(); // (0, 1]
    const u2 = this.next();
    const r = Math.sqrt(-2 * Math.log(u1));
    const theta = 2 * Math.PI * u2;
    this.spare = r * Math.sin(theta);
    this.hasSpare = true;
    return r * Math.cos(theta);
  }
}

// ---------------------------------------------------------------------------
// GGUF writer
// ---------------------------------------------------------------------------

type ScalarValue = number | bigint | boolean | string;

interface KVEntry {
  key: string;
  type: GGUFValueType;
  value: ScalarValue;
  itemType?: GGUFScalarType;
  items?: readonly ScalarValue[];
}

/** Produces a tensor's data; must call `emit` with exactly the tensor's byte size in total. */
export type TensorProducer = (emit: (chunk: Uint8Array) => void) => void;

export interface TensorSpec {
  name: string;
  /** Dimensions, fastest-varying first (ggml ne[0], ne[1], ...). */
  dims: readonly number[];
  type: GGMLType;
  produce: TensorProducer;
}

interface TensorEntry extends TensorSpec {
  nbytes: number;
  offset: number;
}

/** Growable little-endian byte builder for the header/metadata section. */
class ByteBuilder {
  private buf = Buffer.alloc(1 << 16);
  length = 0;

  private ensure(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.length + n) cap *= 2;
    const next = Buffer.alloc(cap);
    this.buf.copy(next, 0, 0, this.length);
    this.buf = next;
  }
  u8(v: number): void {
    this.ensure(1);
    this.buf.writeUInt8(v, this.length);
    this.length += 1;
  }
  i8(v: number): void {
    this.ensure(1);
    this.buf.writeInt8(v, this.length);
    this.length += 1;
  }
  u16(v: number): void {
    this.ensure(2);
    this.buf.writeUInt16LE(v, this.length);
    this.length += 2;
  }
  i16(v: number): void {
    this.ensure(2);
    this.buf.writeInt16LE(v, this.length);
    this.length += 2;
  }
  u32(v: number): void {
    this.ensure(4);
    this.buf.writeUInt32LE(v >>> 0, this.length);
    this.length += 4;
  }
  i32(v: number): void {
    this.ensure(4);
    this.buf.writeInt32LE(v, this.length);
    this.length += 4;
  }
  f32(v: number): void {
    this.ensure(4);
    this.buf.writeFloatLE(v, this.length);
    this.length += 4;
  }
  f64(v: number): void {
    this.ensure(8);
    this.buf.writeDoubleLE(v, this.length);
    this.length += 8;
  }
  u64(v: number | bigint): void {
    this.ensure(8);
    this.buf.writeBigUInt64LE(BigInt(v), this.length);
    this.length += 8;
  }
  i64(v: number | bigint): void {
    this.ensure(8);
    this.buf.writeBigInt64LE(BigInt(v), this.length);
    this.length += 8;
  }
  str(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.u64(bytes.length);
    this.ensure(bytes.length);
    bytes.copy(this.buf, this.length);
    this.length += bytes.length;
  }
  zeros(n: number): void {
    this.ensure(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  bytes(): Buffer {
    return this.buf.subarray(0, this.length);
  }
}

function expectNumber(v: ScalarValue, key: string): number {
  if (typeof v !== 'number') throw new TypeError(`GGUF key ${key}: expected a number, got ${typeof v}`);
  return v;
}

function writeScalar(b: ByteBuilder, type: GGUFScalarType, v: ScalarValue, key: string): void {
  switch (type) {
    case GGUFValueType.UINT8:
      b.u8(expectNumber(v, key));
      break;
    case GGUFValueType.INT8:
      b.i8(expectNumber(v, key));
      break;
    case GGUFValueType.UINT16:
      b.u16(expectNumber(v, key));
      break;
    case GGUFValueType.INT16:
      b.i16(expectNumber(v, key));
      break;
    case GGUFValueType.UINT32:
      b.u32(expectNumber(v, key));
      break;
    case GGUFValueType.INT32:
      b.i32(expectNumber(v, key));
      break;
    case GGUFValueType.FLOAT32:
      b.f32(expectNumber(v, key));
      break;
    case GGUFValueType.FLOAT64:
      b.f64(expectNumber(v, key));
      break;
    case GGUFValueType.BOOL:
      if (typeof v !== 'boolean') throw new TypeError(`GGUF key ${key}: expected a boolean`);
      b.u8(v ? 1 : 0);
      break;
    case GGUFValueType.STRING:
      if (typeof v !== 'string') throw new TypeError(`GGUF key ${key}: expected a string`);
      b.str(v);
      break;
    case GGUFValueType.UINT64:
      if (typeof v !== 'number' && typeof v !== 'bigint') throw new TypeError(`GGUF key ${key}: expected an integer`);
      b.u64(v);
      break;
    case GGUFValueType.INT64:
      if (typeof v !== 'number' && typeof v !== 'bigint') throw new TypeError(`GGUF key ${key}: expected an integer`);
      b.i64(v);
      break;
    default:
      throw new Error(`GGUF key ${key}: unsupported value type ${String(type)}`);
  }
}

/**
 * Collects metadata and tensor specs, then writes a GGUF v3 file in one pass:
 * header + metadata + tensor infos are built in memory (small), tensor data is
 * streamed through a fixed-size buffer.
 */
export class GGUFWriter {
  readonly alignment: number;
  private readonly kvs: KVEntry[] = [];
  private readonly tensors: TensorEntry[] = [];
  private dataSize = 0;

  constructor(alignment: number = GGUF_DEFAULT_ALIGNMENT) {
    if (!Number.isInteger(alignment) || alignment <= 0 || alignment % 8 !== 0) {
      throw new Error(`alignment must be a positive multiple of 8, got ${alignment}`);
    }
    this.alignment = alignment;
    this.addUint32('general.alignment', alignment);
  }

  private addKV(entry: KVEntry): this {
    if (this.kvs.some((kv) => kv.key === entry.key)) throw new Error(`duplicate GGUF key ${entry.key}`);
    this.kvs.push(entry);
    return this;
  }

  add(key: string, type: GGUFScalarType, value: ScalarValue): this {
    return this.addKV({ key, type, value });
  }
  addString(key: string, value: string): this {
    return this.add(key, GGUFValueType.STRING, value);
  }
  addUint32(key: string, value: number): this {
    return this.add(key, GGUFValueType.UINT32, value);
  }
  addInt32(key: string, value: number): this {
    return this.add(key, GGUFValueType.INT32, value);
  }
  addUint64(key: string, value: number | bigint): this {
    return this.add(key, GGUFValueType.UINT64, value);
  }
  addFloat32(key: string, value: number): this {
    return this.add(key, GGUFValueType.FLOAT32, value);
  }
  addBool(key: string, value: boolean): this {
    return this.add(key, GGUFValueType.BOOL, value);
  }
  addArray(key: string, itemType: GGUFScalarType, items: readonly ScalarValue[]): this {
    return this.addKV({ key, type: GGUFValueType.ARRAY, value: 0, itemType, items });
  }
  addStringArray(key: string, items: readonly string[]): this {
    return this.addArray(key, GGUFValueType.STRING, items);
  }
  addInt32Array(key: string, items: readonly number[]): this {
    return this.addArray(key, GGUFValueType.INT32, items);
  }
  addFloat32Array(key: string, items: readonly number[]): this {
    return this.addArray(key, GGUFValueType.FLOAT32, items);
  }

  addTensor(spec: TensorSpec): this {
    if (this.tensors.some((t) => t.name === spec.name)) throw new Error(`duplicate tensor ${spec.name}`);
    if (spec.dims.length < 1 || spec.dims.length > 4) throw new Error(`tensor ${spec.name}: 1..4 dims required`);
    for (const d of spec.dims) {
      if (!Number.isInteger(d) || d <= 0) throw new Error(`tensor ${spec.name}: invalid dim ${d}`);
    }
    const ne0 = spec.dims[0]!;
    const nrows = spec.dims.slice(1).reduce((a, b) => a * b, 1);
    if (spec.type === GGMLType.Q8_0 && ne0 % QK8_0 !== 0) {
      throw new Error(
        `tensor ${spec.name}: Q8_0 requires the row length (ne[0] = ${ne0}) to be a multiple of ${QK8_0}`,
      );
    }
    const nbytes = ggmlTypeSize(spec.type, ne0) * nrows;
    const offset = this.dataSize;
    this.dataSize = alignUp(offset + nbytes, this.alignment);
    this.tensors.push({ ...spec, nbytes, offset });
    return this;
  }

  /** Names, shapes, types, byte sizes and data-section offsets of the tensors added so far. */
  tensorInfos(): TensorSummary[] {
    return this.tensors.map((t) => ({ name: t.name, dims: [...t.dims], type: t.type, nbytes: t.nbytes, offset: t.offset }));
  }

  /** Serialized header + metadata + tensor infos, padded to the alignment. */
  private buildHeader(): Buffer {
    const b = new ByteBuilder();
    b.u32(GGUF_MAGIC);
    b.u32(GGUF_VERSION);
    b.u64(this.tensors.length);
    b.u64(this.kvs.length);
    for (const kv of this.kvs) {
      b.str(kv.key);
      b.u32(kv.type);
      if (kv.type === GGUFValueType.ARRAY) {
        const itemType = kv.itemType;
        const items = kv.items;
        if (itemType === undefined || items === undefined) throw new Error(`GGUF key ${kv.key}: missing array items`);
        b.u32(itemType);
        b.u64(items.length);
        for (const item of items) writeScalar(b, itemType, item, kv.key);
      } else {
        writeScalar(b, kv.type, kv.value, kv.key);
      }
    }
    for (const t of this.tensors) {
      b.str(t.name);
      b.u32(t.dims.length);
      for (const d of t.dims) b.u64(d);
      b.u32(t.type);
      b.u64(t.offset);
    }
    b.zeros(alignUp(b.length, this.alignment) - b.length);
    return b.bytes();
  }

  /** Writes the file; returns its total size in bytes. */
  write(path: string, chunkBytes = 1 << 20): number {
    const header = this.buildHeader();
    const fd = fs.openSync(path, 'w');
    try {
      let filePos = 0;
      const writeAll = (buf: Uint8Array): void => {
        let off = 0;
        while (off < buf.length) {
          off += fs.writeSync(fd, buf, off, buf.length - off, filePos + off);
        }
        filePos += buf.length;
      };
      writeAll(header);
      const dataStart = filePos;

      const out = Buffer.alloc(chunkBytes);
      let used = 0;
      const flush = (): void => {
        if (used > 0) writeAll(out.subarray(0, used));
        used = 0;
      };
      const push = (chunk: Uint8Array): void => {
        if (chunk.length >= out.length) {
          flush();
          writeAll(chunk);
          return;
        }
        if (used + chunk.length > out.length) flush();
        out.set(chunk, used);
        used += chunk.length;
      };

      let dataPos = 0;
      for (const t of this.tensors) {
        if (dataPos !== t.offset) throw new Error(`internal: tensor ${t.name} offset mismatch`);
        let produced = 0;
        t.produce((chunk) => {
          produced += chunk.length;
          if (produced > t.nbytes) throw new Error(`tensor ${t.name}: producer emitted too many bytes`);
          push(chunk);
        });
        if (produced !== t.nbytes) {
          throw new Error(`tensor ${t.name}: producer emitted ${produced} bytes, expected ${t.nbytes}`);
        }
        const padded = alignUp(t.offset + t.nbytes, this.alignment);
        if (padded > t.offset + t.nbytes) push(new Uint8Array(padded - t.offset - t.nbytes));
        dataPos = padded;
      }
      flush();
      if (filePos !== dataStart + this.dataSize) throw new Error('internal: file size mismatch');
      fs.closeSync(fd);
      return filePos;
    } catch (err) {
      fs.closeSync(fd);
      fs.rmSync(path, { force: true }); // do not leave a truncated model behind
      throw err;
    }
  }
}

// ---------------------------------------------------------------------------
// Vocabulary (SentencePiece-style, byte fallback)
// ---------------------------------------------------------------------------

/** llama_token_type values used in tokenizer.ggml.token_type. */
export const TokenType = {
  NORMAL: 1,
  UNKNOWN: 2,
  CONTROL: 3,
  USER_DEFINED: 4,
  UNUSED: 5,
  BYTE: 6,
} as const;

/** Fixed ids of the special tokens. */
export const SPECIAL_TOKEN_IDS = {
  unk: 0,
  bos: 1,
  eos: 2,
  imStart: 3,
  imEnd: 4,
  /** first byte-fallback token `<0x00>` */
  firstByte: 5,
} as const;

/** SentencePiece whitespace marker (U+2581). */
export const SPM_SPACE = '\u2581';

export const CHATML_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/** Common English words (most frequent first); each gets a `▁word` piece (plus all its prefixes). */
const COMMON_WORDS = `
the of and to in is you that it he was for on are as with his they at be this have from or one had
by but not what all were we when your can said there use an each which she do how their if will up
other about out many then them these so some her would make like him into time has look two more
write go see no way could people my than first been call who its now find long down day did get come
made may part new just know take year think also back after work well want because any give most very
over only little old right same tell where small end here why ask need home try again good world
help yes thank thanks please sorry question hello model memory token cache chat user assistant system
text finite context window remember forget
`;

/** How many of COMMON_WORDS (from the start) also get a bare piece without `▁`. */
const BARE_WORD_COUNT = 40;

/** Capitalised words commonly starting sentences (only the `▁`-prefixed piece is added). */
const CAPITALISED_WORDS = 'The I A It This That What How Why Yes No You We He She They In Hello Hi Thank Please';

/** Common subword pieces (both bare and `▁`-prefixed). */
const SUBWORDS = `
ing ed er es ly tion ment ness able al ous ive est ful less un re pre dis th st nd ou an in on at en or
ar ic it is le ve se ck ll ss 's n't 're 've 'll 'm 'd
`;

export interface Vocab {
  tokens: string[];
  scores: number[];
  types: number[];
}

function codepointLength(s: string): number {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

/**
 * Builds the vocabulary: `<unk>`, `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`,
 * 256 byte tokens, then normal pieces. Every multi-character normal piece has
 * all its prefixes in the vocabulary, so SPM bigram merging can reach it.
 * `extra` appends that many generated lowercase pieces.
 */
export function buildVocab(extra = 0): Vocab {
  const tokens: string[] = ['<unk>', '<s>', '</s>', '<|im_start|>', '<|im_end|>'];
  const types: number[] = [
    TokenType.UNKNOWN,
    TokenType.CONTROL,
    TokenType.CONTROL,
    TokenType.CONTROL,
    TokenType.CONTROL,
  ];
  const scores: number[] = [0, 0, 0, 0, 0];
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    types.push(TokenType.BYTE);
    scores.push(0);
  }

  const seen = new Set<string>(tokens);
  const normal: string[] = [];
  const addPiece = (piece: string): void => {
    if (piece.length === 0 || seen.has(piece)) return;
    seen.add(piece);
    normal.push(piece);
  };
  const addWithPrefixes = (piece: string): void => {
    const chars = [...piece];
    for (let i = 1; i <= chars.length; i++) addPiece(chars.slice(0, i).join(''));
  };

  addPiece(SPM_SPACE);
  // printable ASCII except space (space is represented by ▁ in SentencePiece)
  for (let c = 0x21; c <= 0x7e; c++) addPiece(String.fromCharCode(c));
  for (let c = 0x61; c <= 0x7a; c++) addPiece(SPM_SPACE + String.fromCharCode(c));

  const words = COMMON_WORDS.split(/\s+/).filter(Boolean);
  const subwords = SUBWORDS.split(/\s+/).filter(Boolean);
  const caps = CAPITALISED_WORDS.split(/\s+/).filter(Boolean);
  for (const w of words) addWithPrefixes(SPM_SPACE + w);
  for (const w of caps) addWithPrefixes(SPM_SPACE + w);
  for (const w of subwords) {
    addWithPrefixes(w);
    addWithPrefixes(SPM_SPACE + w);
  }
  // bare (no ▁) variants only for the most common words, to keep the vocabulary small
  for (const w of words.slice(0, BARE_WORD_COUNT)) addWithPrefixes(w);

  // Generated extra pieces: lowercase strings in length order, bare then ▁-prefixed.
  if (extra > 0) {
    const alphabet = 'etaoinshrdlcumwfgypbvkjxqz';
    let added = 0;
    let frontier: string[] = [...alphabet];
    while (added < extra) {
      const next: string[] = [];
      for (const stem of frontier) {
        for (const ch of alphabet) next.push(stem + ch);
      }
      for (const s of next) {
        for (const piece of [s, SPM_SPACE + s]) {
          if (added >= extra) break;
          if (seen.has(piece)) continue;
          addPiece(piece);
          added++;
        }
        if (added >= extra) break;
      }
      frontier = next;
    }
  }

  // Longer pieces score higher so SPM merges prefer them; ties broken by list order.
  normal.forEach((piece, i) => {
    tokens.push(piece);
    types.push(TokenType.NORMAL);
    scores.push(codepointLength(piece) - 100 - i * 1e-4);
  });
  return { tokens, scores, types };
}

// ---------------------------------------------------------------------------
// Llama model generator
// ---------------------------------------------------------------------------

export type WeightType = 'f32' | 'f16' | 'q8_0';
export const WEIGHT_TYPES: readonly WeightType[] = ['f32', 'f16', 'q8_0'];

const WEIGHT_GGML_TYPE: Record<WeightType, GGMLType> = {
  f32: GGMLType.F32,
  f16: GGMLType.F16,
  q8_0: GGMLType.Q8_0,
};

export interface LlamaModelOptions {
  /** number of transformer blocks */
  layers: number;
  /** embedding (hidden) size */
  embd: number;
  /** attention (query) heads */
  heads: number;
  /** key/value heads (GQA); must divide heads */
  kvHeads: number;
  /** per-head dimension (key_length = value_length = rope dims); may differ from embd / heads */
  headDim: number;
  /** feed-forward hidden size */
  ffn: number;
  /** training context length written to llama.context_length */
  ctx: number;
  /** storage type of the weight matrices (norm weights are always F32) */
  type: WeightType;
  /** PRNG seed; same options + seed produce byte-identical files */
  seed: number;
  /** number of generated extra vocabulary pieces */
  vocabExtra: number;
  /** general.name */
  name: string;
  /** tokenizer.chat_template: ChatML by default; null writes none (a base model: plain framing). */
  chatTemplate: string | null;
}

/** Options accepted by writeLlamaModel: any subset; missing or undefined fields take the defaults. */
export type LlamaModelInput = { [K in keyof LlamaModelOptions]?: LlamaModelOptions[K] | undefined };

export const DEFAULT_LLAMA_MODEL_OPTIONS: Readonly<LlamaModelOptions> = Object.freeze({
  layers: 2,
  embd: 64,
  heads: 4,
  kvHeads: 2,
  headDim: 16,
  ffn: 128,
  ctx: 4096,
  type: 'f32',
  seed: 42,
  vocabExtra: 0,
  name: 'finite-memory-llm tiny random llama',
  chatTemplate: CHATML_TEMPLATE,
});

export interface TensorSummary {
  name: string;
  dims: number[];
  type: GGMLType;
  nbytes: number;
  /** offset of the tensor's data relative to the start of the data section */
  offset: number;
}

export interface WriteLlamaModelResult {
  path: string;
  /** total file size in bytes */
  fileSize: number;
  options: LlamaModelOptions;
  nVocab: number;
  nParams: number;
  tensors: TensorSummary[];
  specialTokens: typeof SPECIAL_TOKEN_IDS;
}

/** Weight scales: chosen so the residual stream mixes context and logits are peaked but not one-hot. */
const EMBED_STD = 1.0;
const LAYER_GAIN = 1.5; // std = LAYER_GAIN / sqrt(fan_in) for attention / FFN matrices
const LOGIT_STD = 4.0; // output.weight std = LOGIT_STD / sqrt(embd) -> logits of std ~LOGIT_STD
const BYTE_LOGIT_SCALE = 0.5; // output rows of the 256 byte tokens are scaled down by this
const NORM_NOISE = 0.05; // norm weights ~ 1 + NORM_NOISE * N(0, 1)

function checkPositiveInt(name: string, v: number): void {
  if (!Number.isInteger(v) || v <= 0) throw new Error(`${name} must be a positive integer, got ${v}`);
}

export function resolveLlamaModelOptions(options: LlamaModelInput = {}): LlamaModelOptions {
  const o: LlamaModelOptions = { ...DEFAULT_LLAMA_MODEL_OPTIONS };
  for (const [k, v] of Object.entries(options)) {
    if (v !== undefined) (o as unknown as Record<string, unknown>)[k] = v;
  }
  for (const key of ['layers', 'embd', 'heads', 'kvHeads', 'headDim', 'ffn', 'ctx'] as const) {
    checkPositiveInt(key, o[key]);
  }
  if (!Number.isInteger(o.vocabExtra) || o.vocabExtra < 0) {
    throw new Error(`vocabExtra must be a non-negative integer, got ${o.vocabExtra}`);
  }
  if (!Number.isInteger(o.seed)) throw new Error(`seed must be an integer, got ${o.seed}`);
  if (!WEIGHT_TYPES.includes(o.type)) {
    throw new Error(`type must be one of ${WEIGHT_TYPES.join(', ')}, got ${String(o.type)}`);
  }
  if (o.heads % o.kvHeads !== 0) {
    throw new Error(`heads (${o.heads}) must be a multiple of kvHeads (${o.kvHeads})`);
  }
  if (o.headDim % 2 !== 0) throw new Error(`headDim must be even for RoPE, got ${o.headDim}`);
  if (o.type === 'q8_0') {
    const rows: [string, number][] = [
      ['embd', o.embd],
      ['heads*headDim', o.heads * o.headDim],
      ['ffn', o.ffn],
    ];
    for (const [what, n] of rows) {
      if (n % QK8_0 !== 0) {
        throw new Error(
          `q8_0 requires every matrix row length to be a multiple of ${QK8_0}: ${what} = ${n} is not ` +
            `(use --type f32 or f16, or change the shape)`,
        );
      }
    }
  }
  return o;
}

/** Producer for a matrix of random normals (std) stored as `type`, generated row-chunk by row-chunk. */
function randomMatrix(
  dims: readonly number[],
  type: GGMLType,
  rng: SeededRandom,
  std: number,
  mean = 0,
  rowScale?: (row: number) => number,
): TensorProducer {
  const ne0 = dims[0]!;
  const nrows = dims.slice(1).reduce((a, b) => a * b, 1);
  return (emit) => {
    const rowsPerChunk = Math.max(1, Math.floor((1 << 16) / ne0));
    const vals = new Float32Array(rowsPerChunk * ne0);
    const out = Buffer.alloc(ggmlTypeSize(type, ne0) * rowsPerChunk);
    for (let r = 0; r < nrows; r += rowsPerChunk) {
      const n = Math.min(rowsPerChunk, nrows - r);
      const v = n === rowsPerChunk ? vals : vals.subarray(0, n * ne0);
      if (rowScale) {
        for (let j = 0; j < n; j++) {
          const s = std * rowScale(r + j);
          for (let i = j * ne0; i < (j + 1) * ne0; i++) v[i] = mean + s * rng.normal();
        }
      } else {
        for (let i = 0; i < v.length; i++) v[i] = mean + std * rng.normal();
      }
      const len = encodeValues(v, type, out, 0);
      emit(out.subarray(0, len));
    }
  };
}

/**
 * Writes a llama-architecture GGUF with seeded random weights to `path`.
 * Synchronous; memory use is bounded by the vocabulary metadata plus ~1 MiB of buffers.
 */
export function writeLlamaModel(path: string, options: LlamaModelInput = {}): WriteLlamaModelResult {
  const o = resolveLlamaModelOptions(options);
  const vocab = buildVocab(o.vocabExtra);
  const nVocab = vocab.tokens.length;
  const wtype = WEIGHT_GGML_TYPE[o.type];
  const qDim = o.heads * o.headDim;
  const kvDim = o.kvHeads * o.headDim;

  const w = new GGUFWriter(GGUF_DEFAULT_ALIGNMENT);
  w.addString('general.architecture', 'llama');
  w.addString('general.name', o.name);
  w.addUint32('general.file_type', LLAMA_FTYPE[o.type]);
  w.addUint32('llama.vocab_size', nVocab);
  w.addUint32('llama.context_length', o.ctx);
  w.addUint32('llama.embedding_length', o.embd);
  w.addUint32('llama.block_count', o.layers);
  w.addUint32('llama.feed_forward_length', o.ffn);
  w.addUint32('llama.attention.head_count', o.heads);
  w.addUint32('llama.attention.head_count_kv', o.kvHeads);
  w.addUint32('llama.attention.key_length', o.headDim);
  w.addUint32('llama.attention.value_length', o.headDim);
  w.addUint32('llama.rope.dimension_count', o.headDim);
  w.addFloat32('llama.rope.freq_base', 10000);
  w.addFloat32('llama.attention.layer_norm_rms_epsilon', 1e-5);

  w.addString('tokenizer.ggml.model', 'llama');
  w.addStringArray('tokenizer.ggml.tokens', vocab.tokens);
  w.addFloat32Array('tokenizer.ggml.scores', vocab.scores);
  w.addInt32Array('tokenizer.ggml.token_type', vocab.types);
  w.addUint32('tokenizer.ggml.bos_token_id', SPECIAL_TOKEN_IDS.bos);
  w.addUint32('tokenizer.ggml.eos_token_id', SPECIAL_TOKEN_IDS.eos);
  w.addUint32('tokenizer.ggml.unknown_token_id', SPECIAL_TOKEN_IDS.unk);
  w.addUint32('tokenizer.ggml.eot_token_id', SPECIAL_TOKEN_IDS.imEnd);
  w.addBool('tokenizer.ggml.add_bos_token', true);
  w.addBool('tokenizer.ggml.add_eos_token', false);
  if (o.chatTemplate !== null) w.addString('tokenizer.chat_template', o.chatTemplate);

  const matrix = (name: string, dims: number[], std: number, rowScale?: (row: number) => number): void => {
    const rng = new SeededRandom(hashSeed(o.seed, name));
    w.addTensor({ name, dims, type: wtype, produce: randomMatrix(dims, wtype, rng, std, 0, rowScale) });
  };
  const norm = (name: string): void => {
    const rng = new SeededRandom(hashSeed(o.seed, name));
    w.addTensor({ name, dims: [o.embd], type: GGMLType.F32, produce: randomMatrix([o.embd], GGMLType.F32, rng, NORM_NOISE, 1) });
  };

  matrix('token_embd.weight', [o.embd, nVocab], EMBED_STD);
  norm('output_norm.weight');
  // Byte-fallback tokens get smaller output rows so greedy text is mostly whole pieces (bytes still occur).
  const firstByte = SPECIAL_TOKEN_IDS.firstByte;
  const outputRowScale = (tok: number): number => (tok >= firstByte && tok < firstByte + 256 ? BYTE_LOGIT_SCALE : 1);
  matrix('output.weight', [o.embd, nVocab], LOGIT_STD / Math.sqrt(o.embd), outputRowScale);
  for (let i = 0; i < o.layers; i++) {
    const p = `blk.${i}.`;
    norm(`${p}attn_norm.weight`);
    matrix(`${p}attn_q.weight`, [o.embd, qDim], LAYER_GAIN / Math.sqrt(o.embd));
    matrix(`${p}attn_k.weight`, [o.embd, kvDim], LAYER_GAIN / Math.sqrt(o.embd));
    matrix(`${p}attn_v.weight`, [o.embd, kvDim], LAYER_GAIN / Math.sqrt(o.embd));
    matrix(`${p}attn_output.weight`, [qDim, o.embd], LAYER_GAIN / Math.sqrt(qDim));
    norm(`${p}ffn_norm.weight`);
    matrix(`${p}ffn_gate.weight`, [o.embd, o.ffn], LAYER_GAIN / Math.sqrt(o.embd));
    matrix(`${p}ffn_up.weight`, [o.embd, o.ffn], LAYER_GAIN / Math.sqrt(o.embd));
    matrix(`${p}ffn_down.weight`, [o.ffn, o.embd], LAYER_GAIN / Math.sqrt(o.ffn));
  }

  const fileSize = w.write(path);
  const tensors = w.tensorInfos();
  const nParams = tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1), 0);
  return { path, fileSize, options: o, nVocab, nParams, tensors, specialTokens: SPECIAL_TOKEN_IDS };
}
