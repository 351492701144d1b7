// How the agent builds its netmap from the stream: a full map, then deltas
// in sequence. Every field a delta can carry is applied when present and
// kept when absent; anything out of order is an error that makes the agent
// reconnect for a fresh full map.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { create, type MessageInitShape } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import { SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import {
  DnsRecordSchema,
  type NetMap,
  NetMapSchema,
  NodeSchema,
  PacketFilterSchema,
  PeerSchema,
} from '../../proto/gen/meshgate/v1/types_pb.js';
import { applySync, SequenceError } from '../../proto/netmap.js';

const peer = (id: string, extra: object = {}) => create(PeerSchema, { id, name: id, nodeKey: id, ...extra });
const filter = (src: string) => create(PacketFilterSchema, { rules: [{ srcCidrs: [src] }] });
const full = (): NetMap =>
  create(NetMapSchema, {
    self: create(NodeSchema, { id: 'me', name: 'me' }),
    peers: [
      peer('a', { online: true, lastSeen: timestampFromMs(1000), endpoints: ['192.0.2.1:1'] }),
      peer('b'),
    ],
    packetFilter: filter('100.64.0.1/32'),
    dns: [
      create(DnsRecordSchema, { name: 'a.p.mesh', ipAddresses: ['100.64.0.2'] }),
      create(DnsRecordSchema, { name: 'b.p.mesh', ipAddresses: [] }),
    ],
    domain: 'p.mesh',
    desiredVersion: '1.0.0',
  });
const delta = (init: MessageInitShape<typeof SyncResponseSchema>) =>
  create(SyncResponseSchema, { seq: 2n, ...init });

describe('netmap from the sync stream', () => {
  const first = applySync(null, 0n, create(SyncResponseSchema, { seq: 1n, full: full() }))!;

  it('keeps everything a delta does not mention, sharing the unchanged peers', () => {
    const next = applySync(first, 1n, delta({}))!;
    assert.notEqual(next, first, 'a new value');
    assert.equal(next.peers, first.peers, 'the same peer list when no peer changed');
    assert.equal(next.packetFilter, first.packetFilter);
    assert.equal(next.self, first.self);
    assert.equal(next.dns, first.dns);
    assert.equal(next.domain, 'p.mesh');
    assert.equal(next.desiredVersion, '1.0.0');
    assert.equal(applySync(first, 1n, delta({ keepalive: true })), first, 'a keepalive changes nothing');
  });

  it('applies the filter, desired version, self and DNS a delta carries', () => {
    const self = create(NodeSchema, { id: 'me', name: 'renamed' });
    const next = applySync(
      first,
      1n,
      delta({ packetFilter: filter('100.64.0.9/32'), desiredVersion: '', self, dns: [], dnsChanged: true }),
    )!;
    assert.deepEqual(next.packetFilter?.rules[0]?.srcCidrs, ['100.64.0.9/32']);
    assert.equal(next.desiredVersion, '', 'an empty version clears it');
    assert.equal(next.self?.name, 'renamed');
    assert.deepEqual(next.dns, [], 'DNS records replaced, also by none');
    assert.deepEqual(applySync(first, 1n, delta({ desiredVersion: '2.0.0' }))!.desiredVersion, '2.0.0');
  });

  it('removes and adds peers, each also alone', () => {
    assert.deepEqual(
      applySync(first, 1n, delta({ peersRemoved: ['a'] }))!.peers.map((p) => p.id),
      ['b'],
    );
    assert.deepEqual(
      applySync(first, 1n, delta({ peersChanged: [peer('c')] }))!.peers.map((p) => p.id),
      ['a', 'b', 'c'],
    );
  });

  it('patches known peers field by field and ignores patches for peers it does not have', () => {
    const next = applySync(
      first,
      1n,
      delta({
        peerPatches: [
          { id: 'a', online: false, endpointsChanged: false, endpoints: [] },
          { id: 'b', lastSeen: timestampFromMs(5000), endpointsChanged: true, endpoints: ['192.0.2.2:2'] },
          { id: 'ghost', online: true, endpointsChanged: false, endpoints: [] },
        ],
      }),
    )!;
    const [a, b] = next.peers;
    assert.deepEqual(
      next.peers.map((p) => p.id),
      ['a', 'b'],
    );
    assert.equal(a!.online, false);
    assert.deepEqual(a!.lastSeen, timestampFromMs(1000), 'lastSeen kept when the patch has none');
    assert.deepEqual(a!.endpoints, ['192.0.2.1:1'], 'endpoints kept unless the patch says they changed');
    assert.deepEqual(b!.endpoints, ['192.0.2.2:2']);
    assert.deepEqual(b!.lastSeen, timestampFromMs(5000));
    assert.equal(first.peers[0]!.online, true, 'the previous netmap is untouched');
  });

  it('refuses messages out of sequence and deltas before a full map; a new stream starts at 1', () => {
    const refused = (f: () => unknown, re: RegExp) =>
      assert.throws(f, (err: unknown) => {
        assert.ok(err instanceof SequenceError);
        assert.equal(err.name, 'SequenceError');
        assert.match(err.message, re);
        return true;
      });
    refused(() => applySync(first, 1n, delta({ seq: 3n })), /^sync message 3 after 1$/);
    refused(() => applySync(first, 1n, delta({ seq: 1n })), /^sync message 1 after 1$/);
    refused(() => applySync(first, 3n, delta({ seq: 1n, peersRemoved: ['a'] })), /^sync message 1 after 3$/);
    refused(() => applySync(first, 3n, delta({ seq: 5n, full: full() })), /^sync message 5 after 3$/);
    refused(() => applySync(null, 1n, delta({})), /^delta before the first full netmap$/);
    const again = full();
    assert.equal(applySync(first, 7n, create(SyncResponseSchema, { seq: 1n, full: again })), again);
  });
});
