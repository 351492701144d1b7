// The relay forwards datagrams only between nodes that may see each other.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import {
  type RelayRequest,
  RelayRequestSchema,
  type RelayResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

interface RelayEnd {
  agent: SimAgent;
  stream: grpc.ClientDuplexStream<RelayRequest, RelayResponse>;
  got: RelayResponse[];
}

describe('relay', () => {
  let t: TestCoordinator;
  const ends: RelayEnd[] = [];

  const join = async (project: string, name: string, tags: string[] = []): Promise<RelayEnd> => {
    const agent = new SimAgent(t.url, t.fingerprint);
    await agent.register(await authKey(t, project, { tags }), name);
    await agent.connect();
    const stream = await agent.client.relay();
    const end = { agent, stream, got: [] as RelayResponse[] };
    stream.on('data', (m: RelayResponse) => end.got.push(m));
    stream.on('error', () => {});
    ends.push(end);
    return end;
  };
  const send = (from: RelayEnd, to: RelayEnd, text: string) =>
    from.stream.write(
      create(RelayRequestSchema, { peerId: to.agent.id, payload: new TextEncoder().encode(text) }),
    );
  const settle = () => new Promise((r) => setTimeout(r, 300));

  before(async () => {
    t = await startTestCoordinator();
  });
  after(async () => {
    for (const e of ends) {
      e.stream.cancel();
      e.agent.close();
    }
    await t.close();
  });

  it('carries datagrams between two nodes that see each other, and says who sent them', async () => {
    const a = await join('r1', 'a');
    const b = await join('r1', 'b');
    await settle();
    send(a, b, 'hello b');
    send(b, a, 'hello a');
    await settle();
    assert.deepEqual(
      b.got.map((m) => [m.peerId, new TextDecoder().decode(m.payload)]),
      [[a.agent.id, 'hello b']],
    );
    assert.deepEqual(
      a.got.map((m) => [m.peerId, new TextDecoder().decode(m.payload)]),
      [[b.agent.id, 'hello a']],
    );
    assert.ok(a.agent.netmap!.relay?.enabled, 'the netmap says the relay is there');
    assert.ok(a.agent.netmap!.peers[0]!.relay, 'and that the peer can be relayed');
  });

  it('does not let a single datagram through to another project or to a node the policy hides', async () => {
    const ops = await join('r2', 'ops', ['tag:ops']);
    const fw = await join('r2', 'fw', ['tag:firewall']);
    const m1 = await join('r2', 'm1', ['tag:machine']);
    const stranger = await join('r3', 'stranger');
    await t.admin.call('setPolicy', {
      project: 'r2',
      policy:
        '{"tagOwners":{"tag:ops":[],"tag:firewall":[],"tag:machine":[]},"acls":[{"action":"accept","src":["tag:ops"],"dst":["tag:firewall:22"]}]}',
    });
    await settle();
    send(stranger, ops, 'from another project');
    send(ops, stranger, 'to another project');
    send(m1, ops, 'hidden by policy');
    send(ops, m1, 'hidden by policy');
    send(ops, fw, 'allowed');
    await settle();
    assert.deepEqual(ops.got, []);
    assert.deepEqual(m1.got, []);
    assert.deepEqual(stranger.got, []);
    assert.deepEqual(
      fw.got.map((m) => new TextDecoder().decode(m.payload)),
      ['allowed'],
    );
    const counted = await t.c.metrics.relayPackets.get();
    assert.equal(
      counted.values.find((v) => v.labels.result === 'denied')?.value,
      4,
      'four datagrams denied and counted',
    );
  });

  it('refuses an unsigned relay stream', async () => {
    const a = new SimAgent(t.url, t.fingerprint);
    a.client.nodeId = 'nonexistent';
    const stream = await a.client.relay();
    const status = await new Promise<grpc.StatusObject>((resolve) => {
      stream.on('status', resolve);
      stream.on('error', () => {});
    });
    assert.equal(status.code, 16);
    a.close();
  });
});
