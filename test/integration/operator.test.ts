// The agent's local API with an operator: real unprivileged users run the
// real CLI against it. The operator reads the status (status, ping, ssh);
// down stays root's; anyone else is refused on both sockets.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { operatorSocketPath, resolveOperator } from '../../agent/localapi/operator.js';
import { type LocalApi, startLocalApi } from '../../agent/localapi/server.js';
import type { AgentStatus } from '../../agent/localapi/types.js';
import { BIN, buildOnce } from '../e2e/harness/mesh.js';
import { suiteSkip } from '../e2e/harness/tools.js';

const NOBODY = 65534;
/** A uid with no account and no rights on either socket. */
const STRANGER = 54321;

const status = {
  self: { id: 'n1', name: 'laptop', project: 'dc1', ipAddresses: ['100.64.0.9'], tags: [] },
  state: { kind: 'connected', detail: '', message: 'joined and connected' },
  // 127.0.0.1 so that `meshgate ping` has something to reach from this host.
  peers: [{ id: 'p1', name: 'fw1', ipAddresses: ['127.0.0.1'], tags: [], online: true }],
} as unknown as AgentStatus;

function runAs(uid: number, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      'setpriv',
      [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', '--', process.execPath, BIN, ...args],
      { timeout: 30_000, env: { ...process.env, HOME: '/nonexistent' } },
      (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

describe('agent --operator', { skip: suiteSkip(['setpriv', 'getent', 'ping', 'ssh']) }, () => {
  let dir: string;
  let socket: string;
  let api: LocalApi;
  let downs = 0;

  before(async () => {
    buildOnce();
    dir = mkdtempSync(join(tmpdir(), 'meshgate-operator-'));
    chmodSync(dir, 0o755);
    socket = join(dir, 'agent.sock');
    api = await startLocalApi(
      socket,
      {
        status: async () => status,
        down: async () => {
          downs++;
        },
        up: async () => {},
        logout: async () => {},
        metrics: () => '',
      },
      resolveOperator('nobody'),
    );
  });
  after(async () => {
    await api?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('names the user or group and refuses root and unknown names', () => {
    assert.deepEqual(resolveOperator('nobody'), { kind: 'user', name: 'nobody', uid: NOBODY, gid: NOBODY });
    assert.deepEqual(resolveOperator(':nogroup'), { kind: 'group', name: 'nogroup', gid: NOBODY });
    assert.throws(() => resolveOperator('root'), /root has the agent socket already/);
    assert.throws(() => resolveOperator('no-such-user-here'), /no user "no-such-user-here" on this host/);
    assert.throws(() => resolveOperator('a b'), /not a user name/);
  });

  it('keeps the root socket 0600 and gives the operator a socket of its own', () => {
    const root = statSync(socket);
    const op = statSync(operatorSocketPath(socket));
    assert.equal(root.mode & 0o777, 0o600);
    assert.equal(root.uid, 0);
    assert.equal(op.mode & 0o777, 0o600);
    assert.equal(op.uid, NOBODY);
    assert.equal(operatorSocketPath(socket), join(dir, 'agent.operator.sock'));
  });

  it('lets the operator run meshgate status', async () => {
    const r = await runAs(NOBODY, ['status', '--socket', socket, '-o', 'json']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(JSON.parse(r.stdout).self.name, 'laptop');
  });

  it('lets the operator run meshgate ping and ssh, which find the peer in the status', async () => {
    const ping = await runAs(NOBODY, ['ping', 'fw1', '-c', '1', '--socket', socket]);
    assert.equal(ping.code, 0, ping.stderr);
    assert.match(ping.stdout, /1 received/);
    // ssh -V prints its version and exits: enough to see that meshgate got as far as ssh.
    const ssh = await runAs(NOBODY, ['ssh', 'fw1', '--socket', socket, '--', '-V']);
    assert.equal(ssh.code, 0, ssh.stderr);
    assert.match(ssh.stderr, /OpenSSH/);
  });

  it('keeps meshgate down for root', async () => {
    const r = await runAs(NOBODY, ['down', '--socket', socket]);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `meshgate: permission denied on ${socket}: run as root\n`);
    assert.equal(downs, 0);
  });

  it('refuses other users, and tells them about --operator', async () => {
    const r = await runAs(STRANGER, ['status', '--socket', socket]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      new RegExp(
        `^meshgate: permission denied on ${socket}: run as root, or start the agent with --operator \\S+\\n$`,
      ),
    );
  });

  it('removes the operator socket when the agent runs without an operator', async () => {
    await api.close();
    api = await startLocalApi(socket, {
      status: async () => status,
      down: async () => {},
      up: async () => {},
      logout: async () => {},
      metrics: () => '',
    });
    assert.throws(() => statSync(operatorSocketPath(socket)), /ENOENT/);
    const r = await runAs(NOBODY, ['status', '--socket', socket]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /permission denied/);
  });
});
