// Two agents whose direct UDP path is blocked talk through the coordinator's
// relay; once the block is lifted they find the direct path again.
import assert from 'node:assert/strict';
import { after, before, describe } from 'node:test';
import { TOOLS } from './harness/datacenter.js';
import { buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

describe('relay', { skip: suiteSkip(TOOLS) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'a', 'b']);
    await lab.startCoordinator('coord', addr.coord!);
    // The router drops every UDP datagram between a and b; TCP to the coordinator still flows.
    await lab.topo.exec('net', 'nft', ['-f', '-'], {
      input: `table inet block {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  ip saddr { ${addr.a}, ${addr.b} } ip daddr { ${addr.a}, ${addr.b} } meta l4proto udp drop\n }\n}\n`,
    });
  });
  after(async () => {
    printLogsIfFailed();
    await lab.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  step('blocked direct UDP: ping and ssh over the mesh go through the relay', async () => {
    const key = lab.authKey('rel', { reusable: true });
    lab.startAgent('a', 'a', { keyFile: key });
    lab.startAgent('b', 'b', { keyFile: key });
    await lab.waitForPeer('a', 'b');
    const ipB = await lab.meshIp('b');
    await until(
      'ping a -> b through the relay',
      async () => {
        await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', ipB]);
        return true;
      },
      30_000,
    );
    const s = await lab.status('a');
    assert.equal(s.peers.find((p) => p.name === 'b')!.path, 'relay');
    await lab.startSshd('b');
    assert.equal(await lab.meshSsh('a', 'a', 'b'), 0, 'meshgate ssh b through the relay');
  });

  step('unblocked: both switch to the direct path, visible in meshgate status', async () => {
    await lab.topo.exec('net', 'nft', ['delete', 'table', 'inet', 'block']);
    await until(
      'a and b direct',
      async () => {
        const [a, b] = [await lab.status('a'), await lab.status('b')];
        return a.peers[0]?.path === 'direct' && b.peers[0]?.path === 'direct';
      },
      90_000,
      1000,
    );
    const ipB = await lab.meshIp('b');
    await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '2', ipB]);
    assert.match(
      (await lab.status('a')).peers[0]!.endpoint,
      /^203\.0\.113\./,
      'a reaches b at its own address',
    );
  });
});
