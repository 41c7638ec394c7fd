/**
 * A progress line for long work on the command line: a bar with the percentage (and the time left,
 * once it can be estimated) redrawn in place on a TTY, plain lines at each quarter otherwise (logs,
 * pipes). Writes to stderr.
 */
export interface Progress {
  /** `fraction` 0..1 of the work done. */
  update(fraction: number): void;
  done(): void;
}

const WIDTH = 30;

function duration(s: number): string {
  if (!Number.isFinite(s) || s < 0) return '';
  if (s < 90) return `${Math.ceil(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function progress(label: string, options: { eta?: boolean; stream?: NodeJS.WriteStream } = {}): Progress {
  const out = options.stream ?? process.stderr;
  const tty = out.isTTY === true;
  const t0 = performance.now();
  let lastQuarter = -1;
  let lastPct = -1;
  let finished = false;
  const left = (f: number) => {
    if (!options.eta || f <= 0.02) return '';
    const elapsed = (performance.now() - t0) / 1000;
    return `, ${duration((elapsed * (1 - f)) / f)} left`;
  };
  return {
    update(fraction) {
      if (finished) return;
      const f = Math.min(1, Math.max(0, fraction));
      const pct = Math.floor(f * 100);
      if (tty) {
        if (pct === lastPct) return;
        lastPct = pct;
        const fill = Math.round(f * WIDTH);
        out.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(WIDTH - fill)}] ${String(pct).padStart(3)}%${left(f)}\x1b[K`);
      } else {
        const quarter = Math.floor(pct / 25);
        if (quarter === lastQuarter) return;
        lastQuarter = quarter;
        out.write(`${label}: ${pct}%${left(f)}\n`);
      }
    },
    done() {
      if (finished) return;
      this.update(1);
      finished = true;
      if (tty) out.write('\n');
    },
  };
}
