// Starts and stops the coordinator: store, state, mapper, the gRPC servers
// (TLS on TCP, plaintext on the 0600 local admin socket), the HTTP listener
// and the lifecycle timers.
import { chmodSync, existsSync, mkdirSync, statSync, unlinkSync } from 'node:fs';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { join } from 'node:path';
import tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { parseDuration } from '../proto/duration.js';
import { AdminService } from '../proto/gen/meshgate/v1/admin_pb.js';
import { ControlService } from '../proto/gen/meshgate/v1/control_pb.js';
import { serviceDefinition } from '../proto/grpc.js';
import { adminHandlers } from './api/admin.js';
import { CallVerifier } from './api/auth.js';
import { controlImplementation } from './api/control.js';
import { adminImplementation } from './api/grpc-admin.js';
import { httpApp } from './api/http.js';
import { Metrics } from './api/metrics.js';
import { RateLimiter } from './api/ratelimit.js';
import { RelayHub } from './api/relay.js';
import { AuthThrottle } from './api/throttle.js';
import type { CoordinatorConfig } from './config.js';
import type { Logger } from './log.js';
import { Mapper } from './mapper/mapper.js';
import { State } from './state/state.js';
import { openStore } from './store/db.js';
import { ensureTlsIdentity } from './tls.js';

export const VERSION = '0.1.0';

export interface Coordinator {
  fingerprint: string | null;
  grpcPort: number;
  httpPort: number;
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
};

function splitHostPort(hp: string): { host: string; port: number } {
  const i = hp.lastIndexOf(':');
  return { host: hp.slice(0, i).replace(/^\[|\]$/g, '') || '0.0.0.0', port: Number(hp.slice(i + 1)) };
}

function bind(server: grpc.Server, address: string, creds: grpc.ServerCredentials): Promise<number> {
  return new Promise((resolve, reject) =>
    server.bindAsync(address, creds, (err, port) =>
      err ? reject(new Error(`cannot listen on ${address}: ${err.message}`)) : resolve(port),
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

/** Refuses a data dir that others can read: it holds the TLS key and the database. */
function prepareDataDir(dir: string): void {
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const f of [dir, join(dir, 'tls.key'), join(dir, 'meshgate.db')]) {
    if (existsSync(f) && (statSync(f).mode & 0o077) !== 0) {
      throw new Error(`${f} is accessible by group or others; run: chmod go-rwx ${f}`);
    }
  }
}

export async function startCoordinator(config: CoordinatorConfig, log: Logger): Promise<Coordinator> {
  process.umask(0o077);
  tls.DEFAULT_MIN_VERSION = 'TLSv1.3';
  prepareDataDir(config.dataDir);
  const identity = config.plaintext ? null : await ensureTlsIdentity(config.dataDir, config.serverNames);
  if (identity?.created)
    log.info({ fingerprint: identity.fingerprint }, 'created TLS key and self-signed certificate');

  const store = await openStore({ url: config.database });
  const state = await State.load(store.db, { ephemeralTimeoutMs: parseDuration(config.ephemeralTimeout) });
  const metrics = new Metrics({
    nodesOnline: () => state.onlineCount(),
    nodesTotal: () => state.listNodes().length,
    streams: () => mapper.sessionCount,
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
    presenceMs: parseDuration(config.presenceWindow),
    keepaliveMs: parseDuration(config.keepalive),
    keepaliveSeconds: config.wireguardKeepalive,
    relay: config.relay.enabled,
    domainSuffix: config.domain,
    onDelivered: (ms) => metrics.deltaLatency.observe(ms / 1000),
  });
  const throttle = new AuthThrottle(config.authFailureRate, log, metrics);
  const databaseOk = () => store.ping();
  const handlers = adminHandlers({ state, version: VERSION, databaseOk });

  const relay = new RelayHub(
    state,
    { bytesPerSecond: config.relay.bytesPerSecond, burstBytes: config.relay.burstBytes },
    metrics,
  );
  const server = new grpc.Server(SERVER_OPTIONS);
  server.addService(serviceDefinition(AdminService), adminImplementation(handlers, state, log, throttle));
  server.addService(
    serviceDefinition(ControlService),
    controlImplementation({
      state,
      mapper,
      relay,
      verifier: new CallVerifier(state, { clockSkewMs: parseDuration(config.clockSkew) }),
      limiter: new RateLimiter(config.registrationRate.perSecond, config.registrationRate.burst),
      throttle,
      metrics,
      log,
    }),
  );
  const creds = identity
    ? grpc.ServerCredentials.createSsl(
        null,
        [{ private_key: identity.key, cert_chain: identity.cert }],
        false,
      )
    : grpc.ServerCredentials.createInsecure();
  const grpcPort = await bind(server, config.grpcListen, creds);

  const adminSocket = join(config.dataDir, 'admin.sock');
  if (existsSync(adminSocket)) unlinkSync(adminSocket);
  const local = new grpc.Server(SERVER_OPTIONS);
  local.addService(serviceDefinition(AdminService), adminImplementation(handlers, state, log, null));
  await bind(local, `unix://${adminSocket}`, grpc.ServerCredentials.createInsecure());
  chmodSync(adminSocket, 0o600);

  const app = httpApp({ handlers, state, metrics, databaseOk, log, throttle });
  const http: HttpServer = identity
    ? createHttpsServer({ key: identity.key, cert: identity.cert, minVersion: 'TLSv1.3' }, app)
    : createHttpServer(app);
  const { host, port } = splitHostPort(config.httpListen);
  await new Promise<void>((resolve, reject) => {
    http.once('error', (err) => reject(new Error(`cannot listen on ${config.httpListen}: ${err.message}`)));
    http.listen(port, host, resolve);
  });
  const httpPort = (http.address() as { port: number }).port;

  const warnWindow = parseDuration(config.apiKeyExpiryWarning);
  const warned = new Set<string>();
  const lifecycle = setInterval(
    async () => {
      try {
        for (const n of await state.reapEphemeral())
          log.info({ node: n.id, name: n.name, project: n.project }, 'removed inactive ephemeral node');
        state.sweepExpiry();
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
    adminSocket,
    state,
    mapper,
    metrics,
    async close() {
      clearInterval(lifecycle);
      mapper.close();
      relay.close();
      http.closeAllConnections();
      await Promise.all([shutdown(server), shutdown(local), new Promise<void>((r) => http.close(() => r()))]);
      // After the servers: closing streams marks nodes offline, and that last_seen must reach the store too.
      try {
        await state.close();
      } finally {
        await store.close();
      }
      if (existsSync(adminSocket)) unlinkSync(adminSocket);
    },
  };
}
