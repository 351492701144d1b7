// The relay: forwards opaque WireGuard datagrams between two connected
// nodes of one project that the policy lets see each other. Datagrams are
// dropped, never queued, when a limit is hit or the receiver is slow: the
// tunnel inside copes with loss like it does on any UDP path.
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import {
  type RelayRequest,
  type RelayResponse,
  RelayResponseSchema,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import type { State } from '../state/state.js';
import type { Metrics } from './metrics.js';

export const MAX_DATAGRAM = 2048;

export interface RelayLimits {
  /** Sustained bytes per second per sending node. */
  bytesPerSecond: number;
  /** Bytes a node may send in one burst. */
  burstBytes: number;
}

interface Link {
  call: grpc.ServerDuplexStream<RelayRequest, RelayResponse>;
  tokens: number;
  /** When the tokens were counted, by a monotonic clock (see ratelimit.ts). */
  at: number;
}

export type RelayResult = 'forwarded' | 'denied' | 'offline' | 'rate-limited' | 'congested' | 'too-large';

export class RelayHub {
  private readonly links = new Map<string, Link>();
  /** For receivers on another coordinator of the same database (replica-relay.ts). */
  forwarder: ((fromId: string, toId: string, payload: Uint8Array) => RelayResult) | null = null;

  constructor(
    private readonly state: State,
    private readonly limits: RelayLimits,
    private readonly metrics: Metrics,
  ) {}

  get connected(): number {
    return this.links.size;
  }

  attach(nodeId: string, call: grpc.ServerDuplexStream<RelayRequest, RelayResponse>): void {
    this.links.get(nodeId)?.call.end();
    this.links.set(nodeId, { call, tokens: this.limits.burstBytes, at: performance.now() });
  }

  detach(nodeId: string, call: grpc.ServerDuplexStream<RelayRequest, RelayResponse>): void {
    if (this.links.get(nodeId)?.call === call) this.links.delete(nodeId);
  }

  /** Forwards one datagram from `fromId`; says what happened to it. */
  forward(fromId: string, frame: RelayRequest): RelayResult {
    const result = this.route(fromId, frame);
    this.metrics.relayPackets.inc({ result });
    if (result === 'forwarded') this.metrics.relayBytes.inc(frame.payload.length);
    return result;
  }

  private route(fromId: string, frame: RelayRequest): RelayResult {
    if (frame.payload.length > MAX_DATAGRAM) return 'too-large';
    const from = this.links.get(fromId);
    const src = this.state.getNode(fromId);
    const dst = this.state.getNode(frame.peerId);
    if (!from || !src || !dst || dst.project !== src.project) return 'denied';
    if (!this.state.compiled(src.project).canSee(src.id, dst.id)) return 'denied';
    const to = this.links.get(dst.id);
    if (!to && !this.forwarder) return 'offline';
    const now = performance.now();
    from.tokens = Math.min(
      this.limits.burstBytes,
      from.tokens + ((now - from.at) / 1000) * this.limits.bytesPerSecond,
    );
    from.at = now;
    if (from.tokens < frame.payload.length) return 'rate-limited';
    from.tokens -= frame.payload.length;
    if (!to) return this.forwarder!(src.id, dst.id, frame.payload);
    // A full HTTP/2 window means a slow receiver: drop like a full UDP buffer would.
    if (to.call.writableNeedDrain) return 'congested';
    to.call.write(create(RelayResponseSchema, { peerId: src.id, payload: frame.payload }));
    return 'forwarded';
  }

  /**
   * A datagram another coordinator forwarded, for a node streaming here. It
   * checked the policy with the same state; checked again, as that state may
   * be a change behind.
   */
  deliver(fromId: string, toId: string, payload: Uint8Array): RelayResult {
    if (payload.length > MAX_DATAGRAM) return 'too-large';
    const src = this.state.getNode(fromId);
    const dst = this.state.getNode(toId);
    if (!src || !dst || dst.project !== src.project) return 'denied';
    if (!this.state.compiled(src.project).canSee(src.id, dst.id)) return 'denied';
    const to = this.links.get(dst.id);
    if (!to) return 'offline';
    if (to.call.writableNeedDrain) return 'congested';
    to.call.write(create(RelayResponseSchema, { peerId: src.id, payload }));
    return 'forwarded';
  }

  close(): void {
    for (const l of this.links.values()) l.call.end();
    this.links.clear();
  }
}
