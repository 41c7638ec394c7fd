// Conversation generators for bench:recall beyond the one the recall model was checked on, so that a
// policy's win cannot come from one conversation layout. Each keeps the recall format's fact and
// question turns (what the model answers) and changes what is around them: how many facts, where
// they are stated, how often they are asked or restated, and how long the fillers are. The fillers
// here are new sentence forms (over the words of the recall vocabulary), not the ones the model was
// trained on. Written apart from scripts/recall/dialogues.ts on purpose: that file is part of the
// recall model's recipe (a change there retrains it), and these generators must not shape training.
import { SeededRandom } from '../src/gguf/random.ts';
import { RECALL_BENCH_SHAPE } from '../scripts/make-recall-model.ts';
import { RECALL_NAMES, benchConversation, factTurn, questionTurn, type RecallConversation, type RecallFact, type RecallTurn } from '../scripts/recall/dialogues.ts';

const PLACES = ['river', 'garden', 'window', 'market', 'forest', 'kitchen', 'bridge', 'station', 'library', 'harbor', 'village', 'park', 'lake'];
const QUALITIES = ['cold', 'warm', 'quiet', 'busy', 'green', 'old', 'small', 'bright', 'dark', 'calm'];
const SENTENCES = [
  (r: Rand) => `The ${r.of(PLACES)} was ${r.of(QUALITIES)} and the ${r.of(PLACES)} was ${r.of(QUALITIES)}.`,
  (r: Rand) => `We think the ${r.of(QUALITIES)} ${r.of(PLACES)} is far.`,
  (r: Rand) => `I walked to the ${r.of(PLACES)} today.`,
  (r: Rand) => `My friend has the ${r.of(QUALITIES)} ${r.of(PLACES)}.`,
  (r: Rand) => `Yes, I think so.`,
];

class Rand {
  constructor(private readonly rng: SeededRandom) {}
  int(n: number): number {
    return Math.floor(this.rng.next() * n);
  }
  of<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [xs[i], xs[j]] = [xs[j]!, xs[i]!];
    }
    return xs;
  }
  facts(n: number): RecallFact[] {
    return this.shuffle([...RECALL_NAMES]).slice(0, n).map((name) => ({ name, code: Array.from({ length: 4 }, () => String(this.int(10))).join('') }));
  }
}

const filler = (r: Rand, sentences: number): RecallTurn =>
  ({ kind: 'filler', user: Array.from({ length: sentences }, () => r.of(SENTENCES)(r)).join(' '), assistant: 'OK.' });

/** Final questions about every fact, in random order: the turns the benchmark scores. */
const finals = (r: Rand, facts: RecallFact[]): RecallTurn[] => r.shuffle(facts.map((f, i) => questionTurn(f, i)));

/** `n` facts stated first, then what `middle` makes of them, then the finals. */
function factsFirst(seed: number, n: number, middle: (r: Rand, facts: RecallFact[]) => RecallTurn[]): RecallConversation {
  const r = new Rand(new SeededRandom(seed));
  const facts = r.facts(n);
  return { facts, turns: [...facts.map(factTurn), ...middle(r, facts), ...finals(r, facts)] };
}

export interface RecallGenerator {
  name: string;
  /** What it varies, for the benchmark's setup lines. */
  about: string;
  make: (seed: number) => RecallConversation;
}

export const RECALL_GENERATORS: RecallGenerator[] = [
  {
    name: 'classic',
    about: `the recall model's check: ${RECALL_BENCH_SHAPE.facts} facts first, ${RECALL_BENCH_SHAPE.asked} of them asked twice among fillers`,
    make: (seed) => benchConversation(seed, RECALL_BENCH_SHAPE),
  },
  {
    name: 'asked once',
    about: '5 facts first, 2 of them asked once, 2 short fillers of new forms',
    make: (seed) => factsFirst(seed, 5, (r, facts) => {
      const middle: RecallTurn[] = Array.from({ length: 2 }, () => filler(r, 1));
      for (const f of [0, 1]) middle.splice(1 + r.int(middle.length), 0, questionTurn(facts[f]!, f));
      return middle;
    }),
  },
  {
    name: 'long fillers',
    about: '4 facts first, one of the last two asked once right after, then 3 fillers of 2 sentences each (new forms)',
    make: (seed) => factsFirst(seed, 4, (r, facts) => {
      const asked = 2 + r.int(2);
      // Asked while the facts are still recent (a filler longer than a tight budget before the question
      // would evict the fact before anything could mark it), and fillers of two sentences: at 25% of
      // these ~230-token conversations a budget is ~58 tokens, and a message of three or four sentences
      // (~45 tokens with its template) left room for nothing else.
      return [questionTurn(facts[asked]!, asked), filler(r, 2), filler(r, 2), filler(r, 2)];
    }),
  },
  {
    name: 'interleaved',
    about: '4 facts stated along the way (one restated later), each question about a fact stated before it, fillers between',
    make: (seed) => {
      const r = new Rand(new SeededRandom(seed));
      const facts = r.facts(4);
      const turns: RecallTurn[] = [factTurn(facts[0]!, 0)];
      const restated = r.int(4);
      for (let f = 1; f < facts.length; f++) {
        if (r.int(2) === 0) turns.push(filler(r, 1));
        turns.push(factTurn(facts[f]!, f));
        // A question about an earlier fact (two of the three chances), so some facts are asked before the end.
        if (r.int(3) > 0) {
          const q = r.int(f);
          turns.push(questionTurn(facts[q]!, q));
        }
      }
      turns.push(factTurn(facts[restated]!, restated));
      return { facts, turns: [...turns, ...finals(r, facts)] };
    },
  },
];
