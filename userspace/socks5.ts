// A SOCKS5 server (RFC 1928) that hands each CONNECT to a dialer, e.g. the
// mesh: only the "no authentication" method and the CONNECT command; anything
// else is refused with the reply code the RFC gives for it. Meant for a
// loopback address, where the local user is the only client.
import { createServer, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { escapeUnsafe } from '../proto/text.js';
import { formatAddress } from './tcpip/ip.js';

export const Reply = {
  Succeeded: 0x00,
  GeneralFailure: 0x01,
  NetworkUnreachable: 0x03,
  HostUnreachable: 0x04,
  ConnectionRefused: 0x05,
  CommandNotSupported: 0x07,
  AddressTypeNotSupported: 0x08,
} as const;

const VERSION = 5;
const NO_AUTH = 0x00;
const NO_ACCEPTABLE_METHOD = 0xff;
const CONNECT = 0x01;
const COMMANDS: Record<number, string> = { 1: 'CONNECT', 2: 'BIND', 3: 'UDP ASSOCIATE' };
/** A client that has not sent its request by then is dropped. */
const HANDSHAKE_TIMEOUT_MS = 10_000;

export interface Socks5Options {
  dial(host: string, port: number): Promise<Duplex>;
  /** One line per connection event; never carries data. */
  log(line: string): void;
}

/** The reply for a failed dial, from the error's code (as a socket or the mesh sets it). */
export function replyFor(err: unknown): number {
  switch ((err as { code?: string }).code) {
    case 'ECONNREFUSED':
      return Reply.ConnectionRefused;
    case 'ENOTFOUND':
    case 'ETIMEDOUT':
    case 'EHOSTUNREACH':
      return Reply.HostUnreachable;
    case 'ENETUNREACH':
      return Reply.NetworkUnreachable;
    default:
      return Reply.GeneralFailure;
  }
}

export function createSocks5Server(o: Socks5Options): Server {
  return createServer({ allowHalfOpen: true }, (client) => serve(client, o));
}

interface Request {
  command: number;
  host: string;
  port: number;
  /** Bytes the client sent after its request, before our reply. */
  rest: Buffer;
}

/** The request at the start of `buf`: undefined while incomplete, a reply code when unusable. */
function parseRequest(buf: Buffer): Request | number | undefined {
  if (buf.length < 5) return undefined;
  if (buf[0] !== VERSION) return Reply.GeneralFailure;
  const type = buf[3];
  const length = type === 1 ? 4 : type === 4 ? 16 : type === 3 ? 1 + buf[4]! : -1;
  if (length < 0) return Reply.AddressTypeNotSupported;
  const end = 4 + length + 2;
  if (buf.length < end) return undefined;
  const raw = buf.subarray(4, 4 + length);
  const host = type === 3 ? raw.subarray(1).toString('latin1') : formatAddress(new Uint8Array(raw));
  if (!host) return Reply.HostUnreachable;
  return { command: buf[1]!, host, port: buf.readUInt16BE(4 + length), rest: buf.subarray(end) };
}

function reply(code: number): Buffer {
  // BND.ADDR and BND.PORT are zero: what the mesh socket is bound to means nothing to the client.
  return Buffer.from([VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]);
}

function serve(client: Socket, o: Socks5Options): void {
  const from = `${client.remoteAddress}:${client.remotePort}`;
  let buf = Buffer.alloc(0);
  let greeted = false;
  client.setTimeout(HANDSHAKE_TIMEOUT_MS, () => {
    o.log(`socks5 ${from}: no request within ${HANDSHAKE_TIMEOUT_MS / 1000} s, dropped`);
    client.destroy();
  });
  client.on('error', () => {});
  const refuse = (code: number, why: string) => {
    o.log(`socks5 ${from}: ${why}`);
    client.off('data', onData);
    client.end(reply(code));
  };
  const onData = (data: Buffer) => {
    buf = Buffer.concat([buf, data]);
    if (!greeted) {
      if (buf.length < 2) return;
      if (buf[0] !== VERSION) {
        o.log(`socks5 ${from}: not a SOCKS5 client (version byte ${buf[0]}), closed`);
        client.destroy();
        return;
      }
      const n = buf[1]!;
      if (buf.length < 2 + n) return;
      const methods = buf.subarray(2, 2 + n);
      buf = buf.subarray(2 + n);
      if (!methods.includes(NO_AUTH)) {
        o.log(`socks5 ${from}: the client offers no "no authentication" method, refused`);
        client.off('data', onData);
        client.end(Buffer.from([VERSION, NO_ACCEPTABLE_METHOD]));
        return;
      }
      greeted = true;
      client.write(Buffer.from([VERSION, NO_AUTH]));
    }
    const request = parseRequest(buf);
    if (request === undefined) return;
    if (typeof request === 'number')
      return refuse(
        request,
        request === Reply.AddressTypeNotSupported
          ? `address type ${buf[3]} not supported, refused`
          : 'malformed request, refused',
      );
    if (request.command !== CONNECT)
      return refuse(
        Reply.CommandNotSupported,
        `${COMMANDS[request.command] ?? `command ${request.command}`} not supported (only CONNECT), refused`,
      );
    client.off('data', onData);
    client.pause();
    client.setTimeout(0);
    connect(client, from, request, o);
  };
  client.on('data', onData);
}

function connect(client: Socket, from: string, r: Request, o: Socks5Options): void {
  const host = escapeUnsafe(r.host);
  const to = `${host.includes(':') ? `[${host}]` : host}:${r.port}`;
  const handshake = client.bytesRead - r.rest.length;
  o.dial(r.host, r.port).then(
    (remote) => {
      if (client.destroyed) {
        remote.destroy();
        return;
      }
      o.log(`socks5 ${from} -> ${to}: connected`);
      client.write(reply(Reply.Succeeded));
      const sentBefore = client.bytesWritten;
      if (r.rest.length) remote.write(r.rest);
      Promise.allSettled([pipeline(client, remote), pipeline(remote, client)]).then(([up, down]) => {
        const failed = [up, down].find((p) => p.status === 'rejected') as PromiseRejectedResult | undefined;
        o.log(
          `socks5 ${from} -> ${to}: closed, ${client.bytesRead - handshake} bytes sent, ${
            client.bytesWritten - sentBefore
          } received${failed ? ` (${escapeUnsafe((failed.reason as Error).message)})` : ''}`,
        );
        client.destroy();
        remote.destroy();
      });
    },
    (err: Error) => {
      o.log(`socks5 ${from} -> ${to}: ${escapeUnsafe(err.message)}`);
      if (!client.destroyed) client.end(reply(replyFor(err)));
    },
  );
}
