// The recall model's training helpers (scripts/recall/train.py): where the attention hint points,
// when it costs nothing, and that the pair drill states every fact before it asks for it. Runs
// Debian's python3-torch; skipped with a message where it is not installed (CI does not install it).
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = join(import.meta.dirname, '..', '..');
const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';

function hasTorch(): boolean {
  try {
    execFileSync(PYTHON, ['-c', 'import torch, numpy'], { stdio: 'ignore', env: { ...process.env, OPENBLAS_NUM_THREADS: '1' } });
    return true;
  } catch {
    return false;
  }
}
const torch = hasTorch();
if (!torch) console.warn('[recall-training] skipping: python3-torch is not installed (apt-get install python3-torch)');

/** Runs `body` with train.py's names in scope; it prints one JSON value, returned parsed. */
function py(body: string): unknown {
  const script = `import sys, json, torch, numpy as np\nsys.path.insert(0, ${JSON.stringify(join(ROOT, 'scripts', 'recall'))})\nfrom train import *\n${body}`;
  return JSON.parse(execFileSync(PYTHON, ['-c', script], { encoding: 'utf8', env: { ...process.env, OPENBLAS_NUM_THREADS: '1', OMP_NUM_THREADS: '1' } }));
}

describe.skipIf(!torch)('recall training helpers (train.py)', () => {
  // BOS, fact "N A B .", an A after another token (a distractor), then the answer "N A B": targets
  // predict A (at N) and B (at A).
  const SEQ = '[[1, 10, 20, 30, 5, 20, 10, 20, 30, 5]]';

  it('induction_sources points each code target at where its token followed the same token', () => {
    const got = py(`x = torch.tensor(${SEQ})
targets = torch.zeros(1, 9, dtype=torch.bool); targets[0, 6] = True; targets[0, 7] = True; targets[0, 5] = True
src = induction_sources(x, targets)
print(json.dumps({str(t): src[0, t].nonzero().flatten().tolist() for t in range(9)}))`) as Record<string, number[]>;
    expect(got['6']).toEqual([2]); // at the answer's N, predicting A: the fact's A, not the distractor's
    expect(got['7']).toEqual([3]); // at the answer's A, predicting B: the fact's B
    expect(got['5']).toEqual([]); // no A was followed by N before: no source
    expect(got['0']).toEqual([]); // not a target
  });

  it('the hint costs nothing once the heads put the asked mass on the sources, and more the less they do', () => {
    const got = py(`x = torch.tensor(${SEQ})
targets = torch.zeros(1, 9, dtype=torch.bool); targets[0, 6] = True
src = induction_sources(x, targets)
class B: pass
class M: blocks = [B()]
def loss_with(on_source):
    att = torch.full((1, 1, 9, 9), (1 - on_source) / 8); att[0, 0, 6, 2] = on_source
    M.blocks[0].attention = att
    return attention_hint_loss(M, {"layer": 0, "heads": [0], "mass": 0.5}, src).item()
print(json.dumps([loss_with(0.9), loss_with(0.5), loss_with(0.2), loss_with(0.05)]))`) as number[];
    expect(got[0]).toBe(0);
    expect(got[1]).toBeCloseTo(0, 5);
    expect(got[2]).toBeGreaterThan(0);
    expect(got[3]).toBeGreaterThan(got[2]!);
  });

  it('the pair drill asks only for facts it stated, each answer with its own code', () => {
    // Training-like data: BOS, two answers "name c1 c2 ." (weights 1 on predicting c1, c2), padding.
    const got = py(`tokens = torch.tensor([[1, 40, 10, 50, 60, 5, 9, 41, 11, 51, 61, 5, 8, 0, 0, 0]] * 4)
weights = torch.zeros(4, 16); weights[:, 2] = weights[:, 3] = weights[:, 8] = weights[:, 9] = 1
drill = PairDrill(tokens, weights, 7)
x, w = drill.batch(8, 64, 2)
bad = 0; targets = 0
for b in range(8):
    seq = x[b].tolist()
    for t in np.nonzero(w[b].numpy())[0].tolist():
        if w[b, t - 1] == 0:  # a first code token: seq[t] is a name, seq[t+1:t+3] its code
            targets += 1
            first = next(i for i in range(t) if seq[i] == seq[t])  # where the name was stated
            bad += seq[first + 1:first + 3] != seq[t + 1:t + 3]
src = induction_sources(x, w[:, :-1] >= 1)
print(json.dumps({"names": drill.names.tolist(), "stop": drill.stop, "bad": int(bad), "targets": targets,
  "sourceless": int(((w[:, :-1] >= 1) & ~src.any(-1)).sum()), "filler": drill.filler.tolist()}))`) as { names: number[]; stop: number; bad: number; targets: number; sourceless: number; filler: number[] };
    expect(got.names).toEqual([10, 11]);
    expect(got.stop).toBe(5);
    expect(got.filler).not.toContain(10);
    expect(got.targets).toBeGreaterThan(8);
    expect(got.bad).toBe(0);
    expect(got.sourceless).toBe(0);
  });
});
