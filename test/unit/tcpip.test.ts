// The userspace IP layer: checksums, IPv4/IPv6 headers, ICMP echo, addresses.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { supersededAck } from '../../userspace/node.js';
import { checksum } from '../../userspace/tcpip/checksum.js';
import { buildEcho, parseEcho } from '../../userspace/tcpip/icmp.js';
import { buildIp, formatAddress, Protocol, parseAddress, parseIp } from '../../userspace/tcpip/ip.js';
import { buildSegment, Flags } from '../../userspace/tcpip/segment.js';

describe('userspace IP layer', () => {
  it('computes the RFC 1071 checksum, odd lengths included', () => {
    // RFC 1071 section 3's example words 0001 f203 f4f5 f6f7 sum to ddf2 (with carries folded).
    assert.equal(
      checksum(new Uint8Array([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
      ~0xddf2 & 0xffff,
    );
    assert.equal(checksum(new Uint8Array([0xff])), ~0xff00 & 0xffff);
    assert.equal(
      checksum(new Uint8Array([0x00, 0x01]), new Uint8Array([0xf2, 0x03])),
      checksum(new Uint8Array([0, 1, 0xf2, 3])),
    );
  });

  it('builds IPv4 headers that verify, and parses them back', () => {
    const src = parseAddress('100.64.0.1')!;
    const dst = parseAddress('100.64.0.2')!;
    const p = buildIp({
      source: src,
      destination: dst,
      protocol: Protocol.UDP,
      payload: new Uint8Array([1, 2, 3]),
    });
    assert.equal(checksum(p.subarray(0, 20)), 0);
    const back = parseIp(p)!;
    assert.equal(back.version, 4);
    assert.equal(formatAddress(back.source), '100.64.0.1');
    assert.deepEqual([...back.payload], [1, 2, 3]);
    const bad = p.slice();
    bad[8] = 1;
    assert.equal(parseIp(bad), null, 'a header whose checksum fails');
    assert.equal(parseIp(p.subarray(0, 21)), null, 'a truncated packet');
    const fragment = buildIp({
      source: src,
      destination: dst,
      protocol: Protocol.UDP,
      payload: new Uint8Array(8),
    });
    fragment[6] = 0x20;
    assert.equal(parseIp(fragment), null, 'fragments are not reassembled');
  });

  it('answers IPv6 echo with a checksum over the pseudo-header', () => {
    const a = parseAddress('fd7a:115c:a1e0::1')!;
    const b = parseAddress('fd7a:115c:a1e0::2')!;
    const req = buildEcho(a, b, { reply: false, id: 9, seq: 3, data: new Uint8Array([7, 7]) });
    const ip = parseIp(req)!;
    assert.equal(ip.version, 6);
    assert.deepEqual(parseEcho(ip), { reply: false, id: 9, seq: 3, data: new Uint8Array([7, 7]) });
    const corrupt = req.slice();
    corrupt[corrupt.length - 1]! ^= 1;
    assert.equal(parseEcho(parseIp(corrupt)!), null);
  });

  it('parses and formats addresses', () => {
    assert.equal(formatAddress(parseAddress('fd7a:115c:a1e0::2')!), 'fd7a:115c:a1e0::2');
    assert.equal(formatAddress(parseAddress('::1')!), '::1');
    assert.equal(parseAddress('256.0.0.1'), null);
    assert.equal(parseAddress('1::2::3'), null);
    assert.equal(parseAddress('fd7a:zz::1'), null);
    assert.equal(parseAddress('1:2:3:4:5:6:7:8:9'), null);
  });
});

describe('stretch ACKs', () => {
  const a = parseAddress('100.64.0.1')!;
  const b = parseAddress('fd7a::1')!;
  const seg = (ack: number, extra: Partial<Parameters<typeof buildSegment>[2]> = {}, src = a) =>
    buildSegment(src, src === a ? parseAddress('100.64.0.2')! : parseAddress('fd7a::2')!, {
      sourcePort: 50000,
      destinationPort: 22,
      seq: 1,
      ack,
      flags: Flags.ACK,
      window: 1000,
      payload: new Uint8Array(0),
      ...extra,
    });

  it('drops a pure ACK that a later pure ACK acknowledges more than, over IPv4 and IPv6', () => {
    assert.equal(supersededAck(seg(100), seg(200)), true);
    assert.equal(supersededAck(seg(100, {}, b), seg(200, {}, b)), true);
    assert.equal(supersededAck(seg(100, { sack: [[300, 400]] }), seg(500)), true);
  });

  it('drops a duplicate ACK when the next one carries SACK blocks', () => {
    assert.equal(supersededAck(seg(100, { sack: [[300, 400]] }), seg(100, { sack: [[300, 500]] })), true);
    assert.equal(supersededAck(seg(100), seg(100, { sack: [[300, 400]] })), true);
  });

  it('keeps duplicate ACKs without SACK blocks, and anything carrying data or other flags', () => {
    assert.equal(supersededAck(seg(100), seg(100)), false);
    assert.equal(supersededAck(seg(100, { sack: [[300, 400]] }), seg(100)), false);
    assert.equal(supersededAck(seg(100, { payload: new Uint8Array(10) }), seg(200)), false);
    assert.equal(supersededAck(seg(100), seg(200, { payload: new Uint8Array(10) })), false);
    assert.equal(supersededAck(seg(100, { flags: Flags.ACK | Flags.FIN }), seg(200)), false);
  });
});
