// The kernel WireGuard backend where it runs in production: an agent in a qemu VM that boots
// Debian's kernel (see test/e2e/vm/README.md) joins a coordinator on the host with --backend auto
// (which loads the module and picks the kernel), reaches a wireguard-go agent and is reached by
// it, follows peer changes on its kernel interface, closes sshd's public port with
// --lockdown-ssh, and, restarted with --backend kernel, keeps the interface and its peers.
// Node is slow under emulation: the VM starts the agent twice and nothing else of ours.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import type { AgentStatus } from '../../agent/localapi/types.js';
import { TOOLS } from './harness/datacenter.js';
import { buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';
import { bundleCli, VM_TOOLS, Vm, vmMissing } from './vm/vm.js';

const HOST_SIDE = '198.51.100.1';
const GUEST = '198.51.100.2';
const IFACE = 'meshgate0';
const SOCKET = '/run/meshgate-agent.sock';
const PIDFILE = '/run/meshgate-agent.pid';

function skipReason(): string | false {
  const tools = suiteSkip([...TOOLS, ...VM_TOOLS, 'curl']);
  if (tools) return tools;
  const missing = vmMissing();
  if (missing && process.env.MESHGATE_E2E === '1')
    throw new Error(`end-to-end test cannot run: ${missing}; or unset MESHGATE_E2E to skip`);
  return missing ?? false;
}

describe('kernel backend in a VM', { skip: skipReason() }, () => {
  let lab: MeshLab;
  let vm: Vm;
  let bundle: string;
  let agentArgs: string[];
  const timings: Record<string, number> = {};
  let vmMeshIp = '';

  const vmStatus = async (): Promise<AgentStatus> =>
    JSON.parse(await vm.sh(`curl -sf --max-time 10 --unix-socket ${SOCKET} http://agent/status`));

  /** Starts the agent in the VM in the background; its log goes to the run dir, readable from here. */
  const startVmAgent = (backend: string) =>
    vm.sh(
      [
        `setsid node ${bundle} agent ${agentArgs.join(' ')} --backend ${backend} \\`,
        `  >> /run/meshgate-vm/agent.log 2>&1 < /dev/null &`,
        `echo $! > ${PIDFILE}`,
      ].join('\n'),
    );

  /** sshd's banner as a client in `host` sees it on ip:22, or '' when nothing answers within 5 s. */
  const sshBanner = (host: string, ip: string) =>
    lab.topo
      .exec(host, 'timeout', ['5', 'bash', '-c', `exec 3<>/dev/tcp/${ip}/22 && head -c 7 <&3`])
      .catch(() => '');

  const vmPeers = async () =>
    (await vm.sh(`wg show ${IFACE} peers`)).split('\n').filter(Boolean).sort().join(',');

  const timed = async (name: string, fn: () => Promise<unknown>) => {
    const t0 = Date.now();
    await fn();
    timings[name] = (Date.now() - t0) / 1000;
  };

  before(async () => {
    const t0 = Date.now();
    lab = new MeshLab(new Topology());
    // star: router `net` (also the coordinator's host and the VM's gateway), agents a and b.
    await star(lab.topo, ['a', 'b']);
    vm = new Vm(lab.topo, {
      host: 'net',
      hostAddress: `${HOST_SIDE}/24`,
      guestAddress: `${GUEST}/24`,
      hostname: 'vm',
    });
    // The VM boots (emulated: the slowest part) while the host side gets ready.
    const booted = timed('boot', () => vm.start());
    booted.catch(() => {});
    buildOnce();
    bundle = await bundleCli();
    await lab.startCoordinator('net', HOST_SIDE);
    const sshd = writeSshdConfig();
    const key = lab.authKey('vmtest', { reusable: true });
    agentArgs = [
      ...['--coordinator', lab.coordinator!.url, '--fingerprint', lab.coordinator!.fingerprint],
      ...['--auth-key-file', key, '--state-dir', '/var/lib/meshgate-agent', '--interface', IFACE],
      ...['--socket', SOCKET, '--hostname', 'vm', '--lockdown-ssh', '--log-level', 'debug'],
    ];
    lab.startAgent('a', 'a', { keyFile: key });
    await booted;
    await vm.sh(`/usr/sbin/sshd -f ${sshd}`);
    timings.setup = (Date.now() - t0) / 1000;
  });

  after(async () => {
    printLogsIfFailed();
    if (failed) console.error(`${vm?.diagnostics()}\n--- agent in the VM\n${vm?.agentLog()}`);
    console.error(`kernel VM test timings (s): ${JSON.stringify(timings)}`);
    await vm?.destroy();
    await lab?.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);
  let failed = false;
  /** A step that is timed, and whose failure also prints the VM's console and the guest agent's log. */
  const vstep = (name: string, fn: () => Promise<void>) =>
    step(name, async () => {
      try {
        await timed(name, fn);
      } catch (err) {
        failed = true;
        throw err;
      }
    });

  /** Key-only sshd config for the guest; the files are the host's, seen read-only in the guest. */
  function writeSshdConfig(): string {
    const dir = lab.dir;
    const hostKey = join(dir, 'vm_host_key');
    const config = join(dir, 'vm_sshd_config');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
    writeFileSync(
      config,
      [
        'Port 22',
        `HostKey ${hostKey}`,
        `AuthorizedKeysFile ${lab.clientKey()}.pub`,
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'PermitRootLogin prohibit-password',
        'StrictModes no',
        'UsePAM no',
        'LogLevel ERROR',
        '',
      ].join('\n'),
      { mode: 0o600 },
    );
    return config;
  }

  vstep('sshd in the VM answers on its public address before the agent runs', async () => {
    assert.equal(await sshBanner('a', GUEST), 'SSH-2.0', 'sshd answers on the public address');
  });

  vstep('--backend auto: joins with a kernel interface, reaches a and is reached', async () => {
    await vm.sh("! grep -q '^wireguard ' /proc/modules");
    await startVmAgent('kernel');
    const s = await until(
      'the VM agent to see a',
      async () => {
        const st = await vmStatus();
        return st.peers.some((p) => p.name === 'a') && st;
      },
      120_000,
      1000,
    );
    assert.equal(s.interface.backend, 'kernel', '--backend auto picks the kernel where the module exists');
    const link = JSON.parse(await vm.sh(`ip -d -j link show dev ${IFACE}`));
    assert.equal(link[0].linkinfo.info_kind, 'wireguard', 'a kernel WireGuard link');
    vmMeshIp = s.self.ipAddresses[0]!;
    const aIp = await lab.meshIp('a');
    await lab.waitForPeer('a', 'vm', true, 30_000);
    await vm.until('ping vm -> a over the mesh', `ping -c 1 -W 2 ${aIp}`, 30_000);
    await until('ping a -> vm over the mesh', async () => {
      await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '2', vmMeshIp]);
      return true;
    });
  });

  vstep('--lockdown-ssh closes the public SSH port in the VM, SSH over the mesh works', async () => {
    await vm.until('the lockdown rule', `nft list table inet meshgate | grep -q 'dport 22 drop'`, 30_000);
    assert.equal(await sshBanner('a', GUEST), '', 'public SSH is closed');
    assert.equal(await sshBanner('a', vmMeshIp), 'SSH-2.0', 'sshd answers over the mesh');
  });

  vstep('a peer added, moved and removed is applied to the kernel interface', async () => {
    lab.startAgent('b', 'b', { keyFile: lab.keyFileOf('a'), extra: ['--listen-port', '41001'] });
    const nodeKey = await until('b to register', async () => (await lab.status('b')).self.nodeKey, 30_000);
    const endpoint = () => `wg show ${IFACE} endpoints | grep -F '${nodeKey}'`;
    await vm.until('b on the kernel interface', `${endpoint()} | grep -q ':41001'`, 60_000);

    await lab.stopAgent('b');
    lab.startAgent('b', 'b', { keyFile: lab.keyFileOf('a'), extra: ['--listen-port', '41002'] });
    await vm.until("b's new endpoint on the kernel interface", `${endpoint()} | grep -q ':41002'`, 60_000);

    // Stopped first: a running agent whose node is deleted joins again with its reusable key.
    await lab.stopAgent('b');
    lab.admin(['nodes', 'delete', 'b', '--project', 'vmtest']);
    await vm.until(
      'b gone from the kernel interface',
      `! wg show ${IFACE} peers | grep -qF '${nodeKey}'`,
      60_000,
    );
  });

  vstep('restarted with --backend kernel, the agent keeps the interface and its peers', async () => {
    const ifindex = async () => JSON.parse(await vm.sh(`ip -j link show dev ${IFACE}`))[0].ifindex as number;
    const before = { ifindex: await ifindex(), peers: await vmPeers() };
    await vm.sh(
      `kill $(cat ${PIDFILE}); for i in $(seq 600); do kill -0 $(cat ${PIDFILE}) 2>/dev/null || exit 0; sleep 0.1; done; exit 1`,
    );
    assert.deepEqual(
      { ifindex: await ifindex(), peers: await vmPeers() },
      before,
      'stopped: interface and peers stay',
    );
    await vm.sh(`ping -c 1 -W 2 ${await lab.meshIp('a')}`);

    await startVmAgent('kernel');
    const s = await until(
      'the restarted VM agent to connect',
      async () => {
        const st = await vmStatus();
        return st.coordinator.state === 'connected' && st.peers.some((p) => p.name === 'a') && st;
      },
      120_000,
      1000,
    );
    assert.equal(s.interface.backend, 'kernel');
    assert.deepEqual(
      { ifindex: await ifindex(), peers: await vmPeers() },
      before,
      'the same interface and peers',
    );
    await vm.sh(`ping -c 1 -W 2 ${await lab.meshIp('a')}`);
    assert.equal(await sshBanner('a', GUEST), '', 'public SSH stays closed');
  });

  vstep('meshgate status names the backend', async () => {
    const text = await lab.local('a', 'a', ['status']);
    assert.match(text, /interface\s+\S+ \(wireguard-go, udp \d+\)/);
  });
});
