import { quote } from '../../proto/text.js';
import { type JsonPath, SyntaxProblem } from './errors.js';

/** Offsets of a value and, for object members, of its key. */
export interface Located {
  value: number;
  key?: number;
}

export interface SourceIndex {
  /** By `pathKey(path)`; a duplicated key keeps the offsets of its last occurrence, as JSON.parse keeps its value. */
  positions: Map<string, Located>;
  /** The first key that occurs twice in one object. */
  duplicate?: JsonPath;
}

const LITERAL = /true|false|null|-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

export function pathKey(path: JsonPath): string {
  return JSON.stringify(path);
}

/** `acls[1].dst[0]`, `groups["group:ops"][2]`. */
export function formatPath(path: JsonPath): string {
  return path
    .map((part, i) => {
      if (typeof part === 'number') return `[${part}]`;
      if (/^[A-Za-z_$][\w$]*$/.test(part)) return i === 0 ? part : `.${part}`;
      return `[${quote(part)}]`;
    })
    .join('');
}

/** 1-based line and column of a UTF-16 offset. */
export function lineColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  for (let i = text.indexOf('\n'); i >= 0 && i < offset; i = text.indexOf('\n', i + 1)) {
    line++;
    lineStart = i + 1;
  }
  return { line, column: offset - lineStart + 1 };
}

/**
 * Records where every value of a JSON text starts, by path, so that errors found on the parsed value can
 * point back into the source. Throws SyntaxProblem at the first character that is not JSON.
 */
export function indexSource(json: string): SourceIndex {
  const positions = new Map<string, Located>();
  let duplicate: JsonPath | undefined;
  let i = 0;

  const skipSpace = () => {
    while (json[i] === ' ' || json[i] === '\t' || json[i] === '\n' || json[i] === '\r') i++;
  };
  const expect = (c: string, what: string) => {
    skipSpace();
    if (json[i] !== c) throw new SyntaxProblem(i, `expected ${what}`);
    i++;
  };

  const string = (): string => {
    const start = i;
    i++;
    while (json[i] !== '"') {
      if (i >= json.length || json.charCodeAt(i) < 0x20)
        throw new SyntaxProblem(start, 'unterminated string');
      i += json[i] === '\\' ? 2 : 1;
    }
    i++;
    try {
      return JSON.parse(json.slice(start, i)) as string;
    } catch {
      throw new SyntaxProblem(start, 'bad escape in string');
    }
  };

  const value = (path: JsonPath, key?: number): void => {
    skipSpace();
    positions.set(pathKey(path), key === undefined ? { value: i } : { value: i, key });
    const c = json[i];
    if (c === '{') {
      i++;
      skipSpace();
      if (json[i] === '}') {
        i++;
        return;
      }
      const seen = new Set<string>();
      for (;;) {
        skipSpace();
        if (json[i] !== '"') throw new SyntaxProblem(i, 'expected a double-quoted key');
        const keyAt = i;
        const name = string();
        if (seen.has(name)) duplicate ??= [...path, name];
        seen.add(name);
        expect(':', "':' after the key");
        value([...path, name], keyAt);
        skipSpace();
        if (json[i] === '}') break;
        expect(',', "',' or '}'");
      }
      i++;
    } else if (c === '[') {
      i++;
      skipSpace();
      if (json[i] === ']') {
        i++;
        return;
      }
      for (let n = 0; ; n++) {
        value([...path, n]);
        skipSpace();
        if (json[i] === ']') break;
        expect(',', "',' or ']'");
      }
      i++;
    } else if (c === '"') {
      string();
    } else {
      LITERAL.lastIndex = i;
      const token = LITERAL.exec(json);
      if (!token)
        throw new SyntaxProblem(i, i < json.length ? 'expected a value' : 'unexpected end of input');
      i += token[0].length;
    }
  };

  value([]);
  skipSpace();
  if (i < json.length) throw new SyntaxProblem(i, 'unexpected text after the end');
  return duplicate ? { positions, duplicate } : { positions };
}
