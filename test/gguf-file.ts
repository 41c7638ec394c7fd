// A minimal GGUF reader, independent of the writer in src/gguf (the writer's tests check its output
// with it), and an editor of a file's metadata for tests of hostile files.
import * as fs from 'node:fs';

export type Value = number | bigint | boolean | string | Value[];

export interface TensorInfo {
  name: string;
  dims: number[];
  type: number;
  offset: number;
}

export interface ParsedGGUF {
  version: number;
  tensorCount: number;
  /** Arrays: `type` is the items' type and `value` the items. */
  kv: Map<string, { type: number; value: Value }>;
  tensors: TensorInfo[];
  alignment: number;
  dataStart: number;
  fileSize: number;
  buf: Buffer;
}

export function parseGGUF(file: string): ParsedGGUF {
  const buf = fs.readFileSync(file);
  let p = 0;
  const u32 = (): number => {
    const v = buf.readUInt32LE(p);
    p += 4;
    return v;
  };
  const u64 = (): number => {
    const v = buf.readBigUInt64LE(p);
    p += 8;
    return Number(v);
  };
  const str = (): string => {
    const n = u64();
    const s = buf.toString('utf8', p, p + n);
    p += n;
    return s;
  };
  const scalar = (type: number): Value => {
    switch (type) {
      case 0: return buf.readUInt8(p++);
      case 1: return buf.readInt8(p++);
      case 2: { const v = buf.readUInt16LE(p); p += 2; return v; }
      case 3: { const v = buf.readInt16LE(p); p += 2; return v; }
      case 4: return u32();
      case 5: { const v = buf.readInt32LE(p); p += 4; return v; }
      case 6: { const v = buf.readFloatLE(p); p += 4; return v; }
      case 7: return buf.readUInt8(p++) !== 0;
      case 8: return str();
      case 10: { const v = buf.readBigUInt64LE(p); p += 8; return v; }
      case 11: { const v = buf.readBigInt64LE(p); p += 8; return v; }
      case 12: { const v = buf.readDoubleLE(p); p += 8; return v; }
      default: throw new Error(`bad gguf type ${type}`);
    }
  };

  const magic = buf.toString('latin1', 0, 4);
  if (magic !== 'GGUF') throw new Error(`bad magic ${magic}`);
  p = 4;
  const version = u32();
  const tensorCount = u64();
  const kvCount = u64();
  const kv = new Map<string, { type: number; value: Value }>();
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    const type = u32();
    if (type === 9) {
      const itemType = u32();
      const n = u64();
      const items: Value[] = [];
      for (let j = 0; j < n; j++) items.push(scalar(itemType));
      kv.set(key, { type: itemType, value: items });
    } else {
      kv.set(key, { type, value: scalar(type) });
    }
  }
  const tensors: TensorInfo[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = str();
    const nd = u32();
    const dims: number[] = [];
    for (let j = 0; j < nd; j++) dims.push(u64());
    const type = u32();
    const offset = u64();
    tensors.push({ name, dims, type, offset });
  }
  const alignment = Number(kv.get('general.alignment')?.value ?? 32);
  const dataStart = Math.ceil(p / alignment) * alignment;
  return { version, tensorCount, kv, tensors, alignment, dataStart, fileSize: buf.length, buf };
}

const SCALAR_BYTES: Partial<Record<number, number>> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };

/**
 * Writes `src` to `dst` with its metadata changed by `edit` (same representation as parseGGUF's:
 * an array is `{ type: itemType, value: items }`). The tensor infos and data are copied as they are:
 * their offsets are relative to the data section, so only its padding moves.
 */
export function editGGUF(src: string, dst: string, edit: (kv: ParsedGGUF['kv']) => void): void {
  const g = parseGGUF(src);
  edit(g.kv);
  const parts: Buffer[] = [];
  const put = (n: number, write: (x: Buffer) => void) => { const x = Buffer.alloc(n); write(x); parts.push(x); };
  const u32 = (v: number) => put(4, (x) => x.writeUInt32LE(v));
  const u64 = (v: number) => put(8, (x) => x.writeBigUInt64LE(BigInt(v)));
  const str = (s: string) => { const x = Buffer.from(s, 'utf8'); u64(x.length); parts.push(x); };
  const scalar = (t: number, v: Value) => {
    if (t === 8) return str(String(v));
    put(SCALAR_BYTES[t]!, (x) => {
      switch (t) {
        case 0: x.writeUInt8(Number(v)); break; case 1: x.writeInt8(Number(v)); break;
        case 2: x.writeUInt16LE(Number(v)); break; case 3: x.writeInt16LE(Number(v)); break;
        case 4: x.writeUInt32LE(Number(v)); break; case 5: x.writeInt32LE(Number(v)); break;
        case 6: x.writeFloatLE(Number(v)); break; case 7: x.writeUInt8(v ? 1 : 0); break;
        case 10: x.writeBigUInt64LE(BigInt(v as number)); break; case 11: x.writeBigInt64LE(BigInt(v as number)); break;
        case 12: x.writeDoubleLE(Number(v)); break;
        default: throw new Error(`bad gguf type ${t}`);
      }
    });
  };
  u32(0x46554747);
  u32(g.version);
  u64(g.tensors.length);
  u64(g.kv.size);
  for (const [key, { type, value }] of g.kv) {
    str(key);
    if (Array.isArray(value)) {
      u32(9);
      u32(type);
      u64(value.length);
      for (const item of value) scalar(type, item);
    } else {
      u32(type);
      scalar(type, value);
    }
  }
  for (const t of g.tensors) {
    str(t.name);
    u32(t.dims.length);
    for (const d of t.dims) u64(d);
    u32(t.type);
    u64(t.offset);
  }
  const headerBytes = parts.reduce((n, p) => n + p.length, 0);
  parts.push(Buffer.alloc(Math.ceil(headerBytes / g.alignment) * g.alignment - headerBytes), g.buf.subarray(g.dataStart));
  fs.writeFileSync(dst, Buffer.concat(parts));
}
