// Text that may end up on a terminal: control characters (C0, DEL, C1, of
// which U+009B starts an escape sequence on many terminals), line and
// paragraph separators, and bidirectional marks, overrides and isolates,
// which make a terminal show something else than what is there.
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are exactly what is matched
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

const codePoint = (c: string) => `U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`;

/** Offset and U+XXXX name of the first terminal-unsafe character not in `keep`, or undefined. */
export function firstUnsafe(text: string, keep = ''): { offset: number; character: string } | undefined {
  UNSAFE.lastIndex = 0;
  for (let m = UNSAFE.exec(text); m; m = UNSAFE.exec(text)) {
    if (!keep.includes(m[0])) return { offset: m.index, character: codePoint(m[0]) };
  }
  return undefined;
}

/** The first terminal-unsafe character of `text`, as U+XXXX, or undefined. */
export function unsafeCharacter(text: string): string | undefined {
  return firstUnsafe(text)?.character;
}

/**
 * `text` with every terminal-unsafe character written as \uXXXX, so it prints
 * as what it is; `keep` names characters to leave alone (the line breaks of a
 * document).
 */
export function escapeUnsafe(text: string, keep = ''): string {
  return text.replace(UNSAFE, (c) =>
    keep.includes(c) ? c : `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
}

/** A value for an error message: quoted, escaped, and cut to its first `max` characters. */
export function quote(value: string, max = 64): string {
  const cut = value.length > max ? `${value.slice(0, max)}…` : value;
  return escapeUnsafe(JSON.stringify(cut));
}
