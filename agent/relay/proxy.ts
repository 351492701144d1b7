// Local UDP sockets that stand in for relayed peers. WireGuard is pointed at
// 127.0.0.1:<port of the peer's socket>; what it sends there goes over the
// relay, and what the relay brings from that peer is handed to WireGuard
// from that socket, so WireGuard (and its roaming) sees one more endpoint.
import { createSocket, type Socket } from 'node:dgram';
import { EventEmitter } from 'node:events';
import type { RelayConnection } from './connection.js';

/**
 * A relayed datagram that is not for WireGuard but for the peer's agent: "probe
 * the direct path to me now". WireGuard messages start with a type 1-4, so
 * 0xff cannot be mistaken for one.
 */
const PROBE = Buffer.from([0xff, 0x6d, 0x67, 0x70, 0x72, 0x6f, 0x62, 0x65]);

export class RelayProxies extends EventEmitter<{ probe: [string] }> {
  private readonly sockets = new Map<string, { socket: Socket; port: number }>();
  private readonly pending = new Map<string, Promise<string>>();
  private closed = false;

  constructor(
    private readonly relay: RelayConnection,
    private readonly wireguardPort: () => number,
  ) {
    super();
    relay.on('datagram', (peerId, payload) => void this.deliver(peerId, payload));
  }

  /** The endpoint WireGuard should use for `peerId` when relayed, if its socket exists. */
  endpointOf(peerId: string): string | undefined {
    const s = this.sockets.get(peerId);
    return s ? `127.0.0.1:${s.port}` : undefined;
  }

  /** Creates the socket for `peerId` when needed; resolves to its endpoint. */
  ensure(peerId: string): Promise<string> {
    const existing = this.endpointOf(peerId);
    if (existing) return Promise.resolve(existing);
    let p = this.pending.get(peerId);
    if (!p) {
      p = new Promise<string>((resolve, reject) => {
        const socket = createSocket('udp4');
        socket.on('message', (msg, rinfo) => {
          // Only WireGuard on this host may send through the relay.
          if (rinfo.address === '127.0.0.1' && rinfo.port === this.wireguardPort())
            this.relay.send(peerId, msg);
        });
        socket.once('error', reject);
        socket.bind(0, '127.0.0.1', () => {
          // Closed while binding: a socket kept now would outlive the agent's mesh.
          if (this.closed) {
            socket.close();
            reject(new Error('the relay is closed'));
            return;
          }
          const port = socket.address().port;
          this.sockets.set(peerId, { socket, port });
          resolve(`127.0.0.1:${port}`);
        });
      }).finally(() => this.pending.delete(peerId));
      this.pending.set(peerId, p);
    }
    return p;
  }

  /** A datagram from a peer: a peer that relays to us gets a socket even before we chose to relay. */
  private async deliver(peerId: string, payload: Uint8Array): Promise<void> {
    if (this.closed || !this.allowed(peerId)) return;
    if (PROBE.equals(payload)) {
      this.emit('probe', peerId);
      return;
    }
    const endpoint = await this.ensure(peerId).catch(() => undefined);
    if (endpoint) this.sockets.get(peerId)?.socket.send(payload, this.wireguardPort(), '127.0.0.1');
  }

  /** Asks the peer's agent to probe the direct path at the same time as we do. */
  askProbe(peerId: string): void {
    this.relay.send(peerId, PROBE);
  }

  /** Set by the agent: datagrams from nodes not in the netmap are dropped. */
  allowed: (peerId: string) => boolean = () => false;

  /** Closes the sockets of peers no longer in the netmap. */
  retain(peerIds: Set<string>): void {
    for (const [id, s] of this.sockets) {
      if (!peerIds.has(id)) {
        s.socket.close();
        this.sockets.delete(id);
      }
    }
  }

  close(): void {
    this.closed = true;
    this.retain(new Set());
  }
}
