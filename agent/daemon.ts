// The node daemon: keeps WireGuard and nftables in line with the netmap the
// coordinator sends, from the cached netmap while the coordinator is away.
import { readFileSync } from 'node:fs';
import { hostname as osHostname } from 'node:os';
import { timestampDate } from '@bufbuild/protobuf/wkt';
import type { Logger } from 'pino';
import type { NetMap, Node, Peer } from '../proto/gen/meshgate/v1/types_pb.js';
import { Protocol } from '../proto/gen/meshgate/v1/types_pb.js';
import { encodeWgKey } from '../proto/keys.js';
import { ControlClient } from './control/client.js';
import {
  defaultListenPort,
  endpointOnLocalNetwork,
  formatEndpoint,
  type LocalAddress,
  localAddresses,
  orderCandidates,
  PathSelector,
  RELAY,
} from './control/endpoints.js';
import { StateDir } from './control/identity.js';
import { ControlSession } from './control/session.js';
import type { Backend } from './dataplane/backend.js';
import type { DesiredPeer } from './dataplane/reconcile.js';
import { WireGuardDevice } from './dataplane/wireguard.js';
import { applyFirewall, removeFirewall } from './firewall/nftables.js';
import type { FilterRule, PortForward } from './firewall/render.js';
import { type LocalApi, startLocalApi } from './localapi/server.js';
import type { AgentStatus, PeerStatus } from './localapi/types.js';
import { RelayConnection } from './relay/connection.js';
import { RelayProxies } from './relay/proxy.js';

export const AGENT_VERSION = '0.1.0';

export interface AgentOptions {
  coordinator: string;
  fingerprint?: string;
  /** Read lazily: only a machine without identity needs it. */
  authKey: () => string;
  hostname?: string;
  stateDir: string;
  interfaceName: string;
  listenPort?: number;
  backend: Backend;
  lockdownPorts: number[];
  advertiseTags: string[];
  advertiseRoutes: string[];
  socket: string;
  log: Logger;
  /** How often local endpoints and peer paths are re-checked. */
  tickMs?: number;
}

const PROTOCOL_NAMES: Record<number, FilterRule['protocols'][number]> = {
  [Protocol.TCP]: 'tcp',
  [Protocol.UDP]: 'udp',
  [Protocol.ICMP]: 'icmp',
};

/** Path state belongs to one peer and one key: a new node key starts over. */
const pathKey = (p: Peer) => `${p.id}:${p.nodeKey}`;

export class Agent {
  private device!: WireGuardDevice;
  private session!: ControlSession;
  private api!: LocalApi;
  private readonly state: StateDir;
  private netmap: NetMap | null = null;
  private self: Node | null = null;
  private listenPort = 0;
  private nodePublic = '';
  private readonly paths = new PathSelector();
  private relay!: RelayConnection;
  private proxies!: RelayProxies;
  private applying: Promise<void> = Promise.resolve();
  private pendingApply = false;
  private firewallKey = '';
  private lastEndpoints = '';
  private ticker: NodeJS.Timeout | null = null;
  private saveTimer: NodeJS.Timeout | null = null;
  private stopped = false;
  private onStopped: (() => void) | null = null;

  constructor(private readonly opts: AgentOptions) {
    this.state = new StateDir(opts.stateDir);
  }

  async start(): Promise<void> {
    const { log } = this.opts;
    const identity = this.state.load();
    this.nodePublic = encodeWgKey(identity.nodePublic);
    this.listenPort = this.opts.listenPort ?? defaultListenPort(identity.machine.publicKey);
    this.device = await WireGuardDevice.create({
      name: this.opts.interfaceName,
      backend: this.opts.backend,
      stateDir: this.opts.stateDir,
      endpointPolicy: 'force',
      onEvent: (e) => log.warn({ event: e.kind }, 'wireguard backend event'),
    });
    log.info(
      { interface: this.opts.interfaceName, backend: this.device.backend, listenPort: this.listenPort },
      'interface ready',
    );
    this.api = await startLocalApi(this.opts.socket, {
      status: () => this.status(),
      down: () => this.down(),
    });
    const cached = this.state.loadNetMap((message) => log.warn(message));
    if (cached) {
      log.info({ peers: cached.peers.length }, 'restoring peers from the cached netmap');
      this.onNetMap(cached, false);
    }
    const client = new ControlClient({
      url: this.opts.coordinator,
      fingerprint: this.opts.fingerprint,
      machineSecretKey: identity.machine.secretKey,
    });
    this.relay = new RelayConnection(client);
    this.proxies = new RelayProxies(this.relay, () => this.listenPort);
    this.proxies.allowed = (id) => this.netmap?.peers.some((p) => p.id === id) ?? false;
    this.proxies.on('probe', (id) => {
      const peer = this.netmap?.peers.find((p) => p.id === id);
      if (!peer) return;
      this.paths.probeRequested(pathKey(peer));
      this.scheduleApply();
    });
    this.session = new ControlSession(
      client,
      {
        authKey: this.opts.authKey,
        nodePublic: identity.nodePublic,
        machinePublic: identity.machine.publicKey,
        hostname: this.opts.hostname ?? osHostname(),
        os: process.platform,
        version: AGENT_VERSION,
        requestedTags: this.opts.advertiseTags,
        advertisedRoutes: this.opts.advertiseRoutes,
        endpoints: () => this.localEndpoints(),
      },
      identity.node !== null,
    );
    this.session.on('registered', (node) => {
      this.self = node;
      client.nodeId = node.id;
      this.state.saveNode({
        id: node.id,
        name: node.name,
        project: node.project,
        ipAddresses: node.ipAddresses,
      });
      log.info(
        { node: node.id, name: node.name, project: node.project, ips: node.ipAddresses },
        'registered',
      );
    });
    this.session.on('netmap', (map) => {
      if (map.relay?.enabled) this.relay.start();
      this.onNetMap(map, true);
    });
    this.session.on('state', (s, detail) => {
      if (s === 'offline')
        log.warn({ reason: detail }, 'coordinator unreachable; mesh keeps running from the last netmap');
      else log.info({ state: s }, 'control connection');
    });
    if (identity.node) client.nodeId = identity.node.id;
    await this.session.start();
    this.ticker = setInterval(() => this.tick(), this.opts.tickMs ?? 2000);
  }

  /** Resolves when the agent was stopped by `down` or `stop`. */
  wait(): Promise<void> {
    return this.stopped ? Promise.resolve() : new Promise((r) => (this.onStopped = r));
  }

  private localEndpoints(): string[] {
    return localAddresses(this.opts.interfaceName).map((a) => formatEndpoint(a.address, this.listenPort));
  }

  private onNetMap(map: NetMap, fresh: boolean): void {
    this.netmap = map;
    if (map.self) this.self = map.self;
    if (fresh) {
      if (this.saveTimer) clearTimeout(this.saveTimer);
      this.saveTimer = setTimeout(() => this.state.saveNetMap(map), 500);
    }
    this.scheduleApply();
  }

  private scheduleApply(): void {
    if (this.pendingApply) return;
    this.pendingApply = true;
    this.applying = this.applying.then(async () => {
      this.pendingApply = false;
      if (this.stopped || !this.netmap) return;
      try {
        await this.apply(this.netmap);
      } catch (err) {
        this.opts.log.error({ err: (err as Error).message }, 'could not apply the netmap');
      }
    });
  }

  private async apply(map: NetMap): Promise<void> {
    const self = map.self;
    if (!self) return;
    const routes = map.peers.flatMap((p) =>
      p.allowedIps.filter((a) => !p.ipAddresses.some((ip) => a.startsWith(`${ip}/`))),
    );
    await this.device.configureLink({ addresses: self.ipAddresses, routes });
    const actual = await this.device.show();
    const byKey = new Map(actual.peers.map((p) => [p.publicKey, p]));
    const locals = localAddresses(this.opts.interfaceName);
    const relay = map.relay?.enabled === true;
    this.proxies.retain(new Set(map.peers.map((p) => p.id)));
    this.paths.retain(new Set(map.peers.map(pathKey)));
    const peers: DesiredPeer[] = [];
    const probing = new Set<string>();
    for (const p of map.peers) {
      const now = byKey.get(p.nodeKey);
      const choice = this.paths.choose(pathKey(p), {
        candidates: orderCandidates(p.endpoints, locals),
        actual: now?.endpoint ?? null,
        lastHandshakeMs: (now?.latestHandshake ?? 0) * 1000,
        rxBytes: now?.rxBytes ?? 0,
        relayAvailable: relay && p.relay,
        relayEndpoint: this.proxies.endpointOf(p.id),
      });
      if (choice.probeStarted) {
        probing.add(p.nodeKey);
        if (choice.probeStarted.announce) this.proxies.askProbe(p.id);
      }
      peers.push({
        publicKey: p.nodeKey,
        allowedIps: p.allowedIps,
        endpoint: choice.endpoint === RELAY ? await this.proxies.ensure(p.id) : choice.endpoint,
        persistentKeepalive: choice.keepalive ?? (map.keepaliveSeconds || undefined),
      });
    }
    if (probing.size) {
      // Keepalive off first: switching it back on makes WireGuard send one at once.
      const off = peers.map((d) => (probing.has(d.publicKey) ? { ...d, persistentKeepalive: undefined } : d));
      await this.device.apply({
        privateKeyFile: this.state.nodeKeyFile,
        listenPort: this.listenPort,
        peers: off,
      });
    }
    const result = await this.device.apply({
      privateKeyFile: this.state.nodeKeyFile,
      listenPort: this.listenPort,
      peers,
    });
    if (result.commands) this.opts.log.debug({ ops: result.ops.length }, 'wireguard updated');
    await this.applyFirewall(map, this.portForwards(map, locals));
  }

  /**
   * On a node that routes a private network (a data-center firewall doing
   * SNAT for its machines): forward each such peer's WireGuard port from
   * this node's addresses, where the coordinator saw the peer come from, so
   * peers outside reach it directly instead of racing the NAT.
   */
  private portForwards(map: NetMap, locals: LocalAddress[]): PortForward[] {
    let forwarding = false;
    try {
      forwarding = readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8').trim() === '1';
    } catch {
      return [];
    }
    if (!forwarding) return [];
    const byPort = new Map<number, string>();
    for (const p of [...map.peers].sort((a, b) => a.id.localeCompare(b.id))) {
      const local = endpointOnLocalNetwork(p.endpoints, locals);
      if (
        !local ||
        local[1] === this.listenPort ||
        locals.some((l) => l.address === local[0]) ||
        byPort.has(local[1])
      )
        continue;
      byPort.set(local[1], local[0]);
    }
    return [...byPort].map(([port, to]) => ({ port, to }));
  }

  private async applyFirewall(map: NetMap, portForwards: PortForward[]): Promise<void> {
    const filter: FilterRule[] = (map.packetFilter?.rules ?? []).map((r) => ({
      srcCidrs: r.srcCidrs,
      dstCidrs: r.dstCidrs.length ? r.dstCidrs : ['0.0.0.0/0', '::/0'],
      ports: r.ports.map((p) => ({ first: p.first, last: p.last })),
      protocols: r.protocols.map((p) => PROTOCOL_NAMES[p]!).filter(Boolean),
    }));
    const spec = {
      meshInterface: this.opts.interfaceName,
      filter,
      lockdownPorts: this.opts.lockdownPorts,
      portForwards,
    };
    const key = JSON.stringify(spec);
    if (key === this.firewallKey) return;
    await applyFirewall(spec);
    if (!this.firewallKey && spec.lockdownPorts.length)
      this.opts.log.info({ ports: spec.lockdownPorts }, 'mesh is up: public SSH locked down');
    this.firewallKey = key;
  }

  private tick(): void {
    const eps = this.localEndpoints();
    const key = eps.join();
    if (key !== this.lastEndpoints) {
      if (this.lastEndpoints) this.session.sendEndpoints(eps);
      this.lastEndpoints = key;
    }
    if (this.netmap?.peers.length) this.scheduleApply();
  }

  async status(): Promise<AgentStatus> {
    const map = this.netmap;
    const actual = await this.device.show().catch(() => null);
    const byKey = new Map((actual?.peers ?? []).map((p) => [p.publicKey, p]));
    const peers: PeerStatus[] = (map?.peers ?? []).map((p) => {
      const wg = byKey.get(p.nodeKey);
      return {
        id: p.id,
        name: p.name,
        ipAddresses: p.ipAddresses,
        tags: p.tags,
        online: p.online,
        endpoint: wg?.endpoint ?? '',
        lastHandshake: wg?.latestHandshake ? new Date(wg.latestHandshake * 1000).toISOString() : '',
        rxBytes: wg?.rxBytes ?? 0,
        txBytes: wg?.txBytes ?? 0,
        version: p.version,
        lastSeen: p.lastSeen ? timestampDate(p.lastSeen).toISOString() : '',
        path: !wg?.endpoint
          ? ''
          : this.paths.probing(pathKey(p))
            ? 'probing'
            : wg.endpoint === this.proxies.endpointOf(p.id)
              ? 'relay'
              : 'direct',
      };
    });
    return {
      self: {
        id: this.self?.id ?? '',
        name: this.self?.name ?? '',
        project: this.self?.project ?? '',
        ipAddresses: this.self?.ipAddresses ?? [],
        tags: this.self?.tags ?? [],
        ephemeral: this.self?.ephemeral ?? false,
        nodeKey: this.nodePublic,
      },
      version: AGENT_VERSION,
      desiredVersion: map?.desiredVersion ?? '',
      coordinator: {
        url: this.opts.coordinator,
        state: this.session?.state ?? 'connecting',
        error: this.session?.lastError ?? '',
      },
      interface: { name: this.opts.interfaceName, backend: this.device.backend, listenPort: this.listenPort },
      lockdownPorts: this.firewallKey ? this.opts.lockdownPorts : [],
      peers,
    };
  }

  /** `meshgate down`: log out (ephemeral nodes are deleted at once), remove firewall and interface. */
  async down(): Promise<void> {
    try {
      await this.session.logout();
    } catch (err) {
      this.opts.log.warn(
        { err: (err as Error).message },
        'logout failed; the coordinator will time the node out',
      );
    }
    await removeFirewall();
    this.firewallKey = '';
    await this.stop();
  }

  /** Stops the daemon. The firewall stays, so a restart does not reopen public SSH. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.ticker) clearInterval(this.ticker);
    if (this.saveTimer) {
      clearTimeout(this.saveTimer);
      if (this.netmap) this.state.saveNetMap(this.netmap);
    }
    this.relay?.stop();
    this.proxies?.close();
    this.session?.stop();
    await this.applying.catch(() => {});
    await this.device?.destroy();
    await this.api?.close();
    this.onStopped?.();
  }
}
