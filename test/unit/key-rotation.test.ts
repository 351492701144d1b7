import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { StateDir } from '../../agent/control/identity.js';
import {
  type KeyPair,
  NodeKeyRotator,
  parseKeyLifetime,
  type RotationSteps,
  rotateOnce,
  rotationDelay,
} from '../../agent/control/key-rotation.js';
import { State } from '../../coordinator/state/state.js';
import { openStore } from '../../coordinator/store/db.js';
import { encodeWgKey, generateNodeKey, nodePublicKey } from '../../proto/keys.js';

const dir = mkdtempSync(join(tmpdir(), 'meshgate-rotation-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const poll = () => {
      if (cond()) resolve();
      else if (Date.now() > end) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(poll, 10);
    };
    poll();
  });
}

const newPair = (): KeyPair => {
  const secret = generateNodeKey().secretKey;
  return { secret, public: nodePublicKey(secret) };
};

describe('node key lifetime', () => {
  it('reads durations, and 0 or off as never', () => {
    assert.equal(parseKeyLifetime('24h'), 86_400_000);
    assert.equal(parseKeyLifetime('3s'), 3000);
    assert.equal(parseKeyLifetime('off'), 0);
    assert.equal(parseKeyLifetime('0'), 0);
    assert.throws(() => parseKeyLifetime('500ms'), /shorter than 1s/);
    assert.throws(() => parseKeyLifetime('soon'), /invalid duration "soon".*or "off"/);
  });

  it('falls due within the last tenth of the lifetime, at once when overdue', () => {
    const day = 86_400_000;
    assert.equal(rotationDelay(0, day, 0, 0), day);
    assert.equal(rotationDelay(0, day, 0, 0.999999), Math.round(day * (1 - 0.0999999)));
    assert.equal(rotationDelay(0, day, 3600_000, 0), day - 3600_000);
    assert.equal(rotationDelay(0, day, 2 * day, 0.5), 0);
    const spread = new Set(Array.from({ length: 20 }, (_, i) => rotationDelay(0, day, 0, i / 20)));
    assert.equal(spread.size, 20, 'agents with the same key age fall due at different times');
  });
});

describe('scheduled rotation', () => {
  it('rotates an old key in order (coordinator, file, interface), waits while offline, retries a refusal', async () => {
    const calls: string[] = [];
    let ready = false;
    let refuse = true;
    let created = Date.now() - 10_000;
    const rotated: KeyPair[] = [];
    const failures: string[] = [];
    const rotator = new NodeKeyRotator({
      lifetimeMs: 1000,
      createdAt: () => created,
      ready: () => ready,
      steps: {
        generate: () => {
          calls.push('generate');
          return newPair();
        },
        accept: async () => {
          calls.push('accept');
          if (refuse) throw new Error('refused');
        },
        save: () => {
          calls.push('save');
          created = Date.now();
        },
        use: async () => {
          calls.push('use');
        },
      },
      onRotated: (p) => rotated.push(p),
      onFailed: (e) => failures.push(e.message),
    });
    rotator.start();
    try {
      await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(calls, [], 'nothing happens while the coordinator is unreachable');
      ready = true;
      await until('the refused attempt', () => failures.length === 1);
      assert.deepEqual(calls, ['generate', 'accept'], 'a refused key is never saved nor used');
      refuse = false;
      await until('a rotation', () => rotated.length === 1);
      assert.deepEqual(calls.slice(2), ['generate', 'accept', 'save', 'use']);
      await until('the next rotation, a lifetime later', () => rotated.length === 2);
    } finally {
      await rotator.stop();
    }
  });

  it('rotates a young key at once when asked (the coordinator says it is too old)', async () => {
    const rotated: KeyPair[] = [];
    const rotator = new NodeKeyRotator({
      lifetimeMs: 86_400_000,
      createdAt: () => Date.now(),
      ready: () => true,
      steps: { generate: newPair, accept: async () => {}, save: () => {}, use: async () => {} },
      onRotated: (p) => rotated.push(p),
      onFailed: () => {},
    });
    rotator.start();
    try {
      rotator.rotateNow();
      await until('the rotation', () => rotated.length === 1, 1000);
    } finally {
      await rotator.stop();
    }
  });

  it('does nothing with lifetime 0', async () => {
    let asked = false;
    const rotator = new NodeKeyRotator({
      lifetimeMs: 0,
      createdAt: () => 0,
      ready: () => {
        asked = true;
        return true;
      },
      steps: {} as RotationSteps,
      onRotated: () => {},
      onFailed: () => {},
    });
    rotator.start();
    await new Promise((r) => setTimeout(r, 50));
    await rotator.stop();
    assert.equal(asked, false);
  });
});

describe('a crash during a rotation', () => {
  /** A real coordinator state and an agent state dir; `register` is what the agent does on every start. */
  async function setup(name: string) {
    const store = await openStore({ url: join(dir, `${name}.db`) });
    const state = await State.load(store.db, { ephemeralTimeoutMs: 60_000 });
    await state.createProject('test', 'p');
    const stateDir = new StateDir(join(dir, name));
    const { key } = await state.keys.createAuthKey('test', {
      project: 'p',
      reusable: true,
      ephemeral: false,
      expiresInMs: 60_000,
      tags: [],
      reason: '',
    });
    const register = async () => {
      const id = stateDir.load();
      const { node } = await state.register({
        authKey: key,
        machineKey: Buffer.from(id.machine.publicKey).toString('hex'),
        nodeKey: encodeWgKey(id.nodePublic),
        hostname: 'h',
        os: 'linux',
        version: '1',
        requestedTags: [],
        endpoints: [],
        advertisedRoutes: [],
      });
      return node;
    };
    const node = await register();
    const steps = (crashAt: 'save' | 'use'): RotationSteps => ({
      generate: newPair,
      accept: async (pub) => {
        await state.rotateNodeKey(node.id, encodeWgKey(pub));
      },
      save: (secret) => {
        if (crashAt === 'save') throw new Error('crash');
        stateDir.saveNodeKey(secret);
      },
      use: async () => {
        throw new Error('crash');
      },
    });
    const close = async () => {
      await state.close();
      await store.close();
    };
    return { state, stateDir, node, register, steps, close };
  }

  it('after the coordinator took the key but before node.key was replaced: the restart brings both back to the old key', async () => {
    const t = await setup('before-save');
    try {
      const old = encodeWgKey(t.stateDir.load().nodePublic);
      await assert.rejects(rotateOnce(t.steps('save')), /crash/);
      assert.notEqual(t.state.getNode(t.node.id)?.nodeKey, old, 'the coordinator took the new key');
      const after = await t.register();
      assert.equal(encodeWgKey(t.stateDir.load().nodePublic), old);
      assert.equal(after.nodeKey, old, 'coordinator and node.key agree again');
    } finally {
      await t.close();
    }
  });

  it('after node.key was replaced but before the interface switched: the restart uses the new key the coordinator has', async () => {
    const t = await setup('before-use');
    try {
      const old = encodeWgKey(t.stateDir.load().nodePublic);
      await assert.rejects(rotateOnce(t.steps('use')), /crash/);
      const onDisk = encodeWgKey(t.stateDir.load().nodePublic);
      assert.notEqual(onDisk, old);
      assert.equal(t.state.getNode(t.node.id)?.nodeKey, onDisk);
      assert.equal((await t.register()).nodeKey, onDisk);
    } finally {
      await t.close();
    }
  });

  it('a key the coordinator refuses leaves node.key and its age alone', async () => {
    const t = await setup('refused');
    try {
      const before = t.stateDir.load().nodeSecret;
      const age = t.stateDir.nodeKeyCreatedAt();
      await assert.rejects(
        rotateOnce({
          ...t.steps('use'),
          accept: async () => {
            throw new Error('node key is already used by another node');
          },
        }),
        /already used/,
      );
      assert.deepEqual(t.stateDir.load().nodeSecret, before);
      assert.equal(t.stateDir.nodeKeyCreatedAt(), age);
    } finally {
      await t.close();
    }
  });
});
