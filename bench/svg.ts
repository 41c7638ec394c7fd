// Tiny dependency-free SVG chart writer for the benchmarks.
//   barChart({ title, unit, bars: [{ label, value }], logScale? })  -> horizontal bars, value printed at each bar
//   lineChart({ title, xLabel, yLabel, series: [{ name, points: [[x, y], ...] }] }) -> axes, ticks, legend
// Both return a standalone SVG string (write it to a .svg file and reference it from markdown).

export interface Bar {
  label: string;
  value: number;
}

export interface BarChartOptions {
  title: string;
  /** Unit printed after each value and on the axis title, e.g. 'ms'. */
  unit: string;
  bars: Bar[];
  /** Logarithmic value axis (bars must be > 0; others are drawn as empty). */
  logScale?: boolean;
  /** Total width in px (default 820). */
  width?: number;
}

export interface LineSeries {
  name: string;
  points: [number, number][];
}

export interface LineChartOptions {
  title: string;
  xLabel: string;
  yLabel: string;
  series: LineSeries[];
  width?: number;
  height?: number;
  /** Logarithmic y axis (points with y <= 0 are skipped). */
  logY?: boolean;
}

const FONT = 'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"';
const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];
const AXIS = '#333';
const GRID = '#e3e3e3';

export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

/** Short, readable number: 12 300 -> "12.3k", 0.0042 -> "0.0042", 1500000 -> "1.5M". */
export function formatNumber(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a === 0) return '0';
  if (a >= 1e9) return trim((v / 1e9).toPrecision(3)) + 'G';
  if (a >= 1e6) return trim((v / 1e6).toPrecision(3)) + 'M';
  if (a >= 1e4) return trim((v / 1e3).toPrecision(3)) + 'k';
  if (a >= 100) return String(Math.round(v));
  if (a >= 1) return trim(v.toPrecision(3));
  return trim(v.toPrecision(2));
}

function trim(s: string): string {
  return s.includes('.') && !s.includes('e') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}

/** Approximate text width (px) for layout; good enough for sans-serif at `size`. */
function textWidth(s: string, size: number): number {
  return s.length * size * 0.58;
}

/** "Nice" linear ticks (steps of 1, 2 or 5 x 10^k) covering [min, max]. */
export function niceTicks(min: number, max: number, count = 5): number[] {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  if (min === max) {
    const d = min === 0 ? 1 : Math.abs(min) * 0.5;
    min -= d;
    max += d;
  }
  const raw = (max - min) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const start = Math.floor(min / step + 1e-9) * step;
  const end = Math.ceil(max / step - 1e-9) * step;
  const ticks: number[] = [];
  for (let v = start; v <= end + step * 1e-6; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Log-scale ticks: powers of ten, plus 2 and 5 multiples when the range spans few decades. */
export function logTicks(min: number, max: number): number[] {
  const lo = Math.floor(Math.log10(min));
  let hi = Math.ceil(Math.log10(max));
  if (hi === lo) hi = lo + 1;
  const multiples = hi - lo <= 2 ? [1, 2, 5] : hi - lo <= 4 ? [1, 3] : [1];
  const ticks: number[] = [];
  for (let e = lo; e <= hi; e++) {
    for (const m of multiples) {
      const v = Number((m * 10 ** e).toPrecision(12));
      if (v >= 10 ** lo && v <= 10 ** hi) ticks.push(v);
    }
  }
  return ticks;
}

function svgOpen(width: number, height: number, title: string): string[] {
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" ${FONT} font-size="12">`,
    `<title>${escapeXml(title)}</title>`,
    `<rect x="0" y="0" width="${width}" height="${height}" fill="#fff"/>`,
    `<text x="${width / 2}" y="24" text-anchor="middle" font-size="16" font-weight="600" fill="${AXIS}">${escapeXml(title)}</text>`,
  ];
}

function r(v: number): string {
  return String(Math.round(v * 10) / 10);
}

/** Horizontal bar chart: one row per bar, label on the left, value at the bar's end. */
export function barChart(opts: BarChartOptions): string {
  const { title, unit, bars } = opts;
  const logScale = opts.logScale ?? false;
  const width = opts.width ?? 820;
  const barH = 22;
  const gap = 10;
  const labelW = Math.min(340, Math.max(80, ...bars.map((b) => textWidth(b.label, 12))) + 16);
  const valueW = 80;
  const left = labelW;
  const right = width - valueW;
  const top = 44;
  const plotH = Math.max(1, bars.length) * (barH + gap) + gap;
  const height = top + plotH + 52;

  const finite = bars.map((b) => b.value).filter((v) => Number.isFinite(v) && (!logScale || v > 0));
  let ticks: number[];
  let scale: (v: number) => number;
  if (logScale) {
    const min = finite.length ? Math.min(...finite) : 1;
    const max = finite.length ? Math.max(...finite) : 10;
    // Start the axis well below the smallest bar so that every bar has a visible length.
    ticks = logTicks(min / 3, max);
    const l0 = Math.log10(ticks[0]!);
    const l1 = Math.log10(ticks[ticks.length - 1]!);
    scale = (v) => left + ((Math.log10(v) - l0) / (l1 - l0)) * (right - left);
  } else {
    const max = finite.length ? Math.max(0, ...finite) : 1;
    const min = finite.length ? Math.min(0, ...finite) : 0;
    ticks = niceTicks(min, max === min ? min + 1 : max);
    const t0 = ticks[0]!;
    const t1 = ticks[ticks.length - 1]!;
    scale = (v) => left + ((v - t0) / (t1 - t0)) * (right - left);
  }

  const out = svgOpen(width, height, title);
  // grid + tick labels
  for (const t of ticks) {
    const x = scale(t);
    out.push(`<line x1="${r(x)}" y1="${top}" x2="${r(x)}" y2="${top + plotH}" stroke="${GRID}"/>`);
    out.push(`<text x="${r(x)}" y="${top + plotH + 16}" text-anchor="middle" fill="${AXIS}">${escapeXml(formatNumber(t))}</text>`);
  }
  out.push(`<line x1="${left}" y1="${top}" x2="${left}" y2="${top + plotH}" stroke="${AXIS}"/>`);
  out.push(`<line x1="${left}" y1="${top + plotH}" x2="${right}" y2="${top + plotH}" stroke="${AXIS}"/>`);
  out.push(
    `<text x="${r((left + right) / 2)}" y="${top + plotH + 38}" text-anchor="middle" fill="${AXIS}">${escapeXml(unit)}${logScale ? ' (log scale)' : ''}</text>`,
  );
  const base = logScale ? left : scale(0);
  bars.forEach((b, i) => {
    const y = top + gap + i * (barH + gap);
    out.push(`<text x="${left - 8}" y="${r(y + barH / 2 + 4)}" text-anchor="end" fill="${AXIS}">${escapeXml(b.label)}</text>`);
    const ok = Number.isFinite(b.value) && (!logScale || b.value > 0);
    if (!ok) {
      out.push(`<text x="${left + 6}" y="${r(y + barH / 2 + 4)}" fill="#999">n/a</text>`);
      return;
    }
    const x = scale(b.value);
    const x0 = Math.min(base, x);
    const w = Math.max(1, Math.abs(x - base));
    out.push(`<rect x="${r(x0)}" y="${y}" width="${r(w)}" height="${barH}" fill="${PALETTE[i % PALETTE.length]}"/>`);
    out.push(`<text x="${r(Math.max(base, x) + 6)}" y="${r(y + barH / 2 + 4)}" fill="${AXIS}">${escapeXml(`${formatNumber(b.value)} ${unit}`)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}

/** Line chart with linear x, linear (or log) y, circle markers and a legend. */
export function lineChart(opts: LineChartOptions): string {
  const { title, xLabel, yLabel, series } = opts;
  const width = opts.width ?? 820;
  const legendRows = Math.ceil(series.length / 4);
  const height = opts.height ?? 460;
  const top = 44 + legendRows * 18;
  const left = 72;
  const right = width - 24;
  const bottom = height - 52;
  const logY = opts.logY ?? false;

  const pts = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!logY || y > 0));
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const xt = niceTicks(xs.length ? Math.min(...xs) : 0, xs.length ? Math.max(...xs) : 1, 6);
  const yt = logY
    ? logTicks(ys.length ? Math.min(...ys) : 1, ys.length ? Math.max(...ys) : 10)
    : niceTicks(ys.length ? Math.min(0, ...ys) : 0, ys.length ? Math.max(...ys) : 1, 5);
  const x0 = xt[0]!;
  const x1 = xt[xt.length - 1]!;
  const sx = (v: number) => left + ((v - x0) / (x1 - x0 || 1)) * (right - left);
  const sy = logY
    ? (v: number) => bottom - ((Math.log10(v) - Math.log10(yt[0]!)) / (Math.log10(yt[yt.length - 1]!) - Math.log10(yt[0]!) || 1)) * (bottom - top)
    : (v: number) => bottom - ((v - yt[0]!) / (yt[yt.length - 1]! - yt[0]! || 1)) * (bottom - top);

  const out = svgOpen(width, height, title);
  // legend (up to 4 entries per row, under the title)
  series.forEach((s, i) => {
    const col = i % 4;
    const row = Math.floor(i / 4);
    const lx = left + col * ((right - left) / 4);
    const ly = 40 + row * 18;
    const color = PALETTE[i % PALETTE.length];
    out.push(`<line x1="${r(lx)}" y1="${ly}" x2="${r(lx + 18)}" y2="${ly}" stroke="${color}" stroke-width="2.5"/>`);
    out.push(`<circle cx="${r(lx + 9)}" cy="${ly}" r="3" fill="${color}"/>`);
    out.push(`<text x="${r(lx + 24)}" y="${ly + 4}" fill="${AXIS}">${escapeXml(s.name)}</text>`);
  });
  for (const t of yt) {
    const y = sy(t);
    out.push(`<line x1="${left}" y1="${r(y)}" x2="${right}" y2="${r(y)}" stroke="${GRID}"/>`);
    out.push(`<text x="${left - 6}" y="${r(y + 4)}" text-anchor="end" fill="${AXIS}">${escapeXml(formatNumber(t))}</text>`);
  }
  for (const t of xt) {
    const x = sx(t);
    out.push(`<line x1="${r(x)}" y1="${bottom}" x2="${r(x)}" y2="${bottom + 5}" stroke="${AXIS}"/>`);
    out.push(`<text x="${r(x)}" y="${bottom + 18}" text-anchor="middle" fill="${AXIS}">${escapeXml(formatNumber(t))}</text>`);
  }
  out.push(`<line x1="${left}" y1="${top}" x2="${left}" y2="${bottom}" stroke="${AXIS}"/>`);
  out.push(`<line x1="${left}" y1="${bottom}" x2="${right}" y2="${bottom}" stroke="${AXIS}"/>`);
  out.push(`<text x="${r((left + right) / 2)}" y="${height - 14}" text-anchor="middle" fill="${AXIS}">${escapeXml(xLabel)}</text>`);
  const yMid = (top + bottom) / 2;
  out.push(
    `<text x="16" y="${r(yMid)}" text-anchor="middle" transform="rotate(-90 16 ${r(yMid)})" fill="${AXIS}">${escapeXml(yLabel)}${logY ? ' (log scale)' : ''}</text>`,
  );
  series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const p = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!logY || y > 0));
    if (p.length === 0) return;
    if (p.length > 1) {
      const d = p.map(([x, y], j) => `${j === 0 ? 'M' : 'L'}${r(sx(x))},${r(sy(y))}`).join(' ');
      out.push(`<path d="${d}" fill="none" stroke="${color}" stroke-width="2"/>`);
    }
    if (p.length <= 60) {
      for (const [x, y] of p) out.push(`<circle cx="${r(sx(x))}" cy="${r(sy(y))}" r="3" fill="${color}"/>`);
    }
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
