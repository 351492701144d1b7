// Prints listings as a table, a wide table, JSON or YAML (-o).
import { createRequire } from 'node:module';
import { escapeUnsafe, unsafeCharacter } from '../proto/text.js';

// yaml is loaded on the first `-o yaml`, not at every start of the CLI: it is
// one of its largest imports. Its Node build is CommonJS, so require() loads
// it synchronously.
const load = createRequire(import.meta.url);
let yaml: typeof import('yaml') | undefined;
const YAML = () => {
  yaml ??= load('yaml') as typeof import('yaml');
  return yaml;
};

export type Format = 'table' | 'wide' | 'json' | 'yaml';
export const FORMATS: Format[] = ['table', 'wide', 'json', 'yaml'];

export interface Column<T> {
  header: string;
  value: (row: T) => string;
  /** Only in -o wide. */
  wide?: boolean;
}

export function parseFormat(text: string): Format {
  if (!FORMATS.includes(text as Format))
    throw new Error(`unknown output format "${text}": use ${FORMATS.join(', ')}`);
  return text as Format;
}

export function renderTable<T>(rows: T[], columns: Column<T>[], wide: boolean): string {
  const cols = columns.filter((c) => wide || !c.wide);
  // Values come from agents and admins: a control or bidi character would steer the terminal.
  const cells = [
    cols.map((c) => c.header),
    ...rows.map((r) => cols.map((c) => escapeUnsafe(c.value(r) || '-'))),
  ];
  const widths = cols.map((_, i) => Math.max(...cells.map((row) => row[i]!.length)));
  return cells
    .map((row) =>
      row
        .map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** `data` is what JSON and YAML print; `rows` feed the tables. */
export function render<T>(format: Format, data: unknown, rows: T[], columns: Column<T>[]): string {
  switch (format) {
    case 'json':
      // JSON.stringify escapes C0 controls but leaves C1 and bidi characters raw.
      return escapeUnsafe(JSON.stringify(data, null, 2), '\n');
    case 'yaml':
      // Double-quoted YAML scalars are the ones where \uXXXX escapes mean the character.
      return escapeUnsafe(YAML().stringify(quoteUnsafe(data), { lineWidth: 0 }).trimEnd(), '\n');
    default:
      return renderTable(rows, columns, format === 'wide');
  }
}

/** `data` with every string that holds a terminal-unsafe character made a double-quoted scalar. */
function quoteUnsafe(data: unknown): unknown {
  if (typeof data === 'string') {
    if (!unsafeCharacter(data)) return data;
    const { Scalar } = YAML();
    const s = new Scalar(data);
    s.type = Scalar.QUOTE_DOUBLE;
    return s;
  }
  if (Array.isArray(data)) return data.map(quoteUnsafe);
  if (data && typeof data === 'object')
    return Object.fromEntries(Object.entries(data).map(([k, v]) => [k, quoteUnsafe(v)]));
  return data;
}

/** "3m ago", "just now", "-" for the lastSeen column. */
export function ago(iso: string | undefined, now = Date.now()): string {
  if (!iso) return '';
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 5) return 'just now';
  if (s < 120) return `${s}s ago`;
  if (s < 7200) return `${Math.round(s / 60)}m ago`;
  if (s < 172800) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}
