// Checks on what arrives from the network, before it reaches the state.
import { isIP } from 'node:net';
import type { DescMessage, MessageShape } from '@bufbuild/protobuf';
import { parseDuration } from '../../proto/duration.js';
import { isTag } from '../../proto/names.js';
import { quote, unsafeCharacter } from '../../proto/text.js';
import { invalid } from '../state/errors.js';

export const LIMITS = {
  hostname: 253,
  os: 64,
  version: 64,
  endpoints: 16,
  routes: 64,
  tags: 32,
  lockdownPorts: 16,
  reason: 256,
  updateReason: 512,
  description: 256,
  policy: 1024 * 1024,
  /** Any other string of an admin request: names, ids, tags, durations. */
  field: 1024,
  /** Any list of an admin request. */
  items: 256,
};

/** Refuses text that would be stored and later shown on a terminal: too long, or with characters that steer it. */
export function text(field: string, value: string, max: number): string {
  sized(field, value, max);
  const bad = unsafeCharacter(value);
  if (bad) throw invalid(`${field} contains the control or bidirectional character ${bad}`);
  return value;
}

export function sized(field: string, value: string, max: number): string {
  if (value.length > max) throw invalid(`${field} is larger than ${max} bytes`);
  return value;
}

/**
 * Bounds every string, bytes and list field of a request before any handler
 * looks at it, so no work (and no error message) scales with what a caller
 * sends. Fields with tighter rules are checked again by their handler.
 */
export function bounded<D extends DescMessage>(schema: D, message: MessageShape<D>): MessageShape<D> {
  const values = message as unknown as Record<string, unknown>;
  for (const f of schema.fields) {
    const v = values[f.localName];
    const max = f.name === 'policy' ? LIMITS.policy : LIMITS.field;
    if (typeof v === 'string' || v instanceof Uint8Array) {
      if (v.length > max) throw invalid(`${f.name} is larger than ${max} bytes`);
    } else if (Array.isArray(v)) {
      if (v.length > LIMITS.items) throw invalid(`${f.name}: at most ${LIMITS.items} entries`);
      for (const item of v) if (typeof item === 'string') sized(f.name, item, LIMITS.field);
    }
  }
  return message;
}

export function list(
  field: string,
  values: string[],
  max: number,
  check: (v: string) => boolean,
  what: string,
): string[] {
  if (values.length > max) throw invalid(`${field}: at most ${max} entries`);
  for (const v of values) if (!check(v)) throw invalid(`${field}: ${quote(v)} is not ${what}`);
  return values;
}

export function isEndpoint(v: string): boolean {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(v);
  if (!m) return false;
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  return isIP(host) === (m[1] ? 6 : 4) && port > 0 && port < 65536;
}

/** Sorted and without duplicates, so that an unchanged setting compares equal. */
export function lockdownPorts(values: number[]): number[] {
  if (values.length > LIMITS.lockdownPorts)
    throw invalid(`lockdown_ports: at most ${LIMITS.lockdownPorts} entries`);
  for (const p of values) if (p < 1 || p > 65535) throw invalid(`lockdown_ports: ${p} is not a TCP port`);
  return [...new Set(values)].sort((a, b) => a - b);
}

export function isCidr(v: string): boolean {
  const m = /^([^/]+)\/(\d{1,3})$/.exec(v);
  if (!m) return false;
  const family = isIP(m[1]!);
  const bits = Number(m[2]);
  return family !== 0 && bits <= (family === 4 ? 32 : 128);
}

export const tags = (field: string, values: string[]) =>
  list(field, values, LIMITS.tags, isTag, 'a tag (tag:NAME)');

export function duration(field: string, value: string, fallbackMs: number): number {
  if (!value) return fallbackMs;
  try {
    return parseDuration(value);
  } catch (err) {
    throw invalid(`${field}: ${(err as Error).message}`);
  }
}

export function key32(field: string, value: Uint8Array): Uint8Array {
  if (value.length !== 32) throw invalid(`${field} must be 32 bytes, got ${value.length}`);
  return value;
}
