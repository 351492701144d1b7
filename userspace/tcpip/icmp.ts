// ICMP and ICMPv6 echo: requests for `meshgate ping`, replies so that a peer's
// ping of this node is answered.
import { checksum, finish, sum } from './checksum.js';
import { buildIp, type IpPacket, Protocol, pseudoHeaderSum } from './ip.js';

const ECHO_REQUEST = { 4: 8, 6: 128 } as const;
const ECHO_REPLY = { 4: 0, 6: 129 } as const;

export interface Echo {
  reply: boolean;
  id: number;
  seq: number;
  data: Uint8Array;
}

function icmpChecksum(version: 4 | 6, source: Uint8Array, destination: Uint8Array, body: Uint8Array): number {
  if (version === 4) return checksum(body);
  return finish(sum(body, pseudoHeaderSum(source, destination, Protocol.ICMPv6, body.length)));
}

export function buildEcho(source: Uint8Array, destination: Uint8Array, echo: Echo): Uint8Array {
  const version = source.length === 4 ? 4 : 6;
  const body = new Uint8Array(8 + echo.data.length);
  body[0] = echo.reply ? ECHO_REPLY[version] : ECHO_REQUEST[version];
  body[4] = echo.id >> 8;
  body[5] = echo.id & 0xff;
  body[6] = echo.seq >> 8;
  body[7] = echo.seq & 0xff;
  body.set(echo.data, 8);
  const c = icmpChecksum(version, source, destination, body);
  body[2] = c >> 8;
  body[3] = c & 0xff;
  return buildIp({
    source,
    destination,
    protocol: version === 4 ? Protocol.ICMP : Protocol.ICMPv6,
    payload: body,
  });
}

/** The echo request or reply in `ip`, or null for any other packet or a bad checksum. */
export function parseEcho(ip: IpPacket): Echo | null {
  const proto = ip.version === 4 ? Protocol.ICMP : Protocol.ICMPv6;
  const b = ip.payload;
  if (ip.protocol !== proto || b.length < 8) return null;
  if (icmpChecksum(ip.version, ip.source, ip.destination, b) !== 0) return null;
  const type = b[0];
  if (type !== ECHO_REQUEST[ip.version] && type !== ECHO_REPLY[ip.version]) return null;
  return {
    reply: type === ECHO_REPLY[ip.version],
    id: (b[4]! << 8) | b[5]!,
    seq: (b[6]! << 8) | b[7]!,
    data: b.subarray(8),
  };
}
