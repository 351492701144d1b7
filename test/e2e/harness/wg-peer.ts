// A userspace WireGuard peer for interoperability tests, run inside a test
// namespace: the protocol core over a UDP socket, answering pings to its own
// address and sending pings on request. Configuration (with the private key)
// arrives as the first line on stdin; commands follow, one JSON object a
// line; events go to stdout as JSON lines.
import { createSocket } from 'node:dgram';
import { createInterface } from 'node:readline';
import { buildEcho, parseEcho } from '../../../userspace/tcpip/icmp.js';
import { formatAddress, parseAddress, parseIp } from '../../../userspace/tcpip/ip.js';
import { Device, type Output, type Timers } from '../../../userspace/wireguard/device.js';

interface Config {
  privateKey: string;
  listenPort: number;
  addresses: string[];
  peer: { publicKey: string; endpoint?: string };
  timers?: Partial<Timers>;
}

const emit = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);
const lines = createInterface({ input: process.stdin });
const iterator = lines[Symbol.asyncIterator]();
const first = await iterator.next();
const config = JSON.parse(first.value as string) as Config;
const own = config.addresses.map((a) => parseAddress(a)!);
const device = new Device({
  privateKey: Buffer.from(config.privateKey, 'base64'),
  timers: config.timers ?? {},
});
const peer = device.addPeer({
  publicKey: Buffer.from(config.peer.publicKey, 'base64'),
  ...(config.peer.endpoint ? { endpoint: config.peer.endpoint } : {}),
});
const socket = createSocket('udp4');
let timer: NodeJS.Timeout | null = null;

function handle(outputs: Output[]): void {
  for (const o of outputs) {
    if (o.kind === 'transmit') {
      const i = o.to.lastIndexOf(':');
      socket.send(o.data, Number(o.to.slice(i + 1)), o.to.slice(0, i));
    } else if (o.kind === 'established') {
      emit({ event: 'established' });
    } else {
      const ip = parseIp(o.packet);
      const echo = ip && parseEcho(ip);
      if (!ip || !echo) continue;
      if (echo.reply) emit({ event: 'echo-reply', seq: echo.seq, from: formatAddress(ip.source) });
      else {
        emit({ event: 'echo-request', seq: echo.seq, from: formatAddress(ip.source) });
        handle(device.send(peer, buildEcho(ip.destination, ip.source, { ...echo, reply: true }), Date.now()));
      }
    }
  }
  schedule();
}

function schedule(): void {
  if (timer) clearTimeout(timer);
  const at = device.nextDeadline();
  timer = Number.isFinite(at)
    ? setTimeout(() => handle(device.tick(Date.now())), Math.max(0, at - Date.now()))
    : null;
}

socket.on('message', (msg, rinfo) =>
  handle(device.receive(msg, `${rinfo.address}:${rinfo.port}`, Date.now())),
);
socket.bind(config.listenPort, () => emit({ event: 'listening' }));

for await (const line of { [Symbol.asyncIterator]: () => iterator }) {
  const cmd = JSON.parse(line) as { ping?: { to: string; seq: number } };
  if (cmd.ping) {
    const to = parseAddress(cmd.ping.to)!;
    const from = own.find((a) => a.length === to.length)!;
    handle(
      device.send(
        peer,
        buildEcho(from, to, { reply: false, id: 7, seq: cmd.ping.seq, data: new Uint8Array(32) }),
        Date.now(),
      ),
    );
  }
}
if (timer) clearTimeout(timer);
socket.close();
