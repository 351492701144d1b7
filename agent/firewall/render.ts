// Renders the agent's nftables table as one script. The script first makes sure the table exists,
// deletes it and defines it anew, so `nft -f` swaps old for new rules in a single transaction: there
// is no moment with the table half built or the lockdown missing.
//
// Why the chain can be `policy accept` and still enforce: each base chain on a hook sees the packet,
// and a drop in any of them is final, while an accept only ends that one chain. So this table can
// only take traffic away; it never opens what the host's own firewall closes. Its priority (filter
// - 10) runs it just before host chains at the usual `filter`, so mesh drops are counted here first.
import { cidrFamily, InvalidCidrError, normalizeCidr } from '../dataplane/cidr.js';
import { assertInterfaceName, InvalidInterfaceNameError } from '../dataplane/ifname.js';

export type Protocol = 'tcp' | 'udp' | 'icmp';

export interface PortRange {
  first: number;
  last: number;
}

export interface FilterRule {
  /** A rule with no source or no destination of an address family matches nothing of that family. */
  srcCidrs: string[];
  dstCidrs: string[];
  /** Empty = all ports. Ignored for ICMP. */
  ports: PortRange[];
  /** Empty = tcp, udp and icmp. ICMP means echo requests; replies and errors pass as related. */
  protocols: Protocol[];
}

export interface FirewallSpec {
  meshInterface: string;
  filter: FilterRule[];
  /** TCP ports dropped on every interface except lo and the mesh interface; [] = no lockdown. */
  lockdownPorts: number[];
  /**
   * On a node that routes for a private network: WireGuard ports of peers on
   * that network, forwarded from this node's own addresses, so peers outside
   * reach them without punching through this node's NAT.
   */
  portForwards?: PortForward[];
}

export interface PortForward {
  /** UDP port, the same outside and inside. */
  port: number;
  /** IPv4 address of the peer on the private network. */
  to: string;
}

const TABLE = 'inet meshgate';

export class InvalidFirewallSpecError extends Error {
  constructor(message: string) {
    super(`invalid firewall spec: ${message}`);
    this.name = 'InvalidFirewallSpecError';
  }
}

const PROTOCOLS: readonly Protocol[] = ['tcp', 'udp', 'icmp'];

export function renderFirewall(spec: FirewallSpec): string {
  const mesh = meshInterface(spec.meshInterface);
  const lockdown = [...new Set(spec.lockdownPorts.map((p) => port(p, 'lockdown port')))];
  const rules: string[] = [];
  if (lockdown.length > 0) rules.push(`iifname != { "lo", ${mesh} } tcp dport ${set(lockdown)} drop`);
  rules.push(`iifname ${mesh} ct state established,related accept`);
  rules.push(`iifname ${mesh} ct state invalid drop`);
  spec.filter.forEach((rule, i) => {
    for (const line of renderRule(rule, i + 1)) rules.push(`iifname ${mesh} ${line}`);
  });
  rules.push(`iifname ${mesh} drop`);
  return [
    `table ${TABLE} {}`,
    `delete table ${TABLE}`,
    `table ${TABLE} {`,
    '  chain input {',
    '    type filter hook input priority filter - 10; policy accept;',
    ...rules.map((r) => `    ${r}`),
    '  }',
    ...renderForwards(spec.portForwards ?? []),
    '}',
    '',
  ].join('\n');
}

function renderForwards(forwards: PortForward[]): string[] {
  if (forwards.length === 0) return [];
  const seen = new Set<number>();
  const lines: string[] = [];
  for (const f of forwards) {
    const p = port(f.port, 'forwarded port');
    if (seen.has(p)) throw new InvalidFirewallSpecError(`port ${p} is forwarded twice`);
    seen.add(p);
    let to: string;
    try {
      to = normalizeCidr(f.to);
    } catch (e) {
      if (e instanceof InvalidCidrError)
        throw new InvalidFirewallSpecError(`forward of port ${p}: ${e.message}`);
      throw e;
    }
    if (cidrFamily(to) !== 4 || !to.endsWith('/32')) {
      throw new InvalidFirewallSpecError(`forward of port ${p}: ${f.to} is not an IPv4 address`);
    }
    // Only datagrams addressed to this host itself, not ones passing through.
    lines.push(`    fib daddr type local udp dport ${p} dnat ip to ${to.slice(0, -3)}:${p}`);
  }
  return [
    '  chain prerouting {',
    '    type nat hook prerouting priority dstnat; policy accept;',
    ...lines,
    '  }',
  ];
}

/** Deletes the table if it exists; creating it first makes the delete succeed either way. */
export function renderRemoval(): string {
  return `table ${TABLE} {}\ndelete table ${TABLE}\n`;
}

function renderRule(rule: FilterRule, n: number): string[] {
  const protocols = rule.protocols.length === 0 ? PROTOCOLS : rule.protocols;
  for (const p of protocols) {
    if (!PROTOCOLS.includes(p))
      throw new InvalidFirewallSpecError(`filter rule ${n}: unknown protocol ${String(p)}`);
  }
  const ports = rule.ports.map((r) => {
    const first = port(r.first, `filter rule ${n} port`);
    const last = port(r.last, `filter rule ${n} port`);
    if (first > last)
      throw new InvalidFirewallSpecError(`filter rule ${n}: port range ${first}-${last} is reversed`);
    return first === last ? String(first) : `${first}-${last}`;
  });
  const src = cidrs(rule.srcCidrs, n);
  const dst = cidrs(rule.dstCidrs, n);
  const l4 = protocols.filter((p) => p !== 'icmp');
  const lines: string[] = [];
  for (const family of [4, 6] as const) {
    const s = src.filter((c) => cidrFamily(c) === family);
    const d = dst.filter((c) => cidrFamily(c) === family);
    if (s.length === 0 || d.length === 0) continue;
    const ip = family === 4 ? 'ip' : 'ip6';
    const match = `${ip} saddr ${set(s)} ${ip} daddr ${set(d)}`;
    if (l4.length > 0) {
      const dport = ports.length > 0 ? ` th dport ${set(ports)}` : '';
      lines.push(`${match} meta l4proto ${set(l4)}${dport} accept`);
    }
    if (protocols.includes('icmp')) {
      lines.push(`${match} ${family === 4 ? 'icmp' : 'icmpv6'} type echo-request accept`);
    }
  }
  return lines;
}

function meshInterface(name: string): string {
  try {
    return `"${assertInterfaceName(name)}"`;
  } catch (e) {
    if (e instanceof InvalidInterfaceNameError) throw new InvalidFirewallSpecError(e.message);
    throw e;
  }
}

function cidrs(list: string[], n: number): string[] {
  try {
    return [...new Set(list.map(normalizeCidr))];
  } catch (e) {
    if (e instanceof InvalidCidrError) throw new InvalidFirewallSpecError(`filter rule ${n}: ${e.message}`);
    throw e;
  }
}

function port(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 1 || value > 65535) {
    throw new InvalidFirewallSpecError(`${what} ${String(value)} is not 1..65535`);
  }
  return value;
}

function set(items: readonly (string | number)[]): string {
  return `{ ${items.join(', ')} }`;
}
