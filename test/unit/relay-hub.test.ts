// The relay's byte budget per sending node, as the coordinator's clock moves.
import assert from 'node:assert/strict';
import { describe, it, mock } from 'node:test';
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import { Metrics } from '../../coordinator/api/metrics.js';
import { RelayHub } from '../../coordinator/api/relay.js';
import type { State } from '../../coordinator/state/state.js';
import {
  type RelayRequest,
  RelayRequestSchema,
  type RelayResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';

/** Two nodes of one project that see each other: all of State the relay asks. */
const state = {
  getNode: (id: string) => ({ id, project: 'p' }),
  compiled: () => ({ canSee: () => true }),
} as unknown as State;

const metrics = new Metrics({
  nodesOnline: () => 0,
  nodesTotal: () => 0,
  streams: () => 0,
  unsentBytes: () => ({ full: 0, deltas: 0 }),
  versionDrift: () => 0,
  apiKeyExpiries: async () => [],
});

/** A relay stream that takes everything written to it. */
const call = () =>
  ({
    writableNeedDrain: false,
    write: () => true,
    end: () => {},
  }) as unknown as grpc.ServerDuplexStream<RelayRequest, RelayResponse>;

describe('relay budget', () => {
  it('keeps the budget of a node when the wall clock is set back an hour', () => {
    const hub = new RelayHub(state, { bytesPerSecond: 1000, burstBytes: 3000 }, metrics);
    hub.attach('a', call());
    hub.attach('b', call());
    const frame = create(RelayRequestSchema, { peerId: 'b', payload: new Uint8Array(1000) });
    assert.equal(hub.forward('a', frame), 'forwarded');
    mock.timers.enable({ apis: ['Date'], now: Date.now() - 3_600_000 });
    try {
      assert.equal(hub.forward('a', frame), 'forwarded', 'the second 1,000 bytes of a 3,000-byte burst');
      assert.equal(hub.forward('a', frame), 'forwarded');
      assert.equal(hub.forward('a', frame), 'rate-limited', 'the burst is spent');
    } finally {
      mock.timers.reset();
    }
  });
});
