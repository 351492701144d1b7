import { SyntaxProblem } from './errors.js';

/** A policy is a few levels deep; parsing and validating recurse once per level. */
export const MAX_DEPTH = 32;

/**
 * Turns HuJSON (JSON with comments and trailing commas) into JSON of the same length: every removed
 * character becomes a space and line breaks stay, so offsets into the result are offsets into the input.
 */
export function standardize(text: string): string {
  const out = text.split('');
  // Editors on Windows may save a byte order mark, which JSON.parse refuses.
  if (out[0] === '\uFEFF') out[0] = ' ';
  let pendingComma = -1;
  let depth = 0;
  let i = 0;
  const blank = (from: number, to: number) => {
    for (let k = from; k < to; k++) if (out[k] !== '\n' && out[k] !== '\r') out[k] = ' ';
  };
  while (i < text.length) {
    const c = text[i];
    if (c === '"') {
      i = skipString(text, i);
      pendingComma = -1;
    } else if (c === '/' && text[i + 1] === '/') {
      const end = text.indexOf('\n', i);
      const stop = end < 0 ? text.length : end;
      blank(i, stop);
      i = stop;
    } else if (c === '/' && text[i + 1] === '*') {
      const end = text.indexOf('*/', i + 2);
      if (end < 0) throw new SyntaxProblem(i, 'unterminated /* comment');
      blank(i, end + 2);
      i = end + 2;
    } else if (c === ' ' || c === '\t' || c === '\n' || c === '\r') {
      i++;
    } else {
      if (c === '[' || c === '{') {
        if (++depth > MAX_DEPTH) throw new SyntaxProblem(i, `nested more than ${MAX_DEPTH} levels deep`);
      } else if (c === ']' || c === '}') {
        depth--;
        if (pendingComma >= 0) out[pendingComma] = ' ';
      }
      pendingComma = c === ',' ? i : -1;
      i++;
    }
  }
  return out.join('');
}

/** Returns the offset after the string starting at `start`; JSON.parse reports a string left open. */
function skipString(text: string, start: number): number {
  let i = start + 1;
  while (i < text.length && text[i] !== '"' && text[i] !== '\n') i += text[i] === '\\' ? 2 : 1;
  return i + 1;
}
