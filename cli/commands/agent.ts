// `meshgate agent`: the command line of the node daemon. What runs it is in
// agent-run.ts, loaded only when the command runs: its imports (the daemon,
// the config schema) would slow the start of every other command.
import type { Command } from 'commander';

export const DEFAULT_AGENT_SOCKET = '/run/meshgate/agent.sock';

export function registerAgentCommand(program: Command): void {
  program
    .command('agent')
    .description('run the node daemon: join the mesh and keep WireGuard and nftables in sync')
    .option(
      '--coordinator <url>',
      'coordinator address, grpcs://HOST:PORT; several coordinators of one database: comma-separated (env MESHGATE_COORDINATOR)',
    )
    .option(
      '--auth-key-file <file>',
      'file (0600) with the auth key; only needed until the machine has joined',
    )
    .option(
      '--auth-key <key>',
      'the auth key itself; prefer --auth-key-file or MESHGATE_AUTH_KEY, argv is visible to other users',
    )
    .option('--fingerprint <sha256:hex>', 'pin the coordinator TLS key (env MESHGATE_FINGERPRINT)')
    .option('--hostname <name>', 'node name to ask for (default: the host name)')
    .option(
      '--state-dir <dir>',
      'keys, node identity and the cached netmap (default /var/lib/meshgate-agent)',
    )
    .option('--interface <name>', 'WireGuard interface name (default meshgate0)')
    .option('--listen-port <port>', 'WireGuard UDP port (default derived from the machine key, 41641-42640)')
    .option(
      '--backend <backend>',
      'auto, kernel or wireguard-go (default auto: kernel when the module exists)',
    )
    .option('--lockdown-ssh', 'once the mesh is up, drop TCP 22 on every interface but lo and the mesh')
    .option('--lockdown-ports <ports>', 'ports for --lockdown-ssh (default 22)')
    .option(
      '--lockdown-when-revoked <keep|release>',
      'when an admin expires or deletes the node, or on meshgate down: keep the lockdown (fail closed, default) or release it',
    )
    .option('--advertise-tags <tags>', 'comma-separated tags to ask for (the auth key must allow them)')
    .option('--advertise-routes <cidrs>', 'comma-separated subnets to offer; an admin approves them')
    .option(
      '--node-key-lifetime <duration>',
      'rotate the WireGuard node key when it is this old, e.g. 24h (default), 7d; 0 or off: never',
    )
    .option(
      '--auto-update',
      'install the release the coordinator names for this node and restart into it (env MESHGATE_AUTO_UPDATE=true)',
    )
    .option(
      '--release-key <key|file>',
      'release public key (ed25519:BASE64, or a file with it) that updates must be signed with (env MESHGATE_RELEASE_KEY)',
    )
    .option(
      '--install-prefix <dir>',
      `where install.sh put the releases, PREFIX/VERSION and PREFIX/current (default /opt/meshgate; env MESHGATE_OPT_DIR)`,
    )
    .option(
      '--releases-url <url>',
      "the coordinator's HTTPS port for release downloads (default https://COORDINATOR-HOST:7480)",
    )
    .option(
      '--update-timeout <duration>',
      'an update that has not reached the coordinator after this long is rolled back (default 2m)',
    )
    .option('--config <file>', 'YAML file with the same settings (camelCase keys)')
    .option('--socket <path>', `local API socket (default ${DEFAULT_AGENT_SOCKET})`)
    .option(
      '--operator <user|:group>',
      'let this non-root user (or :group) use meshgate status, ping and ssh (env MESHGATE_OPERATOR)',
    )
    .option('--log-level <level>', 'trace, debug, info, warn, error (default info)')
    .option(
      '--log-format <format>',
      'json, text, or auto (default): text on a terminal, JSON otherwise (systemd)',
    )
    .addHelpText(
      'after',
      `
The first start registers the machine with the auth key; the state dir then
holds its identity, so later starts (every boot) need no valid key: a spent
single-use key in --auth-key-file is fine. While the coordinator is away the
mesh keeps running from the cached netmap.

Example (what install.sh runs under systemd):
  meshgate agent --coordinator grpcs://coord.example:7443 \\
    --fingerprint sha256:… --auth-key-file /etc/meshgate/authkey --lockdown-ssh`,
    )
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const { runAgent } = await import('./agent-run.js');
      await runAgent(o);
    });

  program
    .command('update-watchdog', { hidden: true })
    .description('rolls a self-update back when the new release does not reach the coordinator in time')
    .requiredOption('--state-dir <dir>', 'the agent state dir')
    .requiredOption('--install-prefix <dir>', 'PREFIX of PREFIX/current')
    .requiredOption('--to <version>', 'the release being started')
    .action(async (o: { stateDir: string; installPrefix: string; to: string }) => {
      const { runUpdateWatchdog } = await import('./agent-run.js');
      await runUpdateWatchdog(o);
    });
}
