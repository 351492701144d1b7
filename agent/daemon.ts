// The node daemon: keeps WireGuard and nftables in line with the netmap the
// coordinator sends, from the cached netmap while the coordinator is away.
import { readFileSync, unwatchFile, watchFile } from 'node:fs';
import { isIPv4 } from 'node:net';
import { hostname as osHostname } from 'node:os';
import { timestampDate } from '@bufbuild/protobuf/wkt';
import type { Logger } from 'pino';
import type { NetMap, Node, Peer } from '../proto/gen/meshgate/v1/types_pb.js';
import { Protocol } from '../proto/gen/meshgate/v1/types_pb.js';
import { decodeWgKey, encodeWgKey, generateNodeKey, nodePublicKey } from '../proto/keys.js';
import { VERSION } from '../release/version.js';
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
import { DEFAULT_NODE_KEY_LIFETIME_MS, type KeyPair, NodeKeyRotator } from './control/key-rotation.js';
import { describeNodeState, type NodeState, type NodeStateKind } from './control/node-state.js';
import { AgentError, type ConnectionState, ControlSession } from './control/session.js';
import type { Backend } from './dataplane/backend.js';
import type { DesiredPeer } from './dataplane/reconcile.js';
import { WireGuardDevice } from './dataplane/wireguard.js';
import { registerWithResolved, resolvedRunning } from './dns/resolved.js';
import { MeshDns, type NameTable } from './dns/server.js';
import { FirewallGuard } from './firewall/guard.js';
import type { FilterRule, FirewallSpec, PortForward } from './firewall/render.js';
import type { Operator } from './localapi/operator.js';
import { type LocalApi, startLocalApi } from './localapi/server.js';
import type { AgentStatus, PeerStatus } from './localapi/types.js';
import { RelayConnection } from './relay/connection.js';
import { RelayProxies } from './relay/proxy.js';
import { SelfUpdater } from './update/updater.js';

export interface AgentOptions {
  coordinator: string;
  fingerprint?: string;
  /** Read lazily: only a machine without identity needs it. */
  authKey: () => string;
  /** Where the auth key comes from: watched, so a new key is used without a restart. */
  authKeyFile?: string;
  /** While expired, deleted or down: keep the lockdown (fail closed) or release it. */
  lockdownWhenRevoked?: 'keep' | 'release';
  hostname?: string;
  stateDir: string;
  interfaceName: string;
  listenPort?: number;
  backend: Backend;
  lockdownPorts: number[];
  advertiseTags: string[];
  advertiseRoutes: string[];
  socket: string;
  /** A non-root user or group that may read the status through a socket of its own. */
  operator?: Operator;
  log: Logger;
  /** How often local endpoints and peer paths are re-checked. */
  tickMs?: number;
  /** Rotate the WireGuard node key when it is this old; 0 turns rotation off. */
  nodeKeyLifetimeMs?: number;
  /** --auto-update: install the desired release and restart into it. */
  autoUpdate?: {
    prefix: string;
    releaseKey: string;
    releasesUrl: string;
    timeoutMs: number;
  };
}

/** Why the agent stopped: a plain stop, or an exit to restart into another release. */
export type StopReason = 'stopped' | 'restart';

const PROTOCOL_NAMES: Record<number, FilterRule['protocols'][number]> = {
  [Protocol.TCP]: 'tcp',
  [Protocol.UDP]: 'udp',
  [Protocol.ICMP]: 'icmp',
};

/** Path state belongs to one peer and one key: a new node key starts over. */
const pathKey = (p: Peer) => `${p.id}:${p.nodeKey}`;

export class Agent {
  private device: WireGuardDevice | null = null;
  private session: ControlSession | null = null;
  private rotator: NodeKeyRotator | null = null;
  private keyRotations = 0;
  private api!: LocalApi;
  private readonly state: StateDir;
  private readonly guard: FirewallGuard;
  private netmap: NetMap | null = null;
  private self: Node | null = null;
  private listenPort = 0;
  private nodePublic = '';
  private backend = '';
  private readonly paths = new PathSelector();
  private relay: RelayConnection | null = null;
  private proxies: RelayProxies | null = null;
  private applying: Promise<void> = Promise.resolve();
  private pendingApply = false;
  /** The lockdown is released while the node is revoked (--lockdown-when-revoked release). */
  private released = false;
  private lastEndpoints = '';
  private ticker: NodeJS.Timeout | null = null;
  private saveTimer: NodeJS.Timeout | null = null;
  private nodeState: NodeState = { kind: 'not-joined', detail: '' };
  private nodeStateLogged = false;
  private names: NameTable = { domain: '', records: new Map() };
  private readonly dns: MeshDns;
  /** Interface, server and domain last registered with systemd-resolved. */
  private resolvedKey = '';
  private interfaceRestores = 0;
  private lastInterfaceRestore: Date | null = null;
  /** Serializes down, up and logout. */
  private lifecycle: Promise<unknown> = Promise.resolve();
  private stopped = false;
  private stopReason: StopReason = 'stopped';
  private onStopped: ((reason: StopReason) => void) | null = null;
  private readonly updater: SelfUpdater | null;

  constructor(private readonly opts: AgentOptions) {
    this.state = new StateDir(opts.stateDir);
    this.dns = new MeshDns(
      () => this.names,
      (err) => opts.log.warn({ err: err.message }, 'mesh DNS responder'),
    );
    this.guard = new FirewallGuard({
      onRestore: (what) =>
        opts.log.warn(
          { table: 'inet meshgate', was: what, restores: this.guard.restores },
          `the nftables table was ${what === 'missing' ? 'removed' : 'changed'} by someone else; restored it`,
        ),
      onError: (err) => opts.log.error({ err: err.message }, 'could not check the nftables table'),
    });
    const u = opts.autoUpdate;
    this.updater = u
      ? new SelfUpdater({
          version: VERSION,
          prefix: u.prefix,
          releaseKey: u.releaseKey,
          releasesUrl: u.releasesUrl,
          fingerprint: opts.fingerprint,
          stateDir: opts.stateDir,
          timeoutMs: u.timeoutMs,
          log: opts.log,
          report: (version, state, reason) => this.session?.sendUpdate(version, state, reason),
          restart: () => this.restartForUpdate(),
        })
      : null;
  }

  private get keepLockdown(): boolean {
    return (this.opts.lockdownWhenRevoked ?? 'keep') === 'keep';
  }

  async start(): Promise<void> {
    const { log } = this.opts;
    // Fails early on a state dir or key readable by others.
    this.state.load();
    this.updater?.started();
    this.guard.start();
    this.api = await startLocalApi(
      this.opts.socket,
      {
        status: () => this.status(),
        down: () => this.serialLifecycle(() => this.down()),
        up: () => this.serialLifecycle(() => this.up()),
        logout: () => this.serialLifecycle(() => this.logout()),
        metrics: () => this.metrics(),
      },
      this.opts.operator,
    );
    if (this.opts.authKeyFile) {
      let seen = 0;
      watchFile(this.opts.authKeyFile, { interval: 1000 }, (cur) => {
        if (cur.mtimeMs === seen) return;
        seen = cur.mtimeMs;
        if (cur.mtimeMs === 0) return;
        if (this.session && (this.nodeState.kind === 'expired' || this.nodeState.kind === 'deleted')) {
          log.info({ file: this.opts.authKeyFile }, 'auth key file changed; registering with the new key');
          this.session.retryNow();
        }
      });
    }
    if (this.state.isDown) {
      // After logout there is no node to guard a lockdown for.
      const loggedOut = this.state.load().node === null;
      if (loggedOut) await this.guard.remove();
      else await this.holdDown();
      this.setNodeState({ kind: 'down', detail: loggedOut ? 'logged out' : '' });
      return;
    }
    await this.startMesh();
  }

  private serialLifecycle(fn: () => Promise<void>): Promise<void> {
    const next = this.lifecycle.catch(() => {}).then(fn);
    this.lifecycle = next;
    return next;
  }

  private setNodeState(next: NodeState): void {
    const same = next.kind === this.nodeState.kind && next.detail === this.nodeState.detail;
    this.nodeState = next;
    if (same && this.nodeStateLogged) return;
    this.nodeStateLogged = true;
    const line = this.describeState();
    const warn: NodeStateKind[] = ['unreachable', 'expired', 'deleted'];
    if (warn.includes(next.kind)) this.opts.log.warn({ state: next.kind }, line);
    else this.opts.log.info({ state: next.kind }, line);
  }

  private describeState(): string {
    return describeNodeState(this.nodeState, {
      keyFile: this.opts.authKeyFile,
      keepLockdown: this.keepLockdown,
      lockdown: this.opts.lockdownPorts.length > 0,
    });
  }

  private async startMesh(): Promise<void> {
    const { log } = this.opts;
    const identity = this.state.load();
    this.nodePublic = encodeWgKey(identity.nodePublic);
    this.listenPort = this.opts.listenPort ?? defaultListenPort(identity.machine.publicKey);
    this.device = await WireGuardDevice.create({
      name: this.opts.interfaceName,
      backend: this.opts.backend,
      stateDir: this.opts.stateDir,
      endpointPolicy: 'force',
      onEvent: (e) => {
        if (e.kind === 'restarted') this.countInterfaceRestore();
        else log.warn({ event: e.kind }, 'wireguard backend event');
      },
    });
    this.backend = this.device.backend;
    log.info(
      { interface: this.opts.interfaceName, backend: this.device.backend, listenPort: this.listenPort },
      'interface ready',
    );
    this.setNodeState({ kind: identity.node ? 'connecting' : 'not-joined', detail: '' });
    const cached = identity.node ? this.state.loadNetMap((message) => log.warn(message)) : null;
    if (cached) {
      log.info({ peers: cached.peers.length }, 'restoring peers from the cached netmap');
      this.onNetMap(cached, false);
    }
    const client = new ControlClient({
      url: this.opts.coordinator,
      fingerprint: this.opts.fingerprint,
      machineSecretKey: identity.machine.secretKey,
    });
    const relay = new RelayConnection(client);
    const proxies = new RelayProxies(relay, () => this.listenPort);
    this.relay = relay;
    this.proxies = proxies;
    proxies.allowed = (id) => this.netmap?.peers.some((p) => p.id === id) ?? false;
    proxies.on('probe', (id) => {
      const peer = this.netmap?.peers.find((p) => p.id === id);
      if (!peer) return;
      this.paths.probeRequested(pathKey(peer));
      this.scheduleApply();
    });
    const session = new ControlSession(
      client,
      {
        authKey: this.opts.authKey,
        nodePublic: identity.nodePublic,
        machinePublic: identity.machine.publicKey,
        hostname: this.opts.hostname ?? osHostname(),
        os: process.platform,
        version: VERSION,
        requestedTags: this.opts.advertiseTags,
        advertisedRoutes: this.opts.advertiseRoutes,
        endpoints: () => this.localEndpoints(),
        lockdownPorts: this.opts.lockdownPorts,
        updateFailure: () => this.updater?.failure() ?? null,
      },
      identity.node !== null,
    );
    this.session = session;
    session.on('registered', (node) => {
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
    session.on('netmap', (map) => {
      if (map.relay?.enabled) relay.start();
      this.reconcileNodeKey(map, client);
      if (map.self?.keyExpired && !this.rotator?.rotating) {
        const off = this.opts.nodeKeyLifetimeMs === 0;
        log.warn(
          { nodeKey: map.self.nodeKey },
          `the node key is older than the project's maximum key age, so peers do not see this node; ${
            off ? 'rotation is off (--node-key-lifetime)' : 'rotating it now'
          }`,
        );
        this.rotator?.rotateNow();
      }
      this.onNetMap(map, true);
      this.updater?.consider(map.desiredRelease);
    });
    session.on('state', (s, detail) => this.onSessionState(s, detail));
    if (identity.node) client.nodeId = identity.node.id;
    try {
      await session.start();
    } catch (err) {
      // The first registration was refused: say what to do, then the agent exits.
      if (!(err instanceof AgentError)) throw err;
      const fix = this.opts.authKeyFile
        ? `write a new auth key to ${this.opts.authKeyFile} and start the agent again`
        : 'start the agent again with a new auth key';
      throw new AgentError(`${err.message}; ${fix}`);
    }
    this.ticker = setInterval(() => void this.tick(), this.opts.tickMs ?? 2000);
    this.startKeyRotation(client, session);
  }

  /** Rotates the node key on schedule; see control/key-rotation.ts for why the steps come in this order. */
  private startKeyRotation(client: ControlClient, session: ControlSession): void {
    const { log } = this.opts;
    const lifetimeMs = this.opts.nodeKeyLifetimeMs ?? DEFAULT_NODE_KEY_LIFETIME_MS;
    this.rotator = new NodeKeyRotator({
      lifetimeMs,
      createdAt: () => this.state.nodeKeyCreatedAt(),
      ready: () => session.state === 'connected',
      steps: {
        generate: () => {
          const secret = generateNodeKey().secretKey;
          return { secret, public: nodePublicKey(secret) };
        },
        accept: async (pub) => {
          await client.rotateNodeKey(pub);
        },
        save: (secret) => this.state.saveNodeKey(secret),
        use: (pair: KeyPair) => {
          this.nodePublic = encodeWgKey(pair.public);
          session.setNodeKey(pair.public);
          return this.scheduleApply();
        },
      },
      onRotated: (pair) => {
        this.keyRotations++;
        log.info({ nodeKey: encodeWgKey(pair.public), rotations: this.keyRotations }, 'rotated the node key');
      },
      onFailed: (err) =>
        log.warn(
          { err: err.message },
          'could not rotate the node key; keeping the current one, trying again later',
        ),
    });
    this.rotator.start();
  }

  /**
   * The coordinator holds another key than node.key (a reconnect's registration raced a
   * rotation): send ours again, or peers would keep using a key this interface does not have.
   */
  private reconcileNodeKey(map: NetMap, client: ControlClient): void {
    const theirs = map.self?.nodeKey;
    if (!theirs || !this.nodePublic || theirs === this.nodePublic || this.rotator?.rotating) return;
    const ours = this.nodePublic;
    this.opts.log.warn(
      { coordinator: theirs, local: ours },
      'the coordinator has another node key; sending ours',
    );
    client
      .rotateNodeKey(decodeWgKey(ours))
      .catch((err: Error) =>
        this.opts.log.warn({ err: err.message }, 'could not send the node key to the coordinator'),
      );
  }

  private onSessionState(s: ConnectionState, detail: string): void {
    const kind: NodeStateKind = s === 'offline' ? 'unreachable' : s;
    if (kind === 'connected') this.updater?.connected();
    if (kind === 'connecting' && !this.self) return;
    this.setNodeState({ kind, detail: kind === 'connecting' || kind === 'connected' ? '' : detail });
    if ((kind === 'expired' || kind === 'deleted') && !this.keepLockdown && !this.released) {
      this.released = true;
      void this.guard
        .remove()
        .catch((err: Error) => this.opts.log.error({ err: err.message }, 'could not release the lockdown'));
    } else if (kind === 'connected' && this.released) {
      this.released = false;
      this.scheduleApply();
    }
  }

  private countInterfaceRestore(): void {
    this.interfaceRestores++;
    this.lastInterfaceRestore = new Date();
    this.opts.log.warn(
      { interface: this.opts.interfaceName, restores: this.interfaceRestores },
      'the WireGuard interface was gone (deleted, or its process died); recreated it and applied the peers again',
    );
  }

  /** Resolves when the agent was stopped (SIGTERM), or stopped to restart into another release. */
  wait(): Promise<StopReason> {
    return this.stopped ? Promise.resolve(this.stopReason) : new Promise((r) => (this.onStopped = r));
  }

  private localEndpoints(): string[] {
    return localAddresses(this.opts.interfaceName).map((a) => formatEndpoint(a.address, this.listenPort));
  }

  private onNetMap(map: NetMap, fresh: boolean): void {
    if (map.dns !== this.netmap?.dns || map.domain !== this.names.domain) {
      const records = new Map<string, string[]>();
      for (const r of map.dns) records.set(r.name.toLowerCase().replace(/\.$/, ''), r.ipAddresses);
      this.names = { domain: map.domain.replace(/\.$/, ''), records };
    }
    this.netmap = map;
    if (map.self) this.self = map.self;
    if (fresh) {
      if (this.saveTimer) clearTimeout(this.saveTimer);
      this.saveTimer = setTimeout(() => this.state.saveNetMap(map), 500);
    }
    this.scheduleApply();
  }

  private scheduleApply(): Promise<void> {
    if (this.pendingApply) return this.applying;
    this.pendingApply = true;
    this.applying = this.applying.then(async () => {
      this.pendingApply = false;
      if (this.stopped || !this.netmap || !this.device) return;
      try {
        await this.apply(this.netmap, this.device, this.proxies!);
      } catch (err) {
        this.opts.log.error({ err: (err as Error).message }, 'could not apply the netmap');
      }
    });
    return this.applying;
  }

  private async apply(map: NetMap, device: WireGuardDevice, proxies: RelayProxies): Promise<void> {
    const self = map.self;
    if (!self) return;
    const routes = map.peers.flatMap((p) =>
      p.allowedIps.filter((a) => !p.ipAddresses.some((ip) => a.startsWith(`${ip}/`))),
    );
    await device.configureLink({ addresses: self.ipAddresses, routes });
    await this.serveNames(self.ipAddresses);
    const actual = await device.show();
    const byKey = new Map(actual.peers.map((p) => [p.publicKey, p]));
    const locals = localAddresses(this.opts.interfaceName);
    const relay = map.relay?.enabled === true;
    proxies.retain(new Set(map.peers.map((p) => p.id)));
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
        relayEndpoint: proxies.endpointOf(p.id),
      });
      if (choice.probeStarted) {
        probing.add(p.nodeKey);
        if (choice.probeStarted.announce) proxies.askProbe(p.id);
      }
      peers.push({
        publicKey: p.nodeKey,
        allowedIps: p.allowedIps,
        endpoint: choice.endpoint === RELAY ? await proxies.ensure(p.id) : choice.endpoint,
        persistentKeepalive: choice.keepalive ?? (map.keepaliveSeconds || undefined),
      });
    }
    if (probing.size) {
      // Keepalive off first: switching it back on makes WireGuard send one at once.
      const off = peers.map((d) => (probing.has(d.publicKey) ? { ...d, persistentKeepalive: undefined } : d));
      await device.apply({
        privateKeyFile: this.state.nodeKeyFile,
        listenPort: this.listenPort,
        peers: off,
      });
    }
    const result = await device.apply({
      privateKeyFile: this.state.nodeKeyFile,
      listenPort: this.listenPort,
      peers,
    });
    if (result.commands) this.opts.log.debug({ ops: result.ops.length }, 'wireguard updated');
    await this.applyFirewall(map, this.portForwards(map, locals));
  }

  /** The mesh DNS responder on this node's mesh IPv4, registered with systemd-resolved where it runs. */
  private async serveNames(addresses: string[]): Promise<void> {
    const v4 = addresses.map((a) => a.replace(/\/\d+$/, '')).find((a) => isIPv4(a));
    if (!v4 || !this.names.domain) return;
    try {
      if (this.dns.address !== v4) {
        await this.dns.listen(v4);
        this.opts.log.info({ address: v4, domain: this.names.domain }, 'answering DNS for the mesh');
      }
      const key = `${this.opts.interfaceName} ${v4} ${this.names.domain}`;
      if (key !== this.resolvedKey && resolvedRunning()) {
        await registerWithResolved(this.opts.interfaceName, v4, this.names.domain);
        this.opts.log.info({ domain: this.names.domain }, 'registered the mesh domain with systemd-resolved');
        this.resolvedKey = key;
      }
    } catch (err) {
      this.opts.log.warn({ err: (err as Error).message }, 'mesh names: cannot serve DNS');
    }
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
    if (this.released) return;
    const filter: FilterRule[] = (map.packetFilter?.rules ?? []).map((r) => ({
      srcCidrs: r.srcCidrs,
      dstCidrs: r.dstCidrs.length ? r.dstCidrs : ['0.0.0.0/0', '::/0'],
      ports: r.ports.map((p) => ({ first: p.first, last: p.last })),
      protocols: r.protocols.map((p) => PROTOCOL_NAMES[p]!).filter(Boolean),
    }));
    const spec: FirewallSpec = {
      meshInterface: this.opts.interfaceName,
      filter,
      lockdownPorts: this.opts.lockdownPorts,
      portForwards,
    };
    const before = this.guard.spec;
    if (JSON.stringify(spec) === JSON.stringify(before)) return;
    await this.guard.apply(spec);
    if (!before?.lockdownPorts.length && spec.lockdownPorts.length)
      this.opts.log.info({ ports: spec.lockdownPorts }, 'mesh is up: public SSH locked down');
  }

  private async tick(): Promise<void> {
    const eps = this.localEndpoints();
    const key = eps.join();
    if (key !== this.lastEndpoints) {
      if (this.lastEndpoints) this.session?.sendEndpoints(eps);
      this.lastEndpoints = key;
    }
    try {
      if (await this.device?.ensure()) this.countInterfaceRestore();
    } catch (err) {
      this.opts.log.error({ err: (err as Error).message }, 'could not recreate the WireGuard interface');
    }
    if (this.netmap?.peers.length) this.scheduleApply();
  }

  async status(): Promise<AgentStatus> {
    const map = this.device ? this.netmap : null;
    const actual = await this.device?.show().catch(() => null);
    const byKey = new Map((actual?.peers ?? []).map((p) => [p.publicKey, p]));
    const proxies = this.proxies;
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
            : wg.endpoint === proxies?.endpointOf(p.id)
              ? 'relay'
              : 'direct',
      };
    });
    const firewall = await this.guard.inspect().catch(() => 'missing' as const);
    const spec = this.guard.spec;
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
      version: VERSION,
      desiredVersion: map?.desiredVersion ?? '',
      desiredRelease: map?.desiredRelease
        ? {
            version: map.desiredRelease.version,
            artifactUrl: map.desiredRelease.artifactUrl,
            sha256: map.desiredRelease.sha256,
            manifest: map.desiredRelease.manifest,
            allowDowngrade: map.desiredRelease.allowDowngrade,
          }
        : null,
      selfUpdate: { enabled: this.updater !== null, failed: this.updater?.failure() ?? null },
      state: { kind: this.nodeState.kind, detail: this.nodeState.detail, message: this.describeState() },
      coordinator: {
        url: this.opts.coordinator,
        state: this.session?.state ?? 'stopped',
        error: this.session?.lastError ?? '',
      },
      interface: {
        name: this.opts.interfaceName,
        backend: this.device ? this.backend : '',
        listenPort: this.device ? this.listenPort : 0,
        present: actual !== null && actual !== undefined,
        restores: this.interfaceRestores,
        lastRestore: this.lastInterfaceRestore?.toISOString() ?? '',
      },
      // What the kernel holds, not what was last applied.
      lockdownPorts: firewall === 'as-applied' ? (spec?.lockdownPorts ?? []) : [],
      firewall: {
        kernel: firewall,
        configuredPorts: this.opts.lockdownPorts,
        restores: this.guard.restores,
        lastRestore: this.guard.lastRestore?.toISOString() ?? '',
      },
      dns: { address: this.dns.address, domain: this.names.domain, resolved: this.resolvedKey !== '' },
      peers,
    };
  }

  /** Prometheus text for the local API's /metrics. */
  private metrics(): string {
    const lines = [
      '# HELP meshgate_agent_firewall_restores_total Times the nftables table was found removed or changed and restored.',
      '# TYPE meshgate_agent_firewall_restores_total counter',
      `meshgate_agent_firewall_restores_total ${this.guard.restores}`,
      '# HELP meshgate_agent_interface_restores_total Times the WireGuard interface was found removed and recreated.',
      '# TYPE meshgate_agent_interface_restores_total counter',
      `meshgate_agent_interface_restores_total ${this.interfaceRestores}`,
      '# HELP meshgate_agent_node_state The node state (1 for the current one).',
      '# TYPE meshgate_agent_node_state gauge',
      `meshgate_agent_node_state{state="${this.nodeState.kind}"} 1`,
      '# HELP meshgate_agent_node_key_rotations_total Node keys rotated since the agent started.',
      '# TYPE meshgate_agent_node_key_rotations_total counter',
      `meshgate_agent_node_key_rotations_total ${this.keyRotations}`,
    ];
    return `${lines.join('\n')}\n`;
  }

  /** Down or logged out: the lockdown alone, kept (and guarded) or released as configured. */
  private async holdDown(): Promise<void> {
    if (this.keepLockdown && this.opts.lockdownPorts.length) {
      await this.guard.apply({
        meshInterface: this.opts.interfaceName,
        filter: [],
        lockdownPorts: this.opts.lockdownPorts,
      });
    } else await this.guard.remove();
  }

  /** `meshgate down`: stop the mesh, stay idle, also across restarts, until `meshgate up`. */
  private async down(): Promise<void> {
    this.state.setDown(true);
    await this.stopMesh();
    await this.holdDown();
    this.setNodeState({ kind: 'down', detail: '' });
  }

  /** `meshgate up`: the mesh again, from the cached netmap and the coordinator. */
  private async up(): Promise<void> {
    if (this.device) return;
    this.state.setDown(false);
    // A lockdown kept while down stays until the mesh's own replaces it:
    // removing it first opened public SSH until the first netmap, or for as
    // long as the coordinator did not answer.
    try {
      await this.startMesh();
    } catch (err) {
      await this.stopMesh();
      this.state.setDown(true);
      await this.holdDown();
      this.setNodeState({ kind: 'down', detail: '' });
      throw err;
    }
  }

  /** `meshgate logout`: the coordinator deletes the node; this machine forgets its identity and stays down. */
  private async logout(): Promise<void> {
    const identity = this.state.load();
    if (this.session) await this.session.logout();
    else if (identity.node) {
      // Down: no session, so one call with the stored identity.
      const client = new ControlClient({
        url: this.opts.coordinator,
        fingerprint: this.opts.fingerprint,
        machineSecretKey: identity.machine.secretKey,
      });
      client.nodeId = identity.node.id;
      try {
        await client.logout();
      } finally {
        client.close();
      }
    }
    this.state.setDown(true);
    await this.stopMesh();
    await this.guard.remove();
    this.state.forget();
    this.self = null;
    this.netmap = null;
    this.nodePublic = '';
    this.setNodeState({ kind: 'down', detail: 'logged out' });
  }

  /**
   * Stops the mesh. With `keepInterface` (a stop, not down or logout) a kernel interface stays
   * with its peers, so sessions over the mesh survive an agent restart or upgrade.
   */
  private async stopMesh(keepInterface: false | 'release' | 'detach' = false): Promise<void> {
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = null;
    await this.rotator?.stop();
    this.rotator = null;
    if (this.saveTimer) {
      clearTimeout(this.saveTimer);
      this.saveTimer = null;
      if (this.netmap) this.state.saveNetMap(this.netmap);
    }
    this.relay?.stop();
    this.proxies?.close();
    this.session?.stop();
    this.relay = this.proxies = this.session = null;
    await this.applying.catch(() => {});
    this.dns.close();
    this.resolvedKey = '';
    this.released = false;
    const device = this.device;
    this.device = null;
    if (keepInterface === 'detach') await device?.detach();
    else if (keepInterface) await device?.release();
    else await device?.destroy();
    this.lastEndpoints = '';
  }

  /**
   * Stops the daemon (SIGTERM). The firewall table stays, so a restart does not reopen public
   * SSH; a kernel interface stays with its peers, so the mesh keeps working until the agent is back.
   */
  async stop(): Promise<void> {
    await this.shutdown('stopped');
  }

  /**
   * Stops to restart into another release (self-update, or its rollback): also a wireguard-go
   * interface stays, its process detached, so the next agent adopts it with its peers and
   * traffic over the mesh goes on while no agent runs.
   */
  async restartForUpdate(): Promise<void> {
    await this.shutdown('restart');
  }

  private async shutdown(reason: StopReason): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.stopReason = reason;
    if (this.opts.authKeyFile) unwatchFile(this.opts.authKeyFile);
    this.guard.stop();
    await this.lifecycle.catch(() => {});
    await this.stopMesh(reason === 'restart' ? 'detach' : 'release');
    await this.api?.close();
    this.onStopped?.(reason);
  }
}
