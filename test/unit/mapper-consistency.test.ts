// Whatever happens to a project, every stream's netmap, as its agent builds
// it from the messages, must be the netmap a stream opened now would get: a
// seeded random run of presence and endpoint changes, renames, tag changes,
// nodes added and deleted, policies set and removed, streams opened again,
// in every netmap form (full, implied, shared), checked after every flush.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Mapper } from '../../coordinator/mapper/mapper.js';
import type { NodeRecord } from '../../coordinator/state/records.js';
import { State } from '../../coordinator/state/state.js';
import { openStore, type Store } from '../../coordinator/store/db.js';
import type { NetMap } from '../../proto/gen/meshgate/v1/types_pb.js';
import { type RecordingOptions, RecordingSession, testMapperOptions } from '../fixtures/mapper.js';
import { registerTestNode } from '../fixtures/nodes.js';

type Form = 'full' | 'implied' | 'shared';

const FORMS: Record<Form, RecordingOptions> = {
  full: {},
  implied: { implied: true },
  shared: { implied: true, shared: true },
};

/** A small deterministic generator, so that a failure can be run again. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

const TAGS = ['tag:a', 'tag:b', 'tag:c'];
const POLICIES = [
  '',
  JSON.stringify({
    tagOwners: { 'tag:a': [], 'tag:b': [], 'tag:c': [] },
    acls: [{ action: 'accept', src: ['tag:a'], dst: ['tag:b:*'] }],
  }),
  JSON.stringify({
    tagOwners: { 'tag:a': [], 'tag:b': [], 'tag:c': [] },
    acls: [
      { action: 'accept', src: ['tag:a', 'tag:c'], dst: ['tag:c:22'] },
      { action: 'accept', src: ['tag:b'], dst: ['tag:b:*', 'tag:a:443'] },
    ],
  }),
  JSON.stringify({
    tagOwners: { 'tag:a': [], 'tag:b': [], 'tag:c': [] },
    acls: [
      { action: 'accept', src: ['tag:a'], dst: ['tag:c:*'] },
      { action: 'accept', src: ['autogroup:member'], dst: ['autogroup:self:*'] },
    ],
  }),
];

const OPTIONS = testMapperOptions();

for (const [title, seed, busy] of [
  ['whatever the project goes through', 20261127, false],
  ['also when flushes are sliced, changes arrive during them and full netmaps wait their turn', 7, true],
] as const)
  describe(`every stream, ${title}`, () => {
    let store: Store;
    let state: State;
    let mapper: Mapper;
    let reference: Mapper;

    before(async () => {
      store = await openStore({ url: ':memory:' });
      state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
      // Busy: one session per turn of the event loop, one full netmap in flight at a time.
      mapper = new Mapper(state, busy ? { ...OPTIONS, sliceMs: 0, fullNetmapBudget: 1 } : OPTIONS);
      reference = new Mapper(state, OPTIONS);
      await state.createProject('test', 'p');
    });
    after(async () => {
      mapper.close();
      reference.close();
      await store.close();
    });

    /** Until the mapper has handed everything to the streams. */
    const settle = async () => {
      mapper.flush();
      while (!mapper.idle) {
        await new Promise((r) => setImmediate(r));
        mapper.flush();
      }
    };

    /** Peers (in a stable order) and packet filter: what the agent configures. */
    const view = (m: NetMap | null) => ({
      peers: [...(m?.peers ?? [])].sort((x, y) => x.id.localeCompare(y.id)),
      packetFilter: m?.packetFilter,
    });

    it('has the netmap a new stream would get, in every form, after every flush', async () => {
      const rnd = random(seed);
      const pick = <T>(list: readonly T[]): T => list[Math.floor(rnd() * list.length)]!;
      const nodes: NodeRecord[] = [];
      const agents = new Map<string, { session: RecordingSession; form: Form }>();
      let n = 0;
      const add = async () => {
        const tags = rnd() < 0.15 ? [] : [pick(TAGS)];
        nodes.push(
          await registerTestNode(state, {
            project: 'p',
            name: `n${n++}`,
            tags,
            endpoints: ['192.0.2.1:41641'],
          }),
        );
      };
      const connect = (id: string) => {
        const form = pick(['full', 'implied', 'shared', 'shared'] as const);
        const session = new RecordingSession(id, { ...FORMS[form], slow: busy });
        agents.set(id, { session, form });
        mapper.attach(session);
      };
      for (let i = 0; i < 60; i++) await add();
      await settle();
      for (const node of nodes) if (rnd() < 0.9) connect(node.id);

      for (let round = 0; round < 40; round++) {
        const ops = 1 + Math.floor(rnd() * 30);
        // Half the rounds only change presence and endpoints and open streams:
        // the compressed peers of a group then outlive the round.
        const presenceOnly = rnd() < 0.5;
        for (let k = 0; k < ops; k++) {
          const node = pick(nodes);
          const r = presenceOnly ? (rnd() < 0.8 ? rnd() * 0.55 : 0.9) : rnd();
          if (r < 0.45) state.setOnline(node.id, rnd() < 0.5);
          else if (r < 0.55)
            await state.updateEndpoints(node.id, [`198.51.100.${Math.floor(rnd() * 250)}:41641`]);
          else if (r < 0.62) await state.renameNode('test', node.id, 'p', `r${n++}`);
          else if (r < 0.7) await state.setNodeTags('test', node.id, 'p', rnd() < 0.2 ? [] : [pick(TAGS)]);
          else if (r < 0.75) await add();
          else if (r < 0.8 && nodes.length > 20) {
            await state.deleteNode('test', node.id);
            nodes.splice(nodes.indexOf(node), 1);
            agents.delete(node.id);
          } else if (r < 0.87) await state.setPolicy('test', 'p', pick(POLICIES));
          else if (r < 0.95) connect(node.id);
          else mapper.flush();
          // Let a sliced flush take a step between changes.
          if (busy && rnd() < 0.5) await new Promise((r) => setImmediate(r));
        }
        await settle();
        for (const [id, { session, form }] of agents) {
          if (session.closed) continue;
          const want = new RecordingSession(id);
          reference.attach(want);
          assert.deepEqual(view(session.map), view(want.map), `round ${round}: node ${id} (${form})`);
        }
      }
    });
  });
