// Starts and stops the coordinator: store, state, mapper, the gRPC servers
// (TLS on TCP, plaintext on the 0600 local admin socket), the HTTP listener
// and the lifecycle timers.
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, unlinkSync } from 'node:fs';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { join } from 'node:path';
import tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { parseDuration } from '../proto/duration.js';
import { AdminService } from '../proto/gen/meshgate/v1/admin_pb.js';
import { ControlService } from '../proto/gen/meshgate/v1/control_pb.js';
import { ReplicaService } from '../proto/gen/meshgate/v1/replica_pb.js';
import { serviceDefinition } from '../proto/grpc.js';
import { VERSION } from '../release/version.js';
import { adminHandlers } from './api/admin.js';
import { CallVerifier } from './api/auth.js';
import { controlImplementation } from './api/control.js';
import { adminImplementation } from './api/grpc-admin.js';
import { headscaleHandlers, headscaleService } from './api/headscale.js';
import { httpApp } from './api/http.js';
import { Metrics } from './api/metrics.js';
import { RateLimiter } from './api/ratelimit.js';
import { RelayHub } from './api/relay.js';
import { ReleaseDir } from './api/releases.js';
import { RelayForwarder, replicaImplementation } from './api/replica-relay.js';
import { AuthThrottle } from './api/throttle.js';
import type { CoordinatorConfig } from './config.js';
import { lockDataDir, prepareDataDir } from './datadir.js';
import type { Logger } from './log.js';
import { Mapper } from './mapper/mapper.js';
import { readSecretFile } from './secret-file.js';
import { changeBounds } from './state/changelog.js';
import { Replication } from './state/replication.js';
import { State } from './state/state.js';
import { openStore } from './store/db.js';
import { ensureTlsIdentity, loadTlsFiles } from './tls.js';

export interface Coordinator {
  fingerprint: string | null;
  grpcPort: number;
  httpPort: number;
  /** The Headscale API's port; null when it is off. */
  headscalePort: number | null;
  adminSocket: string;
  state: State;
  mapper: Mapper;
  metrics: Metrics;
  close(): Promise<void>;
}

const SERVER_OPTIONS: grpc.ServerOptions = {
  'grpc.max_receive_message_length': 4 * 1024 * 1024,
  'grpc.keepalive_time_ms': 60_000,
  'grpc.keepalive_timeout_ms': 20_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 10_000,
  // Channelz keeps trace and tracking objects per connection and call, which
  // nothing here reads: about 2 KiB of heap per connected agent.
  'grpc.enable_channelz': 0,
};

function splitHostPort(hp: string): { host: string; port: number } {
  const i = hp.lastIndexOf(':');
  return { host: hp.slice(0, i).replace(/^\[|\]$/g, '') || '0.0.0.0', port: Number(hp.slice(i + 1)) };
}

export class ListenError extends Error {
  override name = 'ListenError';
}

/** `flag` names the setting that picks the address, for the advice. */
function listenError(address: string, flag: string, reason: string): ListenError {
  const why = /EADDRINUSE/.test(reason)
    ? `the port is in use; stop what listens there or choose another with ${flag}`
    : /EACCES/.test(reason)
      ? `permission denied; ports below 1024 need root, or choose another with ${flag}`
      : /EADDRNOTAVAIL/.test(reason)
        ? `this host has no such address; choose another with ${flag}`
        : reason;
  return new ListenError(`cannot listen on ${address}: ${why}`);
}

function bind(
  server: grpc.Server,
  address: string,
  creds: grpc.ServerCredentials,
  flag: string,
): Promise<number> {
  // ":50443" means every address, as in Go's listeners; grpc-js wants a host.
  const target = address.startsWith(':') ? `0.0.0.0${address}` : address;
  return new Promise((resolve, reject) =>
    server.bindAsync(target, creds, (err, port) =>
      err ? reject(listenError(address, flag, err.message)) : resolve(port),
    ),
  );
}

/** Lets calls finish for a moment, then cuts what is left. */
function shutdown(server: grpc.Server, graceMs = 3000): Promise<void> {
  return new Promise((resolve) => {
    const force = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(force);
      resolve();
    });
  });
}

/**
 * grpc-js writes its own messages to stderr, outside the log's format. A failed bind is one of them, and
 * bind() already reports it in words a person can act on.
 */
function routeGrpcLogs(log: Logger): void {
  grpc.setLogger({
    error: (message: string) => {
      if (!message.startsWith('No address added')) log.warn({ grpc: message }, 'grpc');
    },
    info: (message: string) => log.debug({ grpc: message }, 'grpc'),
    debug: (message: string) => log.trace({ grpc: message }, 'grpc'),
  });
}

export async function startCoordinator(config: CoordinatorConfig, log: Logger): Promise<Coordinator> {
  process.umask(0o077);
  tls.DEFAULT_MIN_VERSION = 'TLSv1.3';
  prepareDataDir(config.dataDir);
  const lock = lockDataDir(config.dataDir);
  routeGrpcLogs(log);
  // What a failed start has to undo, newest first, so that the process can exit.
  const undo: (() => unknown)[] = [() => lock.release()];
  try {
    const c = await start(config, log, undo);
    return {
      ...c,
      async close() {
        try {
          await c.close();
        } finally {
          lock.release();
        }
      },
    };
  } catch (err) {
    for (const step of undo.reverse()) {
      try {
        await step();
      } catch {
        // The start error is the one worth reporting.
      }
    }
    throw err;
  }
}

async function start(config: CoordinatorConfig, log: Logger, undo: (() => unknown)[]): Promise<Coordinator> {
  const metricsToken = config.metricsTokenFile
    ? readSecretFile(config.metricsTokenFile, 'metrics token')
    : undefined;
  const headscaleTls = config.headscaleListen !== undefined && !config.headscaleInsecure;
  const identity =
    config.plaintext && !headscaleTls
      ? null
      : config.tlsKeyFile && config.tlsCertFile
        ? { ...loadTlsFiles(config.tlsKeyFile, config.tlsCertFile), created: false }
        : await ensureTlsIdentity(config.dataDir, config.serverNames);
  if (identity?.created)
    log.info({ fingerprint: identity.fingerprint }, 'created TLS key and self-signed certificate');

  const store = await openStore({
    url: config.database,
    key: config.databaseKeyFile ? readSecretFile(config.databaseKeyFile, 'database key') : undefined,
  });
  undo.push(() => store.close());
  // On PostgreSQL other coordinators may share the database (docs/ha.md).
  const replica = store.dialect === 'postgres' ? randomBytes(8).toString('hex') : undefined;
  const seenSeq = replica ? (await changeBounds(store.db)).last : 0;
  const state = await State.load(store.db, {
    ephemeralTimeoutMs: parseDuration(config.ephemeralTimeout),
    replica,
  });
  const replication = replica
    ? new Replication(
        store.db,
        state,
        { url: config.database, replica, log, address: config.replicaAddress },
        seenSeq,
      )
    : null;
  if (replication) {
    await replication.start();
    undo.push(() => replication.close());
  }
  const metrics = new Metrics({
    nodesOnline: () => state.onlineCount(),
    nodesTotal: () => state.listNodes().length,
    streams: () => mapper.sessionCount,
    unsentBytes: () => mapper.unsent,
    versionDrift: () => state.driftingNodes().length,
    apiKeyExpiries: async () =>
      (await state.keys.listApiKeys())
        .filter((k) => k.revokedAt === null)
        .map((k) => ({ id: k.id, expiresAt: k.expiresAt })),
  });
  const mapper = new Mapper(state, {
    coalesceMs: parseDuration(config.coalesceWindow),
    sliceMs: 20,
    fullNetmapBudget: 64 * 2 ** 20,
    deltaBudget: 64 * 2 ** 20,
    // A 2.7 MB netmap (10,000 peers) takes 22 s over 1 Mbit/s: two minutes leave room for slow links.
    stallMs: 120_000,
    presenceMs: parseDuration(config.presenceWindow),
    keepaliveMs: parseDuration(config.keepalive),
    keepaliveSeconds: config.wireguardKeepalive,
    relay: config.relay.enabled,
    domainSuffix: config.domain,
    onDelivered: (ms) => metrics.deltaLatency.observe(ms / 1000),
  });
  undo.push(() => mapper.close());
  const throttle = new AuthThrottle(config.authFailureRate, log, metrics);
  const databaseOk = () => store.ping();
  const releases = new ReleaseDir(config.releasesDir ?? null);
  const handlers = adminHandlers({ state, version: VERSION, databaseOk, releases });

  const relay = new RelayHub(
    state,
    { bytesPerSecond: config.relay.bytesPerSecond, burstBytes: config.relay.burstBytes },
    metrics,
  );
  undo.push(() => relay.close());
  const forwarder = replication ? new RelayForwarder(state, replication, identity?.fingerprint, log) : null;
  if (forwarder) {
    relay.forwarder = forwarder.forward;
    undo.push(() => forwarder.close());
  }
  const limiter = new RateLimiter(config.registrationRate.perSecond, config.registrationRate.burst);
  const server = new grpc.Server(SERVER_OPTIONS);
  undo.push(() => server.forceShutdown());
  server.addService(serviceDefinition(AdminService), adminImplementation(handlers, state, log, throttle));
  if (replication)
    server.addService(
      serviceDefinition(ReplicaService),
      replicaImplementation(relay, () => replication.secret(), throttle),
    );
  server.addService(
    serviceDefinition(ControlService),
    controlImplementation({
      state,
      mapper,
      relay,
      verifier: new CallVerifier(state, { clockSkewMs: parseDuration(config.clockSkew) }),
      limiter,
      throttle,
      metrics,
      log,
    }),
  );
  const tlsCreds = () =>
    identity
      ? grpc.ServerCredentials.createSsl(
          null,
          [{ private_key: identity.key, cert_chain: identity.cert }],
          false,
        )
      : grpc.ServerCredentials.createInsecure();
  const grpcPort = await bind(
    server,
    config.grpcListen,
    config.plaintext ? grpc.ServerCredentials.createInsecure() : tlsCreds(),
    '--grpc-listen',
  );

  let headscale: grpc.Server | null = null;
  let headscalePort: number | null = null;
  if (config.headscaleListen !== undefined) {
    headscale = new grpc.Server(SERVER_OPTIONS);
    const hsServer = headscale;
    undo.push(() => hsServer.forceShutdown());
    const hs = headscaleService(headscaleHandlers({ state, databaseOk }), state, log, throttle);
    headscale.addService(hs.definition, hs.implementation);
    headscalePort = await bind(
      headscale,
      config.headscaleListen,
      config.headscaleInsecure ? grpc.ServerCredentials.createInsecure() : tlsCreds(),
      '--headscale-listen',
    );
    if (config.headscaleInsecure)
      log.warn(
        { headscale: headscalePort },
        'Headscale API served in plaintext (h2c): API keys and auth keys cross the network unencrypted; keep it on a trusted network',
      );
  }

  const adminSocket = join(config.dataDir, 'admin.sock');
  if (existsSync(adminSocket)) unlinkSync(adminSocket);
  const local = new grpc.Server(SERVER_OPTIONS);
  undo.push(() => local.forceShutdown());
  local.addService(serviceDefinition(AdminService), adminImplementation(handlers, state, log, null));
  await bind(local, `unix://${adminSocket}`, grpc.ServerCredentials.createInsecure(), '--data-dir');
  undo.push(() => existsSync(adminSocket) && unlinkSync(adminSocket));
  chmodSync(adminSocket, 0o600);

  const app = httpApp({
    handlers,
    state,
    metrics,
    databaseOk,
    log,
    releases,
    limiter,
    metricsToken,
    throttle,
  });
  const http: HttpServer =
    !config.plaintext && identity
      ? createHttpsServer({ key: identity.key, cert: identity.cert, minVersion: 'TLSv1.3' }, app)
      : createHttpServer(app);
  const { host, port } = splitHostPort(config.httpListen);
  await new Promise<void>((resolve, reject) => {
    http.once('error', (err) => reject(listenError(config.httpListen, '--http-listen', err.message)));
    http.listen(port, host, resolve);
  });
  const httpPort = (http.address() as { port: number }).port;

  const warnWindow = parseDuration(config.apiKeyExpiryWarning);
  const warned = new Set<string>();
  const lifecycle = setInterval(
    async () => {
      try {
        // Every coordinator tells its own agents about expiries; what writes runs on one only.
        state.sweepExpiry();
        if (replication && !(await replication.holds('periodic'))) return;
        for (const id of (await replication?.reapDead()) ?? [])
          log.warn(
            { replica: id },
            'a coordinator stopped renewing its lease; its nodes are offline unless they reconnect elsewhere',
          );
        for (const n of await state.reapEphemeral())
          log.info({ node: n.id, name: n.name, project: n.project }, 'removed inactive ephemeral node');
        const now = Date.now();
        for (const k of await state.keys.listApiKeys()) {
          if (k.revokedAt === null && k.expiresAt - now < warnWindow && !warned.has(k.id)) {
            warned.add(k.id);
            log.warn(
              { apiKey: k.id, expiresAt: new Date(k.expiresAt).toISOString() },
              'API key expires soon; rotate it with "meshgate apikeys rotate"',
            );
          }
        }
      } catch (err) {
        log.error({ err }, 'lifecycle sweep failed');
      }
    },
    Math.min(10_000, Math.max(200, parseDuration(config.ephemeralTimeout) / 4)),
  );
  lifecycle.unref();

  log.info(
    {
      grpc: grpcPort,
      http: httpPort,
      headscale: headscalePort,
      adminSocket,
      fingerprint: identity?.fingerprint,
      plaintext: config.plaintext,
    },
    'coordinator started',
  );

  return {
    fingerprint: identity?.fingerprint ?? null,
    grpcPort,
    httpPort,
    headscalePort,
    adminSocket,
    state,
    mapper,
    metrics,
    async close() {
      clearInterval(lifecycle);
      mapper.close();
      forwarder?.close();
      relay.close();
      http.closeAllConnections();
      await Promise.all([
        shutdown(server),
        shutdown(local),
        ...(headscale ? [shutdown(headscale)] : []),
        new Promise<void>((r) => http.close(() => r())),
      ]);
      // After the servers: closing streams marks nodes offline, and that last_seen must reach the store too.
      try {
        await replication?.close();
        await state.close();
      } finally {
        await store.close();
      }
      if (existsSync(adminSocket)) unlinkSync(adminSocket);
    },
  };
}
