// `meshgate agent`: run the node daemon.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import YAML from 'yaml';
import { z } from 'zod';
import { DEFAULT_NODE_KEY_LIFETIME_MS, parseKeyLifetime } from '../../agent/control/key-rotation.js';
import { AgentError } from '../../agent/control/session.js';
import { Agent } from '../../agent/daemon.js';
import { MissingToolError } from '../../agent/dataplane/exec.js';
import { createAgentLogger } from '../../agent/log.js';
import { parseCoordinatorUrl } from '../../proto/dial.js';
import { CliError } from '../errors.js';

export const DEFAULT_AGENT_SOCKET = '/run/meshgate/agent.sock';

const AgentConfig = z
  .object({
    coordinator: z.string().min(1, 'a coordinator address is required (--coordinator grpcs://HOST:PORT)'),
    authKey: z.string().optional(),
    authKeyFile: z.string().optional(),
    fingerprint: z.string().optional(),
    hostname: z.string().optional(),
    stateDir: z.string().default('/var/lib/meshgate-agent'),
    interface: z
      .string()
      .regex(/^[A-Za-z0-9_.-]{1,15}$/, 'interface names have 1-15 letters, digits, _ . -')
      .default('meshgate0'),
    listenPort: z.coerce.number().int().min(1).max(65535).optional(),
    backend: z.enum(['auto', 'kernel', 'wireguard-go']).default('auto'),
    lockdownSsh: z.boolean().default(false),
    lockdownPorts: z.array(z.coerce.number().int().min(1).max(65535)).default([22]),
    lockdownWhenRevoked: z.enum(['keep', 'release']).default('keep'),
    advertiseTags: z.array(z.string()).default([]),
    advertiseRoutes: z.array(z.string()).default([]),
    socket: z.string().default(DEFAULT_AGENT_SOCKET),
    logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
    logFormat: z.enum(['auto', 'json', 'text']).default('auto'),
    nodeKeyLifetime: z
      .union([z.string(), z.number()])
      .optional()
      .transform((v, ctx) => {
        if (v === undefined) return DEFAULT_NODE_KEY_LIFETIME_MS;
        try {
          return parseKeyLifetime(String(v));
        } catch (err) {
          ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
          return z.NEVER;
        }
      }),
  })
  .strict();

const csv = (v: string) =>
  v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);

function readAuthKeyFile(path: string): string {
  let mode: number;
  try {
    mode = statSync(path).mode;
  } catch {
    throw new AgentError(`cannot read auth key file ${path}`);
  }
  if (mode & 0o077)
    throw new AgentError(
      `auth key file ${path} is readable by group or others: run "chmod 600 ${path}" (and consider the key leaked)`,
    );
  return readFileSync(path, 'utf8').trim();
}

function preflight(backend: string): void {
  if (process.getuid?.() !== 0)
    throw new CliError('meshgate agent must run as root: it configures WireGuard, routes and nftables');
  const onPath = (tool: string) =>
    (process.env.PATH ?? '').split(':').some((d) => d && existsSync(join(d, tool)));
  for (const tool of ['wg', 'ip', 'nft', ...(backend === 'wireguard-go' ? ['wireguard-go'] : [])]) {
    if (!onPath(tool)) throw new MissingToolError(tool);
  }
}

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
    .option('--config <file>', 'YAML file with the same settings (camelCase keys)')
    .option('--socket <path>', `local API socket (default ${DEFAULT_AGENT_SOCKET})`)
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
      let fromFile: Record<string, unknown> = {};
      if (typeof o.config === 'string') {
        try {
          fromFile = (YAML.parse(readFileSync(o.config, 'utf8')) as Record<string, unknown>) ?? {};
        } catch (err) {
          throw new CliError(`cannot read ${o.config}: ${(err as Error).message.split('\n')[0]}`);
        }
      }
      const flags = Object.fromEntries(
        Object.entries({
          coordinator: o.coordinator ?? process.env.MESHGATE_COORDINATOR,
          authKey: o.authKey,
          authKeyFile: o.authKeyFile,
          fingerprint: o.fingerprint ?? process.env.MESHGATE_FINGERPRINT,
          hostname: o.hostname,
          stateDir: o.stateDir,
          interface: o.interface,
          listenPort: o.listenPort,
          backend: o.backend,
          lockdownSsh: o.lockdownSsh,
          lockdownPorts: typeof o.lockdownPorts === 'string' ? csv(o.lockdownPorts) : undefined,
          lockdownWhenRevoked: o.lockdownWhenRevoked,
          advertiseTags: typeof o.advertiseTags === 'string' ? csv(o.advertiseTags) : undefined,
          advertiseRoutes: typeof o.advertiseRoutes === 'string' ? csv(o.advertiseRoutes) : undefined,
          socket: o.socket,
          logLevel: o.logLevel,
          logFormat: o.logFormat,
          nodeKeyLifetime: o.nodeKeyLifetime,
        }).filter(([, v]) => v !== undefined),
      );
      const merged = { ...fromFile, ...flags };
      if (!merged.coordinator)
        throw new CliError(
          'no coordinator given: pass --coordinator grpcs://HOST:PORT, set MESHGATE_COORDINATOR, or put coordinator: in the --config file',
        );
      const parsed = AgentConfig.safeParse(merged);
      if (!parsed.success) {
        const issue = parsed.error.issues[0]!;
        throw new CliError(`${issue.path.join('.') || 'configuration'}: ${issue.message}`);
      }
      const c = parsed.data;
      // Every address now, not when the agent first fails over to a mistyped one.
      for (const url of c.coordinator.split(',')) {
        try {
          parseCoordinatorUrl(url.trim());
        } catch (err) {
          throw new CliError((err as Error).message);
        }
      }
      preflight(c.backend);
      // A key readable by others is refused at once, not found out at the next registration.
      if (c.authKeyFile && existsSync(c.authKeyFile)) readAuthKeyFile(c.authKeyFile);
      const authKey = () => {
        const key = c.authKeyFile
          ? readAuthKeyFile(c.authKeyFile)
          : (c.authKey ?? process.env.MESHGATE_AUTH_KEY ?? '');
        if (!key)
          throw new AgentError('this machine has not joined yet: give an auth key with --auth-key-file');
        return key;
      };
      const log = createAgentLogger(c.logLevel, c.logFormat);
      const agent = new Agent({
        coordinator: c.coordinator,
        fingerprint: c.fingerprint,
        authKey,
        authKeyFile: c.authKeyFile,
        lockdownWhenRevoked: c.lockdownWhenRevoked,
        hostname: c.hostname,
        stateDir: c.stateDir,
        interfaceName: c.interface,
        listenPort: c.listenPort,
        backend: c.backend,
        lockdownPorts: c.lockdownSsh ? c.lockdownPorts : [],
        advertiseTags: c.advertiseTags,
        advertiseRoutes: c.advertiseRoutes,
        socket: c.socket,
        log,
        nodeKeyLifetimeMs: c.nodeKeyLifetime,
      });
      const stop = () => void agent.stop();
      process.once('SIGTERM', stop);
      process.once('SIGINT', stop);
      try {
        await agent.start();
      } catch (err) {
        await agent.stop();
        throw err;
      }
      await agent.wait();
    });
}
