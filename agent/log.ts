// The agent's logger: JSON lines for journald and log shippers, one readable line per record for a
// person at a terminal. `auto` picks text when stderr is a terminal, so systemd (no TTY) gets JSON.
import pino, { type Logger } from 'pino';

export type LogFormat = 'auto' | 'json' | 'text';

const LEVELS: Record<number, [string, string]> = {
  10: ['TRACE', '\x1b[90m'],
  20: ['DEBUG', '\x1b[36m'],
  30: ['INFO', '\x1b[32m'],
  40: ['WARN', '\x1b[33m'],
  50: ['ERROR', '\x1b[31m'],
  60: ['FATAL', '\x1b[35m'],
};
const RESET = '\x1b[0m';
const OMIT = new Set(['level', 'time', 'msg', 'svc', 'pid', 'hostname']);

/** Turns one pino JSON record into `HH:MM:SS.mmm LEVEL message key=value …`. */
export function formatRecord(line: string, color: boolean): string {
  let rec: Record<string, unknown>;
  try {
    rec = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return line;
  }
  const [name, tint] = LEVELS[Number(rec.level)] ?? ['LOG', ''];
  const time = new Date(Number(rec.time)).toISOString().slice(11, 23);
  const level = color ? `${tint}${name.padEnd(5)}${RESET}` : name.padEnd(5);
  const fields = Object.entries(rec)
    .filter(([k]) => !OMIT.has(k))
    .map(([k, v]) => `${k}=${typeof v === 'string' && !/\s|"/.test(v) ? v : JSON.stringify(v)}`);
  return [time, level, String(rec.msg ?? ''), ...fields].join(' ').trimEnd();
}

export function createAgentLogger(level: string, format: LogFormat): Logger {
  const options = { level, base: { svc: 'meshgate-agent' }, redact: ['authKey', 'key'] };
  const text = format === 'text' || (format === 'auto' && process.stderr.isTTY === true);
  if (!text) return pino(options, pino.destination(2));
  const color = process.stderr.isTTY === true && !process.env.NO_COLOR;
  return pino(options, {
    write(chunk: string) {
      for (const line of chunk.split('\n')) if (line) process.stderr.write(`${formatRecord(line, color)}\n`);
    },
  });
}
