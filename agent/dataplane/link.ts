// Brings the WireGuard interface's addresses, MTU and routes to the desired state through `ip`,
// changing only what differs so a restarted agent finds its interface as it left it.
import { cidrFamily, normalizeCidr, normalizeInterfaceAddress } from './cidr.js';
import { run } from './exec.js';
import { assertInterfaceName } from './ifname.js';

/** The whole mesh is routed through the interface; WireGuard's allowed IPs pick the peer. */
export const MESH_ROUTES = ['100.64.0.0/10', 'fd7a:115c:a1e0::/48'];
/** Fits inside the smallest path we expect (IPv6 minimum), so nothing depends on PMTU discovery. */
export const DEFAULT_MTU = 1280;

export interface LinkConfig {
  /** The node's own addresses, e.g. 100.64.0.1/32 and fd7a:115c:a1e0::1/128 (bare = host prefix). */
  addresses: string[];
  /** Routes besides MESH_ROUTES, e.g. approved subnet routes of peers. */
  routes?: string[];
  mtu?: number;
}

export interface LinkState {
  up: boolean;
  mtu: number;
  /** Global-scope addresses only: link-local ones belong to the kernel. */
  addresses: string[];
  /** Routes through the device in the main table, without the kernel's own. */
  routes: string[];
}

interface IpAddrJson {
  flags?: string[];
  mtu?: number;
  addr_info?: { family: string; local: string; prefixlen: number; scope: string }[];
}

interface IpRouteJson {
  dst: string;
  protocol?: string;
}

export async function readLink(name: string, netns?: string): Promise<LinkState> {
  assertInterfaceName(name);
  const [link] = JSON.parse(await run('ip', ['-j', 'addr', 'show', 'dev', name], { netns })) as IpAddrJson[];
  const routes: string[] = [];
  for (const family of ['-4', '-6'] as const) {
    const list = JSON.parse(
      await run('ip', [family, '-j', 'route', 'show', 'dev', name], { netns }),
    ) as IpRouteJson[];
    for (const r of list) {
      if (r.protocol === 'kernel') continue;
      const dst = r.dst === 'default' ? (family === '-4' ? '0.0.0.0/0' : '::/0') : r.dst;
      routes.push(normalizeCidr(dst));
    }
  }
  return {
    up: link?.flags?.includes('UP') ?? false,
    mtu: link?.mtu ?? 0,
    addresses: (link?.addr_info ?? [])
      .filter((a) => a.scope === 'global')
      .map((a) => normalizeInterfaceAddress(`${a.local}/${a.prefixlen}`)),
    routes,
  };
}

/** `ip` argv lists that turn `actual` into `desired`: stale entries go first, then missing ones. */
export function planLink(name: string, desired: LinkConfig, actual: LinkState): string[][] {
  const mtu = desired.mtu ?? DEFAULT_MTU;
  const addresses = new Set(desired.addresses.map(normalizeInterfaceAddress));
  const routes = new Set([...MESH_ROUTES, ...(desired.routes ?? [])].map(normalizeCidr));
  const have = { addresses: new Set(actual.addresses), routes: new Set(actual.routes) };
  const fam = (cidr: string) => (cidrFamily(cidr) === 6 ? '-6' : '-4');
  const cmds: string[][] = [];
  if (!actual.up || actual.mtu !== mtu) cmds.push(['link', 'set', 'dev', name, 'mtu', String(mtu), 'up']);
  for (const a of have.addresses) if (!addresses.has(a)) cmds.push([fam(a), 'addr', 'del', a, 'dev', name]);
  for (const r of have.routes) if (!routes.has(r)) cmds.push([fam(r), 'route', 'del', r, 'dev', name]);
  for (const a of addresses) {
    if (have.addresses.has(a)) continue;
    // Duplicate address detection would hold a mesh address back for a second; the mesh address
    // is unique by allocation and the link has no neighbours to ask.
    cmds.push(
      cidrFamily(a) === 6
        ? ['-6', 'addr', 'add', a, 'dev', name, 'nodad']
        : ['-4', 'addr', 'add', a, 'dev', name],
    );
  }
  // `replace` also takes over a route that points elsewhere: mesh prefixes belong to the mesh.
  for (const r of routes) if (!have.routes.has(r)) cmds.push([fam(r), 'route', 'replace', r, 'dev', name]);
  return cmds;
}

/** Applies `desired` and returns the `ip` commands it ran (none when nothing differed). */
export async function configureLink(name: string, desired: LinkConfig, netns?: string): Promise<string[][]> {
  const cmds = planLink(name, desired, await readLink(name, netns));
  for (const args of cmds) await run('ip', args, { netns });
  return cmds;
}
