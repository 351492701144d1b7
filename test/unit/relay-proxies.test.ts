// The local sockets that stand in for relayed peers: what a relayed peer sends
// reaches WireGuard from its own socket, WireGuard's answer goes back over the
// relay, and no socket outlives close(), not even one still being bound then.
import assert from 'node:assert/strict';
import { createSocket, type Socket } from 'node:dgram';
import { EventEmitter, once } from 'node:events';
import { afterEach, beforeEach, describe, it } from 'node:test';
import type { RelayConnection } from '../../agent/relay/connection.js';
import { RelayProxies } from '../../agent/relay/proxy.js';

class FakeRelay extends EventEmitter<{ datagram: [string, Uint8Array] }> {
  readonly sent: [string, string][] = [];
  send(peerId: string, payload: Uint8Array) {
    this.sent.push([peerId, Buffer.from(payload).toString()]);
  }
}

/** Open UDP sockets of this process, once the ones being closed are gone. */
async function udpSockets(): Promise<number> {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  return process.getActiveResourcesInfo().filter((r) => r === 'UDPWrap').length;
}

describe('relay proxies', () => {
  let wireguard: Socket;
  let relay: FakeRelay;
  let proxies: RelayProxies;

  beforeEach(async () => {
    wireguard = createSocket('udp4');
    wireguard.bind(0, '127.0.0.1');
    await once(wireguard, 'listening');
    relay = new FakeRelay();
    proxies = new RelayProxies(relay as unknown as RelayConnection, () => wireguard.address().port);
    proxies.allowed = (id) => id === 'peer-1';
  });
  afterEach(async () => {
    proxies.close();
    await new Promise<void>((r) => wireguard.close(r));
  });

  it("hands a relayed peer's datagram to WireGuard from the peer's socket, and the answer back over the relay", async () => {
    const got = once(wireguard, 'message');
    relay.emit('datagram', 'peer-1', Buffer.from('handshake'));
    const [msg, from] = (await got) as [Buffer, { port: number }];
    assert.equal(msg.toString(), 'handshake');
    assert.equal(proxies.endpointOf('peer-1'), `127.0.0.1:${from.port}`);
    wireguard.send('response', from.port, '127.0.0.1');
    while (!relay.sent.length) await new Promise((r) => setTimeout(r, 1));
    assert.deepEqual(relay.sent, [['peer-1', 'response']]);
  });

  it('drops datagrams of nodes not in the netmap', async () => {
    const before = await udpSockets();
    relay.emit('datagram', 'stranger', Buffer.from('handshake'));
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(proxies.endpointOf('stranger'), undefined);
    assert.equal(await udpSockets(), before);
  });

  it('keeps no socket that was still being bound when it closed', async () => {
    const before = await udpSockets();
    relay.emit('datagram', 'peer-1', Buffer.from('handshake'));
    proxies.close();
    await proxies.ensure('peer-1').catch(() => undefined);
    assert.equal(proxies.endpointOf('peer-1'), undefined);
    assert.equal(await udpSockets(), before, 'the socket bound after close() is closed again');
  });
});
