/** Number encodings of tensor data: f32 -> f16 bits and back, and f32 / f16 / Q8_0 rows. */
import * as os from 'node:os';
import { GGMLType, QK8_0 } from './format.js';

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

