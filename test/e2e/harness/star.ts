// The smallest routed topology: a router `net` with one /30 per host in
// 203.0.113.0/24 and a default route through it.
import type { Topology } from './netns.js';

/** Returns each host's address. */
export async function star(topo: Topology, hosts: string[]): Promise<Record<string, string>> {
  await topo.addHost('net');
  await topo.enableForwarding('net');
  const addrs: Record<string, string> = {};
  for (const [i, h] of hosts.entries()) {
    await topo.addHost(h);
    const base = 4 * i;
    await topo.link('net', h, { addrA: `203.0.113.${base + 1}`, addrB: `203.0.113.${base + 2}`, prefix: 30 });
    await topo.addRoute(h, 'default', { via: `203.0.113.${base + 1}` });
    addrs[h] = `203.0.113.${base + 2}`;
  }
  return addrs;
}
