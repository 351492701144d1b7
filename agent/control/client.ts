// The agent's client of the control API. Every call is signed with the
// machine key; the stream's opening is signed the same way.
import { create, type MessageInitShape, toBinary } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { dial, type Endpoint } from '../../proto/dial.js';
import {
  ControlService,
  LogoutRequestSchema,
  type RegisterRequest,
  RegisterRequestSchema,
  type RegisterResponse,
  type RelayRequest,
  type RelayResponse,
  RotateNodeKeyRequestSchema,
  type SyncRequest,
  type SyncResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import type { Node } from '../../proto/gen/meshgate/v1/types_pb.js';
import { CLIENT_RECEIVE_LIMIT, makeClient, methodPath, unary } from '../../proto/grpc.js';
import { IMPLIED_PEER_FIELDS, NETMAP_FEATURES_HEADER, SHARED_PEERS } from '../../proto/netmap.js';
import { signCall } from '../../proto/signing.js';

export interface ControlClientOptions {
  /**
   * grpcs://HOST:PORT, or several separated by commas: coordinators sharing
   * one database (docs/ha.md), tried in turn when one goes away.
   */
  url: string;
  fingerprint?: string;
  /** Ed25519 secret key (64 bytes, tweetnacl layout). */
  machineSecretKey: Uint8Array;
  channelOptions?: grpc.ChannelOptions;
  callTimeoutMs?: number;
}

const path = (name: string) =>
  methodPath(ControlService, ControlService.methods.find((m) => m.name === name)!);

export class ControlClient {
  private client: grpc.Client | null = null;
  private endpoint: Endpoint | null = null;
  private readonly urls: string[];
  private current = 0;
  nodeId = '';

  constructor(private readonly opts: ControlClientOptions) {
    const urls = opts.url
      .split(',')
      .map((u) => u.trim())
      .filter(Boolean);
    this.urls = urls.length ? urls : [opts.url];
    // Agents spread over the coordinators instead of all starting on the first.
    this.current = Math.floor(Math.random() * this.urls.length);
  }

  get display(): string {
    return this.endpoint?.display ?? this.urls[this.current]!;
  }

  /**
   * The next coordinator for the next call, after this one failed. With one
   * address nothing changes: its channel reconnects by itself.
   */
  failover(): void {
    if (this.urls.length < 2) return;
    this.close();
    this.endpoint = null;
    this.current = (this.current + 1) % this.urls.length;
  }

  private async grpc(): Promise<grpc.Client> {
    if (!this.client) {
      this.endpoint = await dial(this.urls[this.current]!, { fingerprint: this.opts.fingerprint });
      this.client = makeClient(ControlService, this.endpoint.target, this.endpoint.credentials, {
        'grpc.keepalive_time_ms': 30_000,
        'grpc.keepalive_timeout_ms': 10_000,
        'grpc.keepalive_permit_without_calls': 1,
        ...CLIENT_RECEIVE_LIMIT,
        ...this.endpoint.options,
        ...this.opts.channelOptions,
      });
    }
    return this.client;
  }

  private metadata(method: string, body: Uint8Array, nodeId: string): grpc.Metadata {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(signCall(this.opts.machineSecretKey, method, nodeId, body)))
      md.set(k, v);
    return md;
  }

  private deadline(): grpc.CallOptions {
    return { deadline: Date.now() + (this.opts.callTimeoutMs ?? 15_000) };
  }

  async register(init: MessageInitShape<typeof RegisterRequestSchema>): Promise<RegisterResponse> {
    const req: RegisterRequest = create(RegisterRequestSchema, init);
    const md = this.metadata(path('Register'), toBinary(RegisterRequestSchema, req), '');
    const res = await unary(await this.grpc(), ControlService, 'register', req, md, this.deadline());
    this.nodeId = res.node?.id ?? '';
    return res;
  }

  /** Opens the sync stream. The caller handles 'data', 'error' and 'end'. */
  async sync(): Promise<grpc.ClientDuplexStream<SyncRequest, SyncResponse>> {
    const client = await this.grpc();
    const md = this.metadata(path('Sync'), new Uint8Array(), this.nodeId);
    // applySync reconstructs what the coordinator may then leave out.
    md.set(NETMAP_FEATURES_HEADER, `${IMPLIED_PEER_FIELDS},${SHARED_PEERS}`);
    // biome-ignore lint/suspicious/noExplicitAny: generic client methods are untyped
    return (client as any).sync(md) as grpc.ClientDuplexStream<SyncRequest, SyncResponse>;
  }

  /** Opens the relay stream, signed like the sync stream. */
  async relay(): Promise<grpc.ClientDuplexStream<RelayRequest, RelayResponse>> {
    const client = await this.grpc();
    const md = this.metadata(path('Relay'), new Uint8Array(), this.nodeId);
    // biome-ignore lint/suspicious/noExplicitAny: generic client methods are untyped
    return (client as any).relay(md) as grpc.ClientDuplexStream<RelayRequest, RelayResponse>;
  }

  async logout(): Promise<void> {
    const req = create(LogoutRequestSchema, {});
    await unary(
      await this.grpc(),
      ControlService,
      'logout',
      req,
      this.metadata(path('Logout'), toBinary(LogoutRequestSchema, req), this.nodeId),
      this.deadline(),
    );
  }

  async rotateNodeKey(nodeKey: Uint8Array): Promise<Node | undefined> {
    const req = create(RotateNodeKeyRequestSchema, { nodeKey });
    const md = this.metadata(path('RotateNodeKey'), toBinary(RotateNodeKeyRequestSchema, req), this.nodeId);
    return (await unary(await this.grpc(), ControlService, 'rotateNodeKey', req, md, this.deadline())).node;
  }

  close(): void {
    this.client?.close();
    this.client = null;
  }
}
