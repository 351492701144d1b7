import { quote } from '../../proto/text.js';
import { type JsonPath, PolicyProblem } from './errors.js';
import type { PortRange } from './types.js';

export const LABEL_RULE = 'a DNS label: 1-63 lowercase letters, digits and hyphens, no hyphen at either end';

export function isLabel(text: string): boolean {
  return /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/.test(text);
}

/** Names from the policy appear in messages quoted, escaped and cut short. */
export { quote };

/**
 * Splits `selector:ports` at the last colon. IPv6 destinations must be bracketed (`[fd00::1]:22`):
 * without brackets `fd00::1:22` would be a valid address on its own and the split would guess.
 */
export function splitDestination(raw: string, path: JsonPath): { selector: string; ports: string } {
  if (raw.startsWith('[')) {
    const close = raw.indexOf(']');
    const selector = raw.slice(1, close);
    if (close < 0 || !selector.includes(':')) {
      throw new PolicyProblem(path, 'brackets are only for IPv6 destinations, e.g. "[fd7a:115c:a1e0::5]:22"');
    }
    if (raw[close + 1] !== ':') throw new PolicyProblem(path, `missing ports: write ${quote(`${raw}:22`)}`);
    return { selector, ports: raw.slice(close + 2) };
  }
  const colon = raw.lastIndexOf(':');
  const selector = raw.slice(0, colon);
  if (colon < 0 || selector === 'tag' || selector === 'group' || selector === 'autogroup') {
    throw new PolicyProblem(path, `missing ports: write ${quote(`${raw}:22`)} or ${quote(`${raw}:*`)}`);
  }
  if (selector.includes(':') && !/^(?:tag|group|autogroup):/.test(selector)) {
    throw new PolicyProblem(path, 'IPv6 destinations go in brackets, e.g. "[fd7a:115c:a1e0::5]:22"');
  }
  return { selector, ports: raw.slice(colon + 1) };
}

/** `*` (returned as no ranges), `22`, `80,443`, `1000-2000`, or a mix of the last three. */
export function parsePorts(text: string, path: JsonPath): PortRange[] {
  if (text === '*') return [];
  return mergePorts(
    text.split(',').map((part) => {
      const match = /^([1-9]\d{0,4})(?:-([1-9]\d{0,4}))?$/.exec(part);
      const first = Number(match?.[1]);
      const last = match?.[2] === undefined ? first : Number(match[2]);
      if (!match || last > 65535 || first > last) {
        throw new PolicyProblem(
          path,
          `bad port ${quote(part)}: write "*", 22, 80,443 or 1000-2000, with ports from 1 to 65535`,
        );
      }
      return { first, last };
    }),
  );
}

/** The port of a test destination, which names one port. */
export function parseTestPort(text: string, path: JsonPath): number {
  const port = /^[1-9]\d{0,4}$/.test(text) ? Number(text) : 0;
  if (port < 1 || port > 65535)
    throw new PolicyProblem(path, `a test names one port from 1 to 65535, not ${quote(text)}`);
  return port;
}

/** Sorted, with overlapping and adjacent ranges joined. */
export function mergePorts(ranges: readonly PortRange[]): PortRange[] {
  const merged: PortRange[] = [];
  for (const range of [...ranges].sort((a, b) => a.first - b.first)) {
    const last = merged.at(-1);
    if (last && range.first <= last.last + 1) last.last = Math.max(last.last, range.last);
    else merged.push({ ...range });
  }
  return merged;
}
