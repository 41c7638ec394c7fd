/**
 * The recall dialogue format: the one source of the text the recall model is trained on
 * (scripts/make-recall-model.ts) and evaluated with (its check, bench/recall.ts, tests).
 *
 *   fact      user "Mila 4817."                   assistant "OK."
 *   filler    user "The river is cold today."     assistant "OK."
 *   question  user "Code of Mila?"                assistant "Mila 4817."
 *   summary   user SUMMARY_INSTRUCTION            assistant "Mila 4817.\nOmar 1234."
 *
 * Associative recall over a conversation, as in Zoology's MQAR and SCBench's Retr.KV: names come from
 * a pool, codes are four random digits, a question asks about a fact stated earlier (possibly again).
 * Fillers use the same words but no names.
 * A fact is a key-value pair with the key right before its value (as Retr.KV's pairs), and a reply
 * names the key before the value, so one induction step finds the value: a name opens its fact and
 * its reply, so the key is the same (bare) token in both. A question names it after a space
 * (" Mila", another token), so no earlier bare name is followed by anything but its code: with
 * "Mila's code?", the question's own "Mila" (followed by "'s") was the nearest match, and models
 * trained here learned to copy a code's second chunk (0.6-0.67 of code tokens teacher-forced) but
 * answered 4-7% of questions, with some other fact's digits. The sentence form "Note: Mila's code is
 * 4817." puts three tokens between key and value, one more step again. The vocabulary has two-digit
 * pieces (also with a leading space), so a code is two tokens, as BPE vocabularies split numbers into
 * chunks. Summaries are what rolling_summary asks for: the notes so far, oldest first, one a line, so
 * each name is the bare token it is in its fact (joined by spaces, every name but the first was the
 * question's " Omar", the distractor above, in every summary the model trained on; on one machine the
 * check went from 16/320 to 27/320 with this, less than the spread between seeds); some
 * training conversations also start with such a summary in place of evicted turns, as a chat's
 * memory does after a summary.
 */
import { SeededRandom } from '../../src/gguf/random.ts';

export const RECALL_SYSTEM_PROMPT = 'Remember every note.';

/** The instruction rolling_summary and hybrid send (SUMMARY_INSTRUCTION in native/chat/chat.cpp; a test checks they agree). */
export const SUMMARY_INSTRUCTION = 'Summarize the conversation so far in one or two short sentences.';
/** Facts a summary lists at most (about summaryTokens = 48 tokens). */
const SUMMARY_FACTS = 4;

export const RECALL_NAMES = `
Mila Omar Lena Ivan Nora Hugo Sara Theo Ada Leo Iris Noah Maya Finn Zoe Ezra Lily Owen Ruby Axel
Emma Luca Anna Jonas Ella Felix Alma Oscar Vera Emil Clara Otto Rosa Elias Ida Karl Lea Paul Nina Tom
Eva Max Mara Ben Lara Jan Tara Sam Yara Tim Kira Ole Dina Rami Sofia Aron Jana Nils Mina Bruno Hana Kai Lina Arne
`.split(/\s+/).filter(Boolean);

const NOUNS = 'river garden window city market forest kitchen bridge station mountain library harbor village school road park lake train music weather';
const ADJECTIVES = 'cold warm quiet busy green old new small large bright dark long short calm';
const VERBS = 'likes visits paints walks to remembers watches';
const FILLER_FORMS = [
  (r: Pick) => `The ${r.noun()} is ${r.adj()} today.`,
  (r: Pick) => `I think the ${r.noun()} was ${r.adj()}.`,
  (r: Pick) => `Tell me about the ${r.adj()} ${r.noun()}.`,
  (r: Pick) => `We walked to the ${r.noun()} and the ${r.noun()}.`,
  (r: Pick) => `My friend ${r.verb()} the ${r.noun()}.`,
  (r: Pick) => `She has ${r.count()} friends at the ${r.noun()}.`,
  (r: Pick) => `Yes, the ${r.noun()} is very ${r.adj()}.`,
];

const WORDS = [
  ...RECALL_NAMES,
  // The template's role names: spelled out in byte pieces they made an exchange 26 tokens, of which
  // 9 were 'assistant' and 'user'.
  'system',
  'user',
  'assistant',
  ...`${NOUNS} ${ADJECTIVES} ${VERBS} code OK The the is I me We to and at Yes think walked Tell friends has very today about was My friend She Code of Remember every note Summarize conversation so far in one or two short sentences`.split(/\s+/),
];
/** The vocabulary pieces the format adds: every word bare (a message's first word) and after a space, and two-digit chunks. */
export const RECALL_PIECES: readonly string[] = [
  ...WORDS.flatMap((w) => [w, `\u2581${w}`]),
  // `▁48` before `48`: SPM merges prefer earlier pieces, so " 4817" is always `▁48` `17`.
  ...Array.from({ length: 100 }, (_, i) => `\u2581${String(i).padStart(2, '0')}`),
  ...Array.from({ length: 100 }, (_, i) => String(i).padStart(2, '0')),
];

export type RecallTurnKind = 'fact' | 'filler' | 'question' | 'summary';

export interface RecallTurn {
  kind: RecallTurnKind;
  user: string;
  assistant: string;
  /** fact and question turns: which fact (index into the conversation's facts) */
  fact?: number;
}

export interface RecallFact {
  name: string;
  code: string;
}

export interface RecallConversation {
  facts: RecallFact[];
  turns: RecallTurn[];
  /** Training only: a summary of these facts stands in memory before the turns, as after a rolling summary. */
  summaryOf?: number[];
}

class Pick {
  private readonly nouns = NOUNS.split(' ');
  private readonly adjs = ADJECTIVES.split(' ');
  private readonly verbs = VERBS.split(' ').filter((v) => v !== 'to');
  constructor(readonly rng: SeededRandom) {}
  int(n: number): number {
    return Math.floor(this.rng.next() * n);
  }
  of<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  noun = (): string => this.of(this.nouns);
  adj = (): string => this.of(this.adjs);
  verb = (): string => (this.rng.next() < 0.2 ? 'walks to' : this.of(this.verbs));
  name = (): string => this.of(RECALL_NAMES);
  count = (): string => String(2 + this.int(8));
}

const pair = (f: RecallFact): string => `${f.name} ${f.code}.`;
export const factTurn = (f: RecallFact, fact: number): RecallTurn => ({ kind: 'fact', user: pair(f), assistant: 'OK.', fact });
export const questionTurn = (f: RecallFact, fact: number): RecallTurn => ({ kind: 'question', user: `Code of ${f.name}?`, assistant: pair(f), fact });
export const summaryText = (facts: RecallFact[]): string => facts.slice(0, SUMMARY_FACTS).map(pair).join('\n');
const summaryTurn = (facts: RecallFact[]): RecallTurn => ({ kind: 'summary', user: SUMMARY_INSTRUCTION, assistant: summaryText(facts) });
function fillerTurn(p: Pick): RecallTurn {
  return { kind: 'filler', user: p.of(FILLER_FORMS)(p), assistant: 'OK.' };
}

function newFacts(p: Pick, n: number): RecallFact[] {
  const names = [...RECALL_NAMES];
  const facts: RecallFact[] = [];
  for (let i = 0; i < n; i++) {
    const name = names.splice(p.int(names.length), 1)[0]!;
    let code = '';
    for (let d = 0; d < 4; d++) code += String(p.int(10));
    facts.push({ name, code });
  }
  return facts;
}

export interface BenchShape {
  /** facts stated in the first turns */
  facts: number;
  /** of them, how many are asked about along the way (each `askedTimes` times) */
  asked: number;
  askedTimes: number;
  /** filler turns spread between the facts and the final questions */
  fillers: number;
  /** filler turns after the last question along the way, before the final questions */
  tailFillers: number;
}

/**
 * SCBench-style multi-turn conversation: facts first, then fillers with questions about some facts
 * along the way, then final questions about every fact (asked before, and never asked), in random order.
 */
export function benchConversation(seed: number, shape: BenchShape): RecallConversation {
  const p = new Pick(new SeededRandom(seed));
  const facts = newFacts(p, shape.facts);
  const turns: RecallTurn[] = facts.map((f, i) => factTurn(f, i));
  const middle: RecallTurn[] = [];
  for (let i = 0; i < shape.fillers; i++) middle.push(fillerTurn(p));
  for (let k = 0; k < shape.askedTimes; k++) {
    for (let f = 0; f < shape.asked; f++) middle.splice(p.int(middle.length + 1), 0, questionTurn(facts[f]!, f));
  }
  turns.push(...middle);
  for (let i = 0; i < shape.tailFillers; i++) turns.push(fillerTurn(p));
  const finals = facts.map((f, i) => questionTurn(f, i));
  for (let i = finals.length - 1; i > 0; i--) {
    const j = p.int(i + 1);
    [finals[i], finals[j]] = [finals[j]!, finals[i]!];
  }
  turns.push(...finals);
  return { facts, turns };
}

/**
 * A training conversation: either the benchmark's shape with random sizes, or a free mix where facts
 * and questions come at any point (a question always about a fact already stated). `maxTurns` bounds
 * it; the caller cuts it to the training length in tokens.
 */
export function trainingConversation(seed: number, maxTurns = 40): RecallConversation {
  const p = new Pick(new SeededRandom(seed));
  if (p.rng.next() < 0.5) {
    const facts = 2 + p.int(9);
    const asked = p.int(facts + 1);
    return benchConversation(seed ^ 0x5bd1e995, {
      facts,
      asked,
      askedTimes: 1 + p.int(2),
      fillers: p.int(14),
      tailFillers: p.int(8),
    });
  }
  const facts = newFacts(p, 2 + p.int(12));
  const turns: RecallTurn[] = [];
  let stated = 0;
  let summaryOf: number[] | undefined;
  if (p.rng.next() < 0.25) {
    // Memory after a rolling summary: the first facts are only in the summary.
    stated = 1 + p.int(Math.min(SUMMARY_FACTS, facts.length - 1));
    summaryOf = Array.from({ length: stated }, (_, i) => i);
  }
  const summaries = p.rng.next() < 0.3;
  // Dense: most turns state or ask, so every conversation has many recall targets.
  const factShare = 0.15 + 0.2 * p.rng.next();
  const questionShare = 0.35 + 0.3 * p.rng.next();
  while (turns.length < maxTurns) {
    const r = p.rng.next();
    if ((r < factShare || stated === 0) && stated < facts.length) {
      turns.push(factTurn(facts[stated]!, stated));
      stated++;
    } else if (r < factShare + questionShare && stated > 0) {
      const f = p.int(stated);
      turns.push(questionTurn(facts[f]!, f));
    } else if (summaries && r > 0.93 && stated > 0) {
      turns.push(summaryTurn(facts.slice(0, stated)));
    } else {
      turns.push(fillerTurn(p));
    }
  }
  return { facts, turns, ...(summaryOf ? { summaryOf } : {}) };
}

/** The chat messages of a conversation (system prompt first). */
export function recallMessages(c: RecallConversation): { role: 'system' | 'user' | 'assistant'; content: string }[] {
  const out: { role: 'system' | 'user' | 'assistant'; content: string }[] = [{ role: 'system', content: RECALL_SYSTEM_PROMPT }];
  for (const t of c.turns) out.push({ role: 'user', content: t.user }, { role: 'assistant', content: t.assistant });
  return out;
}

/** Exact match: the reply, trimmed, is the name and the code (the full stop optional). */
export function isCorrectAnswer(reply: string, fact: RecallFact): boolean {
  const r = reply.trim();
  return r === pair(fact) || r === pair(fact).slice(0, -1);
}
