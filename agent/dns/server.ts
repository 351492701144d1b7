// Answers for the mesh's names on the node's own mesh address (UDP 53), from the netmap's records.
// Only names under the mesh domain: anything else is refused, so this never stands in for the
// host's own resolvers. Bound to the mesh address, it is reachable from this host and, as the
// packet filter allows, over the mesh; never from the host's other networks.
import { createSocket, type Socket } from 'node:dgram';
import { buildAnswer, isClassIn, parseQuery, RCODE, TYPE_A, TYPE_AAAA } from './message.js';

export interface NameTable {
  /** e.g. "dc.mesh"; empty when the netmap has none. */
  domain: string;
  /** Fully qualified name (lower case, no trailing dot) -> addresses. */
  records: Map<string, string[]>;
}

/** The answer to one query, or null to drop it. Pure, for tests. */
export function answer(query: Uint8Array, table: NameTable): Uint8Array | null {
  const q = parseQuery(query);
  if (!q) return null;
  const domain = table.domain.toLowerCase();
  const inDomain = domain !== '' && (q.name === domain || q.name.endsWith(`.${domain}`));
  if (!inDomain || !isClassIn(q)) return buildAnswer(q, RCODE.refused, []);
  const addresses = table.records.get(q.name);
  if (!addresses && q.name !== domain) return buildAnswer(q, RCODE.nxDomain, []);
  // A known name asked for another type: no error, no answer (NODATA).
  if (q.type !== TYPE_A && q.type !== TYPE_AAAA) return buildAnswer(q, RCODE.ok, []);
  return buildAnswer(q, RCODE.ok, addresses ?? []);
}

export class MeshDns {
  private socket: Socket | null = null;
  private bound = '';

  constructor(
    private readonly table: () => NameTable,
    private readonly onError: (err: Error) => void,
    private readonly port = 53,
  ) {}

  /** The address it answers on, or '' when not listening. */
  get address(): string {
    return this.bound;
  }

  /** The UDP port it answers on (the one given, or the one the system picked for 0). */
  get boundPort(): number {
    return this.socket?.address().port ?? 0;
  }

  /** Listens on `address` (the node's mesh IPv4), moving when the address changes. */
  async listen(address: string): Promise<void> {
    if (address === this.bound) return;
    this.close();
    const socket = createSocket({ type: 'udp4' });
    socket.on('message', (msg, rinfo) => {
      const reply = answer(msg, this.table());
      if (reply) socket.send(reply, rinfo.port, rinfo.address);
    });
    socket.on('error', (err) => this.onError(err));
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.bind(this.port, address, () => {
        socket.off('error', reject);
        resolve();
      });
    });
    this.socket = socket;
    this.bound = address;
  }

  close(): void {
    this.socket?.close();
    this.socket = null;
    this.bound = '';
  }
}
