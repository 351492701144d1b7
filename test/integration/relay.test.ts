// The relay forwards datagrams only between nodes that may see each other.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { dial } from '../../proto/dial.js';
import {
  ControlService,
  type RelayRequest,
  RelayRequestSchema,
  type RelayResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import { makeClient, methodPath } from '../../proto/grpc.js';
import { generateMachineKey } from '../../proto/keys.js';
import { SIG_NODE_ID, signCall } from '../../proto/signing.js';
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
  const texts = (e: RelayEnd) =>
    e.got.map((m) => new TextDecoder().decode(m.payload)).filter((x) => x !== 'probe');
  /** Resolves when `pred` holds, checked every 10 ms, or fails after `ms`. */
  const until = async (what: string, pred: () => boolean | Promise<boolean>, ms = 3000) => {
    const deadline = Date.now() + ms;
    while (!(await pred())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  /**
   * The hub attaches a stream before it reads from it, so only the receiver can be missing:
   * probes go out until one arrives. Tests ignore probes that arrive late.
   */
  const linked = async (from: RelayEnd, to: RelayEnd) => {
    const arrived = () => to.got.some((m) => new TextDecoder().decode(m.payload) === 'probe');
    await until(`${to.agent.id} on the relay`, () => {
      if (!arrived()) send(from, to, 'probe');
      return arrived();
    });
  };
  const denied = async () =>
    (await t.c.metrics.relayPackets.get()).values.find((v) => v.labels.result === 'denied')?.value ?? 0;

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
    await linked(a, b);
    await linked(b, a);
    send(a, b, 'hello b');
    send(b, a, 'hello a');
    await until('both datagrams', () => texts(a).length > 0 && texts(b).length > 0);
    assert.deepEqual(texts(b), ['hello b']);
    assert.deepEqual(texts(a), ['hello a']);
    assert.ok(
      b.got.every((m) => m.peerId === a.agent.id) && a.got.every((m) => m.peerId === b.agent.id),
      'every datagram names its sender',
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
    await linked(ops, fw);
    const deniedBefore = await denied();
    send(stranger, ops, 'from another project');
    send(ops, stranger, 'to another project');
    send(m1, ops, 'hidden by policy');
    send(ops, m1, 'hidden by policy');
    send(ops, fw, 'allowed');
    // A denial is decided when the datagram arrives: once all four are counted, none can follow.
    await until('four denials and the allowed datagram', async () => {
      return (await denied()) - deniedBefore >= 4 && texts(fw).length > 0;
    });
    assert.equal((await denied()) - deniedBefore, 4, 'four datagrams denied and counted');
    assert.deepEqual(texts(ops), []);
    assert.deepEqual(texts(m1), []);
    assert.deepEqual(texts(stranger), []);
    assert.deepEqual(texts(fw), ['allowed']);
  });

  const refusal = (stream: grpc.ClientDuplexStream<RelayRequest, RelayResponse>) =>
    new Promise<grpc.StatusObject>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the relay stream was not refused')), 3000);
      stream.on('status', (s: grpc.StatusObject) => {
        clearTimeout(timer);
        resolve(s);
      });
      stream.on('error', () => {});
      stream.on('data', () => {});
    });

  it('refuses a relay stream signed for a node id that does not exist', async () => {
    const a = new SimAgent(t.url, t.fingerprint);
    a.client.nodeId = 'nonexistent';
    const status = await refusal(await a.client.relay());
    assert.equal(status.code, grpc.status.UNAUTHENTICATED);
    assert.match(status.details, /unknown node/);
    a.close();
  });

  it('takes a relay stream for a real node only with that node’s signature', async () => {
    const a = await join('r4', 'a');
    const b = await join('r4', 'b');
    await linked(b, a);
    const endpoint = await dial(t.url, { fingerprint: t.fingerprint });
    const client = makeClient(ControlService, endpoint.target, endpoint.credentials);
    const open = (md: grpc.Metadata) =>
      // biome-ignore lint/suspicious/noExplicitAny: generic client methods are untyped
      (client as any).relay(md) as grpc.ClientDuplexStream<RelayRequest, RelayResponse>;
    try {
      const unsigned = new grpc.Metadata();
      unsigned.set(SIG_NODE_ID, a.agent.id);
      const first = await refusal(open(unsigned));
      assert.equal(first.code, grpc.status.UNAUTHENTICATED);
      assert.match(first.details, /not signed/);

      const forged = new grpc.Metadata();
      const relayPath = methodPath(ControlService, ControlService.method.relay);
      const headers = signCall(generateMachineKey().secretKey, relayPath, a.agent.id, new Uint8Array());
      for (const [k, v] of Object.entries(headers)) forged.set(k, v);
      const second = await refusal(open(forged));
      assert.equal(second.code, grpc.status.UNAUTHENTICATED);
      assert.match(second.details, /another machine key/);

      send(b, a, 'still mine');
      await until('the datagram at the real node', () => texts(a).includes('still mine'));
    } finally {
      client.close();
    }
  });
});
