import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CHATML_TEMPLATE,
  DEFAULT_LLAMA_MODEL_OPTIONS,
  GGMLType,
  GGUFWriter,
  SPECIAL_TOKEN_IDS,
  SPM_SPACE,
  TokenType,
  buildVocab,
  f16BitsToF32,
  f32ToF16Bits,
  writeLlamaModel,
  writeModel,
  type LlamaModelInput,
} from '../../src/gguf/index.ts';
import { parseGGUF, type ParsedGGUF, type TensorInfo, type Value } from '../gguf-file.ts';

function tensorBytes(t: TensorInfo): number {
  const n = t.dims.reduce((a, b) => a * b, 1);
  switch (t.type) {
    case 0: return 4 * n;
    case 1: return 2 * n;
    case 8: return (n / 32) * 34;
    default: throw new Error(`unexpected tensor type ${t.type}`);
  }
}

function get(g: ParsedGGUF, key: string): Value {
  const e = g.kv.get(key);
  if (!e) throw new Error(`missing key ${key}`);
  return e.value;
}

// ---------------------------------------------------------------------------

let dir = '';
const model = (name: string, opts: LlamaModelInput = {}): { file: string; g: ParsedGGUF } => {
  const file = path.join(dir, name);
  const r = writeLlamaModel(file, opts);
  const g = parseGGUF(file);
  expect(r.fileSize).toBe(g.fileSize);
  return { file, g };
};

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gguf-writer-test-'));
});
afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('writeLlamaModel', () => {
  it('writes a valid GGUF v3 llama header with default options', () => {
    const { g } = model('default.gguf');
    const o = DEFAULT_LLAMA_MODEL_OPTIONS;
    expect(g.version).toBe(3);
    expect(g.tensorCount).toBe(3 + 9 * o.layers);
    expect(g.alignment).toBe(32);
    expect(g.kv.get('general.alignment')?.type).toBe(4); // u32

    expect(get(g, 'general.architecture')).toBe('llama');
    expect(typeof get(g, 'general.name')).toBe('string');
    expect(get(g, 'llama.context_length')).toBe(o.ctx);
    expect(get(g, 'llama.embedding_length')).toBe(o.embd);
    expect(get(g, 'llama.block_count')).toBe(o.layers);
    expect(get(g, 'llama.feed_forward_length')).toBe(o.ffn);
    expect(get(g, 'llama.attention.head_count')).toBe(o.heads);
    expect(get(g, 'llama.attention.head_count_kv')).toBe(o.kvHeads);
    expect(get(g, 'llama.rope.dimension_count')).toBe(o.headDim);
    expect(get(g, 'llama.attention.key_length')).toBe(o.headDim);
    expect(get(g, 'llama.attention.value_length')).toBe(o.headDim);
    expect(get(g, 'llama.attention.layer_norm_rms_epsilon')).toBeCloseTo(1e-5, 9);
    expect(get(g, 'llama.rope.freq_base')).toBe(10000);

    const tokens = get(g, 'tokenizer.ggml.tokens') as string[];
    const scores = get(g, 'tokenizer.ggml.scores') as number[];
    const types = get(g, 'tokenizer.ggml.token_type') as number[];
    expect(g.kv.get('tokenizer.ggml.tokens')?.type).toBe(8);
    expect(g.kv.get('tokenizer.ggml.scores')?.type).toBe(6);
    expect(g.kv.get('tokenizer.ggml.token_type')?.type).toBe(5);
    const nVocab = tokens.length;
    expect(get(g, 'llama.vocab_size')).toBe(nVocab);
    expect(scores).toHaveLength(nVocab);
    expect(types).toHaveLength(nVocab);
    expect(get(g, 'tokenizer.ggml.model')).toBe('llama');
    expect(get(g, 'tokenizer.ggml.bos_token_id')).toBe(1);
    expect(get(g, 'tokenizer.ggml.eos_token_id')).toBe(2);
    expect(get(g, 'tokenizer.ggml.unknown_token_id')).toBe(0);
    expect(get(g, 'tokenizer.ggml.eot_token_id')).toBe(tokens.indexOf('<|im_end|>'));
    expect(get(g, 'tokenizer.ggml.add_bos_token')).toBe(true);
    expect(get(g, 'tokenizer.ggml.add_eos_token')).toBe(false);
    const tmpl = get(g, 'tokenizer.chat_template') as string;
    expect(tmpl).toBe(CHATML_TEMPLATE);
    expect(tmpl).toContain('<|im_start|>');
    expect(tmpl).toContain('add_generation_prompt');

    const byName = new Map(g.tensors.map((t) => [t.name, t]));
    const qDim = o.heads * o.headDim;
    const kvDim = o.kvHeads * o.headDim;
    const expectTensor = (name: string, dims: number[], type: number): void => {
      const t = byName.get(name);
      expect(t, name).toBeDefined();
      expect(t?.dims, name).toEqual(dims);
      expect(t?.type, name).toBe(type);
    };
    expectTensor('token_embd.weight', [o.embd, nVocab], GGMLType.F32);
    expectTensor('output_norm.weight', [o.embd], GGMLType.F32);
    expectTensor('output.weight', [o.embd, nVocab], GGMLType.F32);
    for (let i = 0; i < o.layers; i++) {
      expectTensor(`blk.${i}.attn_norm.weight`, [o.embd], GGMLType.F32);
      expectTensor(`blk.${i}.attn_q.weight`, [o.embd, qDim], GGMLType.F32);
      expectTensor(`blk.${i}.attn_k.weight`, [o.embd, kvDim], GGMLType.F32);
      expectTensor(`blk.${i}.attn_v.weight`, [o.embd, kvDim], GGMLType.F32);
      expectTensor(`blk.${i}.attn_output.weight`, [qDim, o.embd], GGMLType.F32);
      expectTensor(`blk.${i}.ffn_norm.weight`, [o.embd], GGMLType.F32);
      expectTensor(`blk.${i}.ffn_gate.weight`, [o.embd, o.ffn], GGMLType.F32);
      expectTensor(`blk.${i}.ffn_up.weight`, [o.embd, o.ffn], GGMLType.F32);
      expectTensor(`blk.${i}.ffn_down.weight`, [o.ffn, o.embd], GGMLType.F32);
    }

    // data layout: aligned, ordered, non-overlapping, file size consistent
    expect(g.dataStart % 32).toBe(0);
    let end = 0;
    for (const t of g.tensors) {
      expect(t.offset % 32, t.name).toBe(0);
      expect(t.offset, t.name).toBeGreaterThanOrEqual(end);
      end = t.offset + tensorBytes(t);
    }
    expect(g.fileSize).toBe(g.dataStart + Math.ceil(end / 32) * 32);
    expect(g.fileSize).toBeLessThan(1024 * 1024);

    // norm weights are ~1, matrices are not all zero
    const norm = byName.get('output_norm.weight')!;
    for (let i = 0; i < o.embd; i++) {
      const v = g.buf.readFloatLE(g.dataStart + norm.offset + 4 * i);
      expect(Math.abs(v - 1)).toBeLessThan(0.5);
    }
    const emb = byName.get('token_embd.weight')!;
    let sumSq = 0;
    for (let i = 0; i < o.embd; i++) sumSq += g.buf.readFloatLE(g.dataStart + emb.offset + 4 * i) ** 2;
    expect(sumSq).toBeGreaterThan(0);
  });

  it('is deterministic per seed', () => {
    const a = fs.readFileSync(model('seed-a.gguf', { seed: 7 }).file);
    const b = fs.readFileSync(model('seed-b.gguf', { seed: 7 }).file);
    const c = fs.readFileSync(model('seed-c.gguf', { seed: 8 }).file);
    expect(a.equals(b)).toBe(true);
    expect(a.length).toBe(c.length);
    expect(a.equals(c)).toBe(false);
  });

  it('writes f16 and q8_0 matrices with f32 norms', () => {
    const o = DEFAULT_LLAMA_MODEL_OPTIONS;
    const f16 = model('f16.gguf', { type: 'f16' }).g;
    const q8 = model('q8_0.gguf', { type: 'q8_0' }).g;
    for (const [g, type] of [
      [f16, GGMLType.F16],
      [q8, GGMLType.Q8_0],
    ] as const) {
      let end = 0;
      for (const t of g.tensors) {
        expect(t.type, t.name).toBe(t.name.includes('norm') ? GGMLType.F32 : type);
        expect(t.offset % 32).toBe(0);
        expect(t.offset).toBeGreaterThanOrEqual(end);
        end = t.offset + tensorBytes(t);
      }
      expect(g.fileSize).toBe(g.dataStart + Math.ceil(end / 32) * 32);
    }
    // Q8_0 blocks: scale d = max|x| / 127, so every block has a quant of magnitude 127
    const t = q8.tensors.find((x) => x.name === 'blk.0.attn_q.weight')!;
    const base = q8.dataStart + t.offset;
    const nBlocks = (o.embd * o.heads * o.headDim) / 32;
    for (let b = 0; b < nBlocks; b++) {
      const d = f16BitsToF32(q8.buf.readUInt16LE(base + 34 * b));
      expect(d).toBeGreaterThan(0);
      let amax = 0;
      for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(q8.buf.readInt8(base + 34 * b + 2 + j)));
      expect(amax).toBe(127);
    }
  });

  it('supports head_dim != embd / heads and extra vocabulary', () => {
    const { g } = model('geom.gguf', { embd: 32, heads: 4, kvHeads: 1, headDim: 32, ffn: 64, layers: 1, vocabExtra: 50 });
    const tokens = get(g, 'tokenizer.ggml.tokens') as string[];
    expect(tokens.length).toBe(buildVocab(0).tokens.length + 50);
    expect(g.tensors.find((t) => t.name === 'blk.0.attn_q.weight')?.dims).toEqual([32, 128]);
    expect(g.tensors.find((t) => t.name === 'blk.0.attn_k.weight')?.dims).toEqual([32, 32]);
    expect(g.tensors.find((t) => t.name === 'blk.0.attn_output.weight')?.dims).toEqual([128, 32]);
    expect(get(g, 'llama.attention.key_length')).toBe(32);
  });

  it('rejects invalid shapes with clear errors', () => {
    const f = path.join(dir, 'bad.gguf');
    expect(() => writeLlamaModel(f, { type: 'q8_0', embd: 48, heads: 3, headDim: 16, kvHeads: 1 })).toThrow(
      /multiple of 32/,
    );
    expect(() => writeLlamaModel(f, { heads: 4, kvHeads: 3 })).toThrow(/kvHeads/);
    expect(() => writeLlamaModel(f, { layers: 0 })).toThrow(/layers/);
    expect(() => writeLlamaModel(f, { layers: 513 })).toThrow(/at most 512/);
    // A declared multi-token-prediction block counts toward llama.cpp's limit; a 27-layer deepseek3 would load as V2-Lite.
    expect(() => writeModel(f, { family: 'glm4moe', layers: 512 })).toThrow(/plus nextnLayers/);
    expect(() => writeModel(f, { family: 'deepseek3', layers: 27 })).toThrow(/V2-Lite/);
    expect(() => writeModel(f, { family: 'qwen3', nextnLayers: 1 })).toThrow(/nextnLayers/);
    expect(() => new GGUFWriter(24)).toThrow(/power of two/);
    expect(() => new GGUFWriter().addUint32('x', 2 ** 32 + 5).write(f)).toThrow(/0\.\.4294967295/);
    expect(() => new GGUFWriter().addInt32('x', 1.5).write(f)).toThrow(/integer/);
  });

  it('replaces a file by renaming (a process that maps the old one keeps it); a failed write keeps the old file', () => {
    const f = path.join(dir, 'replace.gguf');
    writeLlamaModel(f, { seed: 1 });
    const before = fs.statSync(f);
    writeLlamaModel(f, { seed: 2 });
    expect(fs.statSync(f).ino).not.toBe(before.ino);
    const bytes = fs.readFileSync(f);
    const w = new GGUFWriter().addTensor({ name: 't', dims: [4], type: GGMLType.F32, produce: (emit) => emit(new Uint8Array(3)) });
    expect(() => w.write(f)).toThrow(/emitted 3 bytes/);
    expect(fs.readFileSync(f).equals(bytes)).toBe(true);
    expect(fs.readdirSync(dir).filter((n) => n.includes('.tmp-'))).toEqual([]);
  });
});

describe('vocabulary', () => {
  it('has special, byte and merge-reachable normal tokens', () => {
    const v = buildVocab();
    expect(v.tokens.slice(0, 5)).toEqual(['<unk>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']);
    expect(v.tokens[SPECIAL_TOKEN_IDS.imEnd]).toBe('<|im_end|>');
    expect(v.types.slice(0, 5)).toEqual([TokenType.UNKNOWN, 3, 3, 3, 3]);
    for (let b = 0; b < 256; b++) {
      const id = SPECIAL_TOKEN_IDS.firstByte + b;
      expect(v.tokens[id]).toBe(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
      expect(v.types[id]).toBe(TokenType.BYTE);
    }
    expect(new Set(v.tokens).size).toBe(v.tokens.length);
    const set = new Set(v.tokens);
    expect(set.has(SPM_SPACE)).toBe(true);
    expect(set.has(`${SPM_SPACE}the`)).toBe(true);
    expect(set.has('the')).toBe(true);
    for (let c = 0x21; c <= 0x7e; c++) expect(set.has(String.fromCharCode(c))).toBe(true);
    v.tokens.forEach((tok, i) => {
      if (v.types[i] !== TokenType.NORMAL) return;
      const chars = [...tok];
      if (chars.length > 1) {
        expect(set.has(chars.slice(0, -1).join('')), tok).toBe(true);
        expect(v.scores[i]).toBeGreaterThan(v.scores[v.tokens.indexOf(chars.slice(0, -1).join(''))]!);
      }
    });
  });
});

describe('f16 conversion', () => {
  it('matches IEEE half precision', () => {
    expect(f32ToF16Bits(0)).toBe(0);
    expect(f32ToF16Bits(-0)).toBe(0x8000);
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(-2)).toBe(0xc000);
    expect(f32ToF16Bits(0.5)).toBe(0x3800);
    expect(f32ToF16Bits(65504)).toBe(0x7bff);
    expect(f32ToF16Bits(1e6)).toBe(0x7c00);
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001);
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie -> even
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie -> even (up)
    for (const x of [0.1, -0.3333, 3.14159, 1e-5, 123.456]) {
      expect(Math.abs(f16BitsToF32(f32ToF16Bits(x)) - x)).toBeLessThanOrEqual(Math.abs(x) * 2 ** -11 + 2 ** -25);
    }
  });
});
