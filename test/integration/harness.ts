// An in-process coordinator on loopback and simulated agents with real
// keys and signatures, for the integration tests and the benchmarks.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { ControlClient } from '../../agent/control/client.js';
import { type AdminClient, connectAdmin } from '../../cli/admin-client.js';
import { type CoordinatorConfig, loadConfig } from '../../coordinator/config.js';
import { type Coordinator, startCoordinator } from '../../coordinator/server.js';
import {
  type SyncRequest,
  SyncRequestSchema,
  type SyncResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import type { NetMap } from '../../proto/gen/meshgate/v1/types_pb.js';
import { generateMachineKey, generateNodeKey, type MachineKeyPair } from '../../proto/keys.js';
import { applySync } from '../../proto/netmap.js';

export interface TestCoordinator {
  c: Coordinator;
  dataDir: string;
  url: string;
  fingerprint: string;
  admin: AdminClient;
  logs: string[];
  config: CoordinatorConfig;
  close(): Promise<void>;
}

export async function startTestCoordinator(
  overrides: Record<string, unknown> = {},
): Promise<TestCoordinator> {
  const dataDir = (overrides.dataDir as string | undefined) ?? mkdtempSync(join(tmpdir(), 'meshgate-it-'));
  const config = loadConfig(
    undefined,
    {},
    {
      dataDir,
      grpcListen: '127.0.0.1:0',
      httpListen: '127.0.0.1:0',
      logLevel: 'debug',
      coalesceWindow: '10ms',
      registrationRate: { perSecond: 1000, burst: 1000 },
      ...overrides,
    },
  );
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      logs.push(String(chunk));
      cb();
    },
  });
  const c = await startCoordinator(config, pino({ level: 'debug' }, sink) as never);
  const admin = await connectAdmin({ socket: c.adminSocket, output: 'json' });
  return {
    c,
    dataDir,
    url: config.plaintext ? `grpc://127.0.0.1:${c.grpcPort}` : `grpcs://127.0.0.1:${c.grpcPort}`,
    fingerprint: c.fingerprint ?? '',
    admin,
    logs,
    config,
    async close() {
      admin.close();
      await c.close();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** Creates a project (if needed) and an auth key in it. */
export async function authKey(
  t: TestCoordinator,
  project: string,
  opts: { reusable?: boolean; ephemeral?: boolean; tags?: string[]; expiration?: string } = {},
): Promise<string> {
  try {
    await t.admin.call('createProject', { name: project });
  } catch (err) {
    if ((err as grpc.ServiceError).code !== 6) throw err;
  }
  const r = await t.admin.call('createAuthKey', {
    project,
    reusable: opts.reusable ?? false,
    ephemeral: opts.ephemeral ?? false,
    tags: opts.tags ?? [],
    expiration: opts.expiration ?? '1h',
  });
  return r.authKey!.key;
}

/** An agent without a data plane: registers, holds the stream, keeps the netmap. */
export class SimAgent {
  readonly machine: MachineKeyPair;
  readonly nodeKey = generateNodeKey();
  readonly client: ControlClient;
  netmap: NetMap | null = null;
  /** The agent version it reports. */
  version = '0.1.0';
  seq = 0n;
  messages: SyncResponse[] = [];
  stream: grpc.ClientDuplexStream<SyncRequest, SyncResponse> | null = null;
  ended: grpc.StatusObject | Error | null = null;
  private waiters: (() => void)[] = [];

  constructor(
    readonly url: string,
    readonly fingerprint: string,
    machine?: MachineKeyPair,
    channelOptions: grpc.ChannelOptions = {},
  ) {
    this.machine = machine ?? generateMachineKey();
    this.client = new ControlClient({
      url,
      fingerprint,
      machineSecretKey: this.machine.secretKey,
      channelOptions,
    });
  }

  get id(): string {
    return this.client.nodeId;
  }

  peerIds(): string[] {
    return (this.netmap?.peers ?? []).map((p) => p.id).sort();
  }

  async register(
    authKey: string,
    hostname: string,
    extra: { tags?: string[]; endpoints?: string[]; routes?: string[] } = {},
  ) {
    return this.client.register({
      authKey,
      machineKey: this.machine.publicKey,
      nodeKey: this.nodeKey.publicKey,
      hostname,
      os: 'linux',
      version: this.version,
      requestedTags: extra.tags ?? [],
      endpoints: extra.endpoints ?? ['192.0.2.10:41641'],
      advertisedRoutes: extra.routes ?? [],
    });
  }

  /** `lockdownPorts`: what an agent started with --lockdown-ssh reports. */
  async connect(lockdownPorts: number[] = []): Promise<void> {
    this.ended = null;
    const stream = await this.client.sync();
    this.stream = stream;
    stream.on('data', (msg: SyncResponse) => {
      this.netmap = applySync(this.netmap, this.seq, msg);
      this.seq = msg.seq;
      this.messages.push(msg);
      this.wake();
    });
    stream.on('status', (s: grpc.StatusObject) => {
      this.ended = s;
      this.wake();
    });
    stream.on('error', (err: Error) => {
      this.ended = err;
      this.wake();
    });
    stream.write(
      create(SyncRequestSchema, {
        message: {
          case: 'hello',
          value: { version: this.version, endpoints: ['192.0.2.10:41641'], lockdownPorts },
        },
      }),
    );
    await this.waitFor(() => this.netmap !== null || this.ended !== null, 5000, 'full netmap');
    if (!this.netmap) {
      const e = this.ended as { details?: string; message?: string } | null;
      throw new Error(e?.details ?? e?.message ?? 'stream ended before the full netmap');
    }
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Resolves when `pred` holds, re-checked after every message. */
  async waitFor(pred: () => boolean, timeoutMs = 3000, what = 'condition'): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; peers: ${this.peerIds().join(',')}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 100));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  disconnect(): void {
    this.stream?.cancel();
    this.stream = null;
    this.netmap = null;
    this.seq = 0n;
  }

  close(): void {
    this.disconnect();
    this.client.close();
  }
}
