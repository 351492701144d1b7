// Keeps the agent registered and its sync stream open: registers (or
// re-registers, idempotently) and holds the stream, reconnecting with
// backoff and jitter whenever the coordinator goes away. Every netmap it
// receives is handed to `onNetMap`.
import { EventEmitter } from 'node:events';
import { create } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import {
  type SyncRequest,
  SyncRequestSchema,
  type SyncResponse,
  UpdateState,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import type { NetMap, Node } from '../../proto/gen/meshgate/v1/types_pb.js';
import { REASON_TRAILER } from '../../proto/grpc.js';
import { applySync } from '../../proto/netmap.js';
import { Backoff } from './backoff.js';
import type { ControlClient } from './client.js';

export class AgentError extends Error {
  override name = 'AgentError';
}

export type Revocation = 'expired' | 'deleted';

/** An admin expired or deleted this node, and the auth key at hand does not bring it back. */
export class RevokedError extends AgentError {
  constructor(
    readonly revocation: Revocation,
    message: string,
  ) {
    super(message);
  }
}

/** Waiting for a new auth key; the key file is watched, this is only the fallback. */
const REVOKED_RETRY_MS = 60_000;

export interface RegistrationInfo {
  authKey: () => string;
  nodePublic: Uint8Array;
  machinePublic: Uint8Array;
  hostname: string;
  os: string;
  version: string;
  requestedTags: string[];
  advertisedRoutes: string[];
  endpoints: () => string[];
  /** Told to the coordinator so that it can refuse a policy that would cut SSH to this node. */
  lockdownPorts: number[];
  /** A failed self-update, told again after every hello so a restarted coordinator knows it too. */
  updateFailure?: () => { version: string; reason: string } | null;
}

export type ConnectionState = 'connecting' | 'connected' | 'offline' | Revocation;

export interface SessionEvents {
  netmap: [NetMap];
  registered: [Node];
  state: [ConnectionState, string];
}

/** Refusals that waiting will not fix. */
const PERMANENT = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
]);

export class ControlSession extends EventEmitter<SessionEvents> {
  private stream: grpc.ClientDuplexStream<SyncRequest, SyncResponse> | null = null;
  private netmap: NetMap | null = null;
  private seq = 0n;
  private stopped = false;
  private timer: NodeJS.Timeout | null = null;
  private readonly backoff = new Backoff(500, 30_000);
  state: ConnectionState = 'connecting';
  lastError = '';

  constructor(
    private readonly client: ControlClient,
    private readonly info: RegistrationInfo,
    private haveIdentity: boolean,
  ) {
    super();
  }

  /**
   * Registers once; a permanent refusal on the very first registration (no
   * node yet) is thrown, so `meshgate agent` can say why and exit.
   */
  async start(): Promise<void> {
    try {
      await this.register();
    } catch (err) {
      const code = (err as grpc.ServiceError).code;
      if (!this.haveIdentity && (PERMANENT.has(code) || err instanceof AgentError)) {
        throw new AgentError(
          `registration refused: ${(err as grpc.ServiceError).details ?? (err as Error).message}`,
        );
      }
      this.fail(err);
      return;
    }
    this.openStream();
  }

  /** After a key rotation: later registrations present the new key. */
  setNodeKey(nodePublic: Uint8Array): void {
    this.info.nodePublic = nodePublic;
  }

  private registration(authKey: string) {
    return this.client.register({
      authKey,
      machineKey: this.info.machinePublic,
      nodeKey: this.info.nodePublic,
      hostname: this.info.hostname,
      os: this.info.os,
      version: this.info.version,
      requestedTags: this.info.requestedTags,
      endpoints: this.info.endpoints(),
      advertisedRoutes: this.info.advertisedRoutes,
    });
  }

  private async register(): Promise<void> {
    let res: Awaited<ReturnType<ControlClient['register']>>;
    try {
      res = await this.registration(this.haveIdentity ? '' : this.info.authKey());
    } catch (err) {
      const revocation = this.haveIdentity ? revocationOf(err) : null;
      if (!revocation) throw err;
      // A node deleted by an admin, or expired, needs an auth key again.
      let key: string;
      try {
        key = this.info.authKey();
      } catch (e) {
        throw new RevokedError(revocation, (e as Error).message);
      }
      try {
        res = await this.registration(key);
      } catch (e) {
        if (!PERMANENT.has((e as grpc.ServiceError).code)) throw e;
        throw new RevokedError(revocation, `auth key refused: ${(e as grpc.ServiceError).details}`);
      }
    }
    if (!res.node) throw new AgentError('coordinator answered registration without a node');
    this.haveIdentity = true;
    this.emit('registered', res.node);
  }

  /** Tries again at once, e.g. after a new auth key was written; only while revoked. */
  retryNow(): void {
    // Without a timer a registration is under way already.
    if (this.stopped || !this.timer || (this.state !== 'expired' && this.state !== 'deleted')) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.register()
      .then(() => this.openStream())
      .catch((err) => this.fail(err));
  }

  private setState(state: ConnectionState, detail = ''): void {
    this.state = state;
    this.lastError = detail;
    this.emit('state', state, detail);
  }

  private openStream(): void {
    if (this.stopped) return;
    this.setState('connecting');
    void this.client.sync().then(
      (stream) => {
        this.stream = stream;
        this.netmap = null;
        this.seq = 0n;
        stream.on('data', (msg: SyncResponse) => {
          try {
            const next = applySync(this.netmap, this.seq, msg);
            this.seq = msg.seq;
            if (next !== this.netmap && next) {
              this.netmap = next;
              if (this.state !== 'connected') {
                this.backoff.reset();
                this.setState('connected');
              }
              this.emit('netmap', next);
            }
          } catch (err) {
            stream.cancel();
            this.fail(err);
          }
        });
        stream.on('error', (err: grpc.ServiceError) => {
          if (err.code === grpc.status.CANCELLED && this.stopped) return;
          this.fail(err);
        });
        stream.on('end', () => this.fail(new AgentError('coordinator closed the stream')));
        stream.write(
          create(SyncRequestSchema, {
            message: {
              case: 'hello',
              value: {
                version: this.info.version,
                endpoints: this.info.endpoints(),
                lockdownPorts: this.info.lockdownPorts,
              },
            },
          }),
        );
        const failure = this.info.updateFailure?.();
        if (failure) this.sendUpdate(failure.version, 'failed', failure.reason);
      },
      (err) => this.fail(err),
    );
  }

  /** Tells the coordinator about changed local endpoints. */
  sendEndpoints(endpoints: string[]): void {
    this.stream?.write(create(SyncRequestSchema, { message: { case: 'endpoints', value: { endpoints } } }));
  }

  /** How a self-update goes (UpdateReport). Lost while the stream is down; failures are sent again. */
  sendUpdate(version: string, state: 'updating' | 'failed', reason: string): void {
    this.stream?.write(
      create(SyncRequestSchema, {
        message: {
          case: 'update',
          value: {
            version,
            state: state === 'failed' ? UpdateState.FAILED : UpdateState.UPDATING,
            reason,
          },
        },
      }),
    );
  }

  private fail(err: unknown): void {
    if (this.stopped || this.timer) return;
    this.stream = null;
    const e = err as grpc.ServiceError;
    const detail = e.details || e.message || String(err);
    const revoked = err instanceof RevokedError;
    if (revoked) {
      if (this.state !== err.revocation || this.lastError !== detail) this.setState(err.revocation, detail);
    } else if (e.code === grpc.status.UNAUTHENTICATED) {
      // The coordinator answered: it no longer knows this node as it was. Registering tells why.
      this.setState('connecting', detail);
    } else {
      this.setState('offline', detail);
      // Another coordinator of the same database may be up: the next attempt goes there.
      this.client.failover();
    }
    const delay = revoked ? REVOKED_RETRY_MS : this.backoff.next();
    this.timer = setTimeout(() => {
      this.timer = null;
      // The node may have been deleted or expired while we were away: register first (idempotent).
      this.register()
        .then(() => this.openStream())
        .catch((again) => this.fail(again));
    }, delay);
  }

  /** Leaves for good: the coordinator deletes the node. */
  async logout(): Promise<void> {
    await this.client.logout();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.stream?.cancel();
    this.stream = null;
    this.client.close();
  }
}

/** Whether a refused registration without auth key means the node was expired or deleted. */
function revocationOf(err: unknown): Revocation | null {
  const e = err as grpc.ServiceError;
  if (e.code !== grpc.status.UNAUTHENTICATED) return null;
  const reason = e.metadata?.get(REASON_TRAILER)[0];
  if (reason === 'node-expired') return 'expired';
  if (reason === 'node-unknown') return 'deleted';
  return null;
}
