// Durations as people type them: "90s", "30m", "1h", "7d", "1h30m".
import { quote } from './text.js';

const UNITS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 604_800_000,
};

/**
 * The longest duration anything accepts (about ten years): every expiry and
 * timeout stays far inside what a timestamp, an int64 and a JavaScript Date
 * can hold.
 */
export const MAX_DURATION_MS = 3650 * UNITS.d!;
const MAX_TEXT = 64;

export function parseDuration(text: string): number {
  if (text.length > MAX_TEXT)
    throw new RangeError(`invalid duration ${quote(text, 16)}: longer than ${MAX_TEXT} characters`);
  const trimmed = text.trim();
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d|w)/gy;
  let total = 0;
  let consumed = 0;
  for (let m = re.exec(trimmed); m; m = re.exec(trimmed)) {
    total += Number(m[1]) * UNITS[m[2]!]!;
    consumed = re.lastIndex;
  }
  if (trimmed === '' || consumed !== trimmed.length) {
    throw new RangeError(`invalid duration ${quote(text)}: use a number with a unit, e.g. 30m, 1h, 90d`);
  }
  if (!(total <= MAX_DURATION_MS)) throw new RangeError(`invalid duration ${quote(text)}: at most 3650d`);
  return Math.round(total);
}

export function formatDuration(ms: number): string {
  if (ms < 0) return `-${formatDuration(-ms)}`;
  const parts: string[] = [];
  for (const [unit, size] of [
    ['d', 86_400_000],
    ['h', 3_600_000],
    ['m', 60_000],
    ['s', 1000],
  ] as const) {
    if (ms >= size || (unit === 's' && parts.length === 0)) {
      parts.push(`${Math.floor(ms / size)}${unit}`);
      ms %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join('');
}
