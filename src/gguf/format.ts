/**
 * GGUF v3 format: value and tensor types, and a streaming writer.
 *
 * GGUF layout (all little-endian):
 *   magic "GGUF" | u32 version (3) | u64 tensor_count | u64 kv_count
 *   kv_count x (string key, u32 value type, value)
 *   tensor_count x (string name, u32 n_dims, u64 ne[n_dims] (fastest first),
 *                   u32 ggml type, u64 offset relative to the data section)
 *   padding to general.alignment | tensor data (each tensor padded to alignment)
 *
 * Tensor data is produced and written in chunks, so large-but-shallow models can be generated
 * without holding the weights in memory.
 */
import * as fs from 'node:fs';

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
    this.buf.writeUInt32LE(v, this.length);
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

/** An integer in [min, max]: Buffer's writers truncate fractions, and a u32 used to wrap (2**32 + 5 became 5). */
function expectInteger(v: ScalarValue, key: string, min: number, max: number): number {
  const n = expectNumber(v, key);
  if (!Number.isInteger(n) || n < min || n > max) throw new RangeError(`GGUF key ${key}: expected an integer in ${min}..${max}, got ${n}`);
  return n;
}

function writeScalar(b: ByteBuilder, type: GGUFScalarType, v: ScalarValue, key: string): void {
  switch (type) {
    case GGUFValueType.UINT8:
      b.u8(expectInteger(v, key, 0, 0xff));
      break;
    case GGUFValueType.INT8:
      b.i8(expectInteger(v, key, -0x80, 0x7f));
      break;
    case GGUFValueType.UINT16:
      b.u16(expectInteger(v, key, 0, 0xffff));
      break;
    case GGUFValueType.INT16:
      b.i16(expectInteger(v, key, -0x8000, 0x7fff));
      break;
    case GGUFValueType.UINT32:
      b.u32(expectInteger(v, key, 0, 0xffffffff));
      break;
    case GGUFValueType.INT32:
      b.i32(expectInteger(v, key, -0x80000000, 0x7fffffff));
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
export interface TensorSummary {
  name: string;
  dims: number[];
  type: GGMLType;
  nbytes: number;
  /** offset of the tensor's data relative to the start of the data section */
  offset: number;
}

export class GGUFWriter {
  readonly alignment: number;
  private readonly kvs: KVEntry[] = [];
  private readonly tensors: TensorEntry[] = [];
  private dataSize = 0;

  constructor(alignment: number = GGUF_DEFAULT_ALIGNMENT) {
    // llama.cpp's reader asks for a power of two (a multiple of 8 such as 24 wrote a file it refuses).
    if (!Number.isInteger(alignment) || alignment < 8 || alignment > 2 ** 30 || (alignment & (alignment - 1)) !== 0) {
      throw new Error(`alignment must be a power of two of at least 8, got ${alignment}`);
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

  /**
   * Writes the file; returns its total size in bytes. Written beside `path` and renamed over it:
   * truncating a file in place killed (SIGBUS) a process that had it memory-mapped as a loaded
   * model, and a failed write deleted the file that was there.
   */
  write(path: string, chunkBytes = 1 << 20): number {
    const header = this.buildHeader();
    const temp = `${path}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    const fd = fs.openSync(temp, 'wx');
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
      fs.renameSync(temp, path);
      return filePos;
    } catch (err) {
      try { fs.closeSync(fd); } catch { /* closed before the rename */ }
      fs.rmSync(temp, { force: true }); // no truncated model left behind, the previous file kept
      throw err;
    }
  }
}

