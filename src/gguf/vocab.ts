/** A small SentencePiece-style ("llama") vocabulary with byte fallback, and the special tokens of each chat template family. */

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
 * `extra` appends that many generated lowercase pieces; `pieces` adds pieces as given (write
 * `▁word` for the word after a space, `word` for it at the start of a message); `control`
 * appends a chat template's control tokens last (so the fixed ids above stay the same for every family), then its `userDefined` ones (tokens rendered as text: Qwen3's `<think>`); `common: false` leaves out the common English words.
 */
export function buildVocab(extra = 0, control: readonly string[] = [], pieces: readonly string[] = [], common = true, userDefined: readonly string[] = []): Vocab {
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

  // Without `common`, only the characters, the byte tokens and `pieces` (a vocabulary for one format).
  const words = common ? COMMON_WORDS.split(/\s+/).filter(Boolean) : [];
  const subwords = common ? SUBWORDS.split(/\s+/).filter(Boolean) : [];
  const caps = common ? CAPITALISED_WORDS.split(/\s+/).filter(Boolean) : [];
  for (const w of words) addWithPrefixes(SPM_SPACE + w);
  for (const w of caps) addWithPrefixes(SPM_SPACE + w);
  for (const w of subwords) {
    addWithPrefixes(w);
    addWithPrefixes(SPM_SPACE + w);
  }
  // bare (no ▁) variants only for the most common words, to keep the vocabulary small
  for (const w of words.slice(0, BARE_WORD_COUNT)) addWithPrefixes(w);
  for (const p of pieces) addWithPrefixes(p);

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
  for (const [pieces, type] of [[control, TokenType.CONTROL], [userDefined, TokenType.USER_DEFINED]] as const) {
    for (const piece of pieces) {
      if (seen.has(piece)) continue;
      seen.add(piece);
      tokens.push(piece);
      types.push(type);
      scores.push(0);
    }
  }
  return { tokens, scores, types };
}

