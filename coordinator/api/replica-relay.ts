// The relay across coordinators sharing a database (docs/ha.md, "Relay"):
// a datagram whose receiver holds its relay stream on another coordinator is
// forwarded there over one long-lived stream per coordinator, and delivered
// by that coordinator's hub. Datagrams are dropped, never queued, while the
// stream is being opened or cannot keep up, as the hub does for agents.
import { create } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { dial } from '../../proto/dial.js';
import {
  type ForwardRelayRequest,
  ForwardRelayRequestSchema,
  ReplicaService,
} from '../../proto/gen/meshgate/v1/replica_pb.js';
import { makeClient } from '../../proto/grpc.js';
import type { Logger } from '../log.js';
import type { Replication } from '../state/replication.js';
import type { State } from '../state/state.js';
import { peerAddress } from './auth.js';
import { bearerMatches } from './bearer.js';
import type { RelayHub, RelayResult } from './relay.js';
import type { AuthThrottle } from './throttle.js';

interface Link {
  address: string;
  client: grpc.Client | null;
  stream: grpc.ClientWritableStream<ForwardRelayRequest> | null;
}

export class RelayForwarder {
  private readonly links = new Map<string, Link>();
  private closed = false;

  constructor(
    private readonly state: State,
    private readonly replication: Replication,
    /** The coordinators share one TLS identity: this pins every one of them. */
    private readonly fingerprint: string | undefined,
    private readonly log: Logger,
  ) {}

  readonly forward = (fromId: string, toId: string, payload: Uint8Array): RelayResult => {
    const home = this.state.remoteHome(toId);
    const address = home === undefined ? undefined : this.replication.addressOf(home);
    if (home === undefined || address === undefined) return 'offline';
    let link = this.links.get(home);
    if (link && link.address !== address) {
      this.drop(home, link);
      link = undefined;
    }
    if (!link) {
      link = { address, client: null, stream: null };
      this.links.set(home, link);
      void this.open(home, link);
    }
    if (!link.stream || link.stream.writableNeedDrain) return 'congested';
    link.stream.write(create(ForwardRelayRequestSchema, { fromId, toId, payload }));
    return 'forwarded';
  };

  private async open(home: string, link: Link): Promise<void> {
    try {
      const endpoint = await dial(link.address, { fingerprint: this.fingerprint });
      const secret = await this.replication.secret();
      if (this.closed || this.links.get(home) !== link) return;
      const client = makeClient(ReplicaService, endpoint.target, endpoint.credentials, endpoint.options);
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${secret}`);
      // biome-ignore lint/suspicious/noExplicitAny: generic client methods are untyped
      const stream = (client as any).forwardRelay(md, (err: grpc.ServiceError | null) => {
        if (err && !this.closed)
          this.log.debug({ replica: home, err: err.message }, 'relay forwarding stream ended');
        if (this.links.get(home) === link) this.drop(home, link);
      }) as grpc.ClientWritableStream<ForwardRelayRequest>;
      link.client = client;
      link.stream = stream;
    } catch (err) {
      this.log.warn(
        { replica: home, address: link.address, err: (err as Error).message },
        'cannot forward relay datagrams to a coordinator',
      );
      // Tried again with the next datagram after a pause, not with every one.
      setTimeout(() => {
        if (this.links.get(home) === link) this.links.delete(home);
      }, 1000).unref();
    }
  }

  private drop(home: string, link: Link): void {
    this.links.delete(home);
    link.stream?.end();
    link.client?.close();
  }

  close(): void {
    this.closed = true;
    for (const [home, link] of this.links) this.drop(home, link);
  }
}

/**
 * The receiving side: datagrams from coordinators that know the shared secret. A wrong secret is
 * a failed authentication like a wrong API key: logged, counted and throttled per address.
 */
export function replicaImplementation(
  relay: RelayHub,
  secret: () => Promise<string>,
  throttle: AuthThrottle,
) {
  return {
    forwardRelay(
      call: grpc.ServerReadableStream<ForwardRelayRequest, unknown>,
      done: grpc.sendUnaryData<unknown>,
    ) {
      const peer = peerAddress(call.getPeer());
      try {
        throttle.check('replica', peer, 'ForwardRelay');
      } catch (err) {
        done({ code: grpc.status.RESOURCE_EXHAUSTED, details: (err as Error).message });
        return;
      }
      const authorization = call.metadata.get('authorization')[0];
      secret().then(
        (s) => {
          if (!bearerMatches(typeof authorization === 'string' ? authorization : undefined, s)) {
            const reason = 'not a coordinator of this database';
            throttle.failed('replica', peer, 'ForwardRelay', reason);
            done({ code: grpc.status.UNAUTHENTICATED, details: reason });
            return;
          }
          call.on('data', (f: ForwardRelayRequest) => relay.deliver(f.fromId, f.toId, f.payload));
          call.on('end', () => done(null, {}));
          call.on('error', () => {});
        },
        (err) => done({ code: grpc.status.UNAVAILABLE, details: (err as Error).message }),
      );
    },
  };
}
