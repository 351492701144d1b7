// metal-stack's path through the Headscale API, end to end: a key from
// CreatePreAuthKey joins a firewall agent started as metal-stack starts it
// (--hostname <machine UUID>, --interface tailscale0), ListNodes shows it
// online with bare addresses, and DeleteNode takes it out of its peer's
// WireGuard configuration within 2 s.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import { TOOLS } from './harness/datacenter.js';
import { buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

const CALL = join(import.meta.dirname, 'harness', 'headscale-call.ts');

interface HsNode {
  id: string;
  name: string;
  online?: boolean;
  ipAddresses: string[];
  user: { name: string };
}

describe('Headscale API end to end', { skip: suiteSkip([...TOOLS, 'unshare', 'mount']) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;
  let apiKey = '';
  const project = randomUUID();
  const machine = randomUUID();
  let userId = '';

  /** Headscale's API called from the coordinator's namespace, as metal-api would. */
  async function hs<T>(method: string, req: object): Promise<T> {
    const out = await lab.topo.exec(
      'coord',
      process.execPath,
      ['--import', 'tsx', CALL, `${addr.coord}:50443`, method, JSON.stringify(req)],
      { input: apiKey, timeoutMs: 20_000 },
    );
    return JSON.parse(out) as T;
  }

  async function keyFile(ephemeral: boolean): Promise<string> {
    const expiration = new Date(Date.now() + 2 * 3_600_000).toISOString();
    const r = await hs<{ preAuthKey: { key: string } }>('CreatePreAuthKey', {
      user: userId,
      ephemeral,
      expiration,
    });
    const file = join(lab.dir, `key-${randomUUID()}`);
    writeFileSync(file, `${r.preAuthKey.key}\n`, { mode: 0o600 });
    return file;
  }

  const wgDump = (host: string, name: string) =>
    lab.topo.exec(host, 'wg', ['show', lab.agents.get(name)!.iface, 'dump']);

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'fw', 'peer']);
    await lab.startCoordinator('coord', addr.coord!, [
      '--headscale-listen',
      `${addr.coord}:50443`,
      '--headscale-insecure',
    ]);
    apiKey = lab.admin(['apikeys', 'create', '-e', '365d']).trimEnd().split('\n').pop()!;
  });
  after(async () => {
    printLogsIfFailed();
    await lab.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  step('a firewall joins with a key from CreatePreAuthKey as tailscale0 and shows up online', async () => {
    const created = await hs<{ user: { id: string } }>('CreateUser', { name: project });
    userId = created.user.id;
    lab.startAgent('peer', 'peer', { keyFile: await keyFile(false) });
    lab.startAgent('fw', machine, {
      keyFile: await keyFile(false),
      iface: 'tailscale0',
      privateWireguardDir: true,
    });
    await lab.waitForPeer('peer', machine);
    await lab.topo.exec('fw', 'ip', ['link', 'show', 'tailscale0']);
    const node = await until('ListNodes to show the firewall online', async () => {
      const r = await hs<{ nodes?: HsNode[] }>('ListNodes', { user: project });
      return r.nodes?.find((n) => n.name === machine && n.online);
    });
    assert.equal(node.user.name, project);
    assert.match(node.ipAddresses[0]!, /^100\.\d+\.\d+\.\d+$/);
    assert.match(node.ipAddresses[1]!, /^fd7a:115c:a1e0:[0-9a-f:]+$/);
    assert.equal(node.ipAddresses[0], await lab.meshIp(machine));
    await until('ping peer -> firewall over the mesh', async () => {
      await lab.topo.exec('peer', 'ping', ['-c', '1', '-W', '1', node.ipAddresses[0]!]);
      return true;
    });
  });

  step("DeleteNode removes the firewall from its peer's WireGuard config within 2 s", async () => {
    const fwKey = (await lab.status(machine)).self.nodeKey;
    assert.ok((await wgDump('peer', 'peer')).includes(fwKey), 'the peer has the firewall before');
    const { nodes } = await hs<{ nodes: HsNode[] }>('ListNodes', { user: project });
    const id = nodes.find((n) => n.name === machine)!.id;
    assert.deepEqual(await hs('DeleteNode', { nodeId: id }), {});
    // Counted from the answer: the helper's own start (a node process) is no part of the coordinator's time.
    const answered = Date.now();
    await until(
      'the peer to drop the firewall',
      async () => !(await wgDump('peer', 'peer')).includes(fwKey),
      2_000,
      50,
    );
    console.log(`# peer dropped the deleted node ${Date.now() - answered} ms after DeleteNode answered`);
    const after = await hs<{ nodes?: HsNode[] }>('ListNodes', { user: project });
    assert.deepEqual(
      (after.nodes ?? []).map((n) => n.name),
      ['peer'],
    );
  });
});
