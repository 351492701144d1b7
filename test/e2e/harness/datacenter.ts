// The reference topology of DESIGN.md as network namespaces, shared by the end-to-end tests and
// `npm run demo`:
//
//   inet (router, "the internet")
//    ├─ coord   203.0.113.2      the coordinator
//    ├─ fw      198.51.100.2     data-center firewall; SNAT for the private network
//    │   └─ lan (switch) 10.20.0.0/24: fw 10.20.0.1, m1 10.20.0.11, m2 10.20.0.12 (no agent)
//    └─ nat     192.0.2.2        home router (masquerade)
//        └─ op  192.168.1.10     the operator's laptop
//
// inet routes only between the public /30s, so private addresses are unreachable from outside, as
// on the real internet. sshd (key-only) runs on fw and m1.
import type { AgentHandle, MeshLab } from './mesh.js';

export const TOOLS = ['ip', 'wg', 'wireguard-go', 'nft', 'ping', 'sysctl', 'ssh', 'ssh-keygen', 'ss', 'sshd'];

export const ADDR = {
  coord: '203.0.113.2',
  fwPublic: '198.51.100.2',
  fwPrivate: '10.20.0.1',
  m1: '10.20.0.11',
  m2: '10.20.0.12',
  natPublic: '192.0.2.2',
  op: '192.168.1.10',
} as const;

export const LAN = '10.20.0.0/24';

/** Builds the hosts and links, starts the coordinator on coord and sshd on fw and m1. */
export async function buildDataCenter(lab: MeshLab): Promise<void> {
  const topo = lab.topo;
  await topo.addHost('inet');
  await topo.enableForwarding('inet');

  await addPublicHost(lab, 'coord', '203.0.113.0');

  // The data center: the firewall's public side, and the private network behind it.
  const fwUp = await addPublicHost(lab, 'fw', '198.51.100.0');
  await topo.enableForwarding('fw');
  await topo.masquerade('fw', fwUp);
  await topo.addHost('lan');
  await topo.addBridge('lan');
  await topo.plug('lan', 'br0', 'fw', { addr: ADDR.fwPrivate, prefix: 24 });
  for (const m of ['m1', 'm2'] as const) {
    await topo.addHost(m);
    await topo.plug('lan', 'br0', m, { addr: ADDR[m], prefix: 24 });
    await topo.addRoute(m, 'default', { via: ADDR.fwPrivate });
  }

  await addHome(lab, { nat: 'nat', laptop: 'op', n: 0 });

  await lab.startCoordinator('coord', ADDR.coord);
  await Promise.all([lab.startSshd('fw'), lab.startSshd('m1')]);
}

/**
 * A host with a public address: a /30 to inet from `net` (a.b.c.N with N a multiple of 4), inet
 * at .N+1, the host at .N+2 with its default route through inet. Returns the host's uplink name.
 */
export async function addPublicHost(lab: MeshLab, host: string, net: string): Promise<string> {
  const topo = lab.topo;
  const parts = net.split('.');
  const base = Number(parts.pop());
  const prefix = parts.join('.');
  await topo.addHost(host);
  const veth = await topo.link('inet', host, {
    addrA: `${prefix}.${base + 1}`,
    addrB: `${prefix}.${base + 2}`,
    prefix: 30,
  });
  await topo.addRoute(host, 'default', { via: `${prefix}.${base + 1}` });
  return veth.ifB;
}

/**
 * A home network: router `nat` on 192.0.2.(4n+2) masquerading for `laptop` on 192.168.(n+1).10.
 * With randomFully the router rewrites source ports (like carrier-grade and some home NATs), so
 * a peer cannot predict the laptop's outside port.
 */
export async function addHome(
  lab: MeshLab,
  o: { nat: string; laptop: string; n: number; randomFully?: boolean },
): Promise<{ natPublic: string; laptop: string }> {
  const topo = lab.topo;
  const up = await addPublicHost(lab, o.nat, `192.0.2.${4 * o.n}`);
  await topo.enableForwarding(o.nat);
  await topo.masquerade(o.nat, up, { randomFully: o.randomFully });
  await topo.addHost(o.laptop);
  const home = `192.168.${o.n + 1}`;
  await topo.link(o.nat, o.laptop, { addrA: `${home}.1`, addrB: `${home}.10`, prefix: 24 });
  await topo.addRoute(o.laptop, 'default', { via: `${home}.1` });
  return { natPublic: `192.0.2.${4 * o.n + 2}`, laptop: `${home}.10` };
}

export interface DataCenterKeys {
  fw: string;
  m1: string;
  op: string;
}

/**
 * Auth keys made with `meshgate keys create` on the admin socket, one per machine as install.sh
 * gets them: single-use for fw (tag:firewall) and m1 (tag:machine), single-use and ephemeral for
 * the operator's laptop (tag:ops), as `meshgate vpn key --ephemeral` would hand out.
 */
export function dataCenterKeys(lab: MeshLab, project: string): DataCenterKeys {
  return {
    fw: lab.authKey(project, { tags: ['tag:firewall'] }),
    m1: lab.authKey(project, { tags: ['tag:machine'] }),
    op: lab.authKey(project, { ephemeral: true, tags: ['tag:ops'] }),
  };
}

/** Starts the agents: fw and m1 with --lockdown-ssh, op without. */
export function startDataCenterAgents(lab: MeshLab, keys: DataCenterKeys): AgentHandle[] {
  return [
    lab.startAgent('fw', 'fw', { keyFile: keys.fw, lockdown: true }),
    lab.startAgent('m1', 'm1', { keyFile: keys.m1, lockdown: true }),
    lab.startAgent('op', 'op', { keyFile: keys.op }),
  ];
}

/** Waits until every agent in `names` lists all the others as peers. */
export async function waitForFullMesh(lab: MeshLab, names: string[], timeoutMs = 30_000): Promise<void> {
  await Promise.all(
    names.flatMap((a) => names.filter((b) => b !== a).map((b) => lab.waitForPeer(a, b, true, timeoutMs))),
  );
}
