// The command line's progress line: a bar redrawn in place on a terminal, a line per quarter elsewhere.
import { describe, expect, it } from 'vitest';
import { progress } from '../../src/progress.ts';

function stream(tty: boolean) {
  const chunks: string[] = [];
  return { chunks, s: { isTTY: tty, write: (c: string) => chunks.push(c) } as unknown as NodeJS.WriteStream };
}

describe('progress', () => {
  it('writes a line per quarter when the stream is not a terminal', () => {
    const { chunks, s } = stream(false);
    const p = progress('loading m.gguf', { stream: s });
    for (let f = 0; f <= 1.0001; f += 0.01) p.update(f);
    p.done();
    expect(chunks).toEqual(['loading m.gguf: 0%\n', 'loading m.gguf: 25%\n', 'loading m.gguf: 50%\n', 'loading m.gguf: 75%\n', 'loading m.gguf: 100%\n']);
  });

  it('redraws a bar in place on a terminal, with the time left when asked, and ends the line', () => {
    const { chunks, s } = stream(true);
    const p = progress('training', { stream: s, eta: true });
    p.update(0.5);
    p.update(0.5); // unchanged: not redrawn
    p.done();
    expect(chunks).toHaveLength(3);
    expect(chunks[0]).toMatch(/^\rtraining \[#{15}\.{15}\]  50%, \d+ s left\x1b\[K$/);
    expect(chunks[1]).toMatch(/^\rtraining \[#{30}\] 100%/);
    expect(chunks[2]).toBe('\n');
  });
});
