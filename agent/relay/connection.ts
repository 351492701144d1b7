// The agent's relay stream to the coordinator: sends datagrams to a peer,
// receives datagrams from peers, and reconnects with backoff.
import { EventEmitter } from 'node:events';
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import {
  type RelayRequest,
  RelayRequestSchema,
  type RelayResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import { Backoff } from '../control/backoff.js';
import type { ControlClient } from '../control/client.js';

export class RelayConnection extends EventEmitter<{ datagram: [string, Uint8Array]; open: [] }> {
  private stream: grpc.ClientDuplexStream<RelayRequest, RelayResponse> | null = null;
  private readonly backoff = new Backoff(500, 15_000);
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;

  constructor(private readonly client: ControlClient) {
    super();
  }

  get connected(): boolean {
    return this.stream !== null;
  }

  start(): void {
    if (this.stream || this.timer || this.stopped) return;
    void this.client.relay().then(
      (stream) => {
        this.stream = stream;
        this.emit('open');
        stream.on('data', (msg: RelayResponse) => {
          this.backoff.reset();
          this.emit('datagram', msg.peerId, msg.payload);
        });
        stream.on('error', () => this.retry());
        stream.on('end', () => this.retry());
      },
      () => this.retry(),
    );
  }

  /** Best effort, like UDP: a datagram sent while disconnected is lost. */
  send(peerId: string, payload: Uint8Array): void {
    this.stream?.write(create(RelayRequestSchema, { peerId, payload }));
  }

  private retry(): void {
    this.stream = null;
    if (this.stopped || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.start();
    }, this.backoff.next());
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.stream?.cancel();
    this.stream = null;
  }
}
