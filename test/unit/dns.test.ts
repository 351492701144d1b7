import assert from 'node:assert/strict';
import { Resolver } from 'node:dns/promises';
import { after, before, describe, it } from 'node:test';
import { RCODE, TYPE_A } from '../../agent/dns/message.js';
import { answer, MeshDns, type NameTable } from '../../agent/dns/server.js';

const table: NameTable = {
  domain: 'dc.mesh',
  records: new Map([['fw1.dc.mesh', ['100.64.0.1', 'fd7a:115c:a1e0::1']]]),
};

/** A standard query for `name`, as a stub resolver sends it. */
function query(name: string, type: number, id = 0x1234): Uint8Array {
  const labels = name.split('.').flatMap((l) => [l.length, ...Buffer.from(l)]);
  return Uint8Array.from([
    id >> 8,
    id & 0xff,
    0x01,
    0x00,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    ...labels,
    0,
    0,
    type,
    0,
    1,
  ]);
}

describe('mesh DNS answers', () => {
  it('answers A for a node of the mesh, case-insensitively, with the query id', () => {
    const reply = answer(query('FW1.dc.mesh', TYPE_A), table)!;
    assert.equal(reply[0], 0x12);
    assert.equal(reply[1], 0x34);
    assert.equal(reply[3]! & 0xf, RCODE.ok);
    assert.equal(reply[7], 1, 'one answer');
    assert.deepEqual([...reply.subarray(-4)], [100, 64, 0, 1]);
  });
  it('NXDOMAIN for an unknown node, REFUSED outside the mesh domain', () => {
    assert.equal(answer(query('nope.dc.mesh', TYPE_A), table)![3]! & 0xf, RCODE.nxDomain);
    assert.equal(answer(query('example.com', TYPE_A), table)![3]! & 0xf, RCODE.refused);
    assert.equal(answer(query('fw1.dc.mesh.evil', TYPE_A), table)![3]! & 0xf, RCODE.refused);
  });
  it('drops what does not parse: short, a response, a compression pointer, a label past the end', () => {
    assert.equal(answer(new Uint8Array(5), table), null);
    const response = query('fw1.dc.mesh', TYPE_A);
    response[2] = 0x81;
    assert.equal(answer(response, table), null);
    const pointer = Uint8Array.from([0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1]);
    assert.equal(answer(pointer, table), null);
    assert.equal(answer(query('fw1.dc.mesh', TYPE_A).subarray(0, 16), table), null);
  });
});

describe('mesh DNS responder', () => {
  const dns = new MeshDns(
    () => table,
    (err) => {
      throw err;
    },
    0,
  );
  const resolver = new Resolver();
  before(async () => {
    await dns.listen('127.0.0.1');
    resolver.setServers([`127.0.0.1:${dns.boundPort}`]);
  });
  after(() => dns.close());
  it("answers the system resolver library's A and AAAA queries", async () => {
    assert.deepEqual(await resolver.resolve4('fw1.dc.mesh'), ['100.64.0.1']);
    assert.deepEqual(await resolver.resolve6('fw1.dc.mesh'), ['fd7a:115c:a1e0::1']);
    await assert.rejects(resolver.resolve4('nope.dc.mesh'), { code: 'ENOTFOUND' });
  });
});
