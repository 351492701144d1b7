// `meshgate agent`: the daemon's configuration (flags, env, YAML) checked as a whole, then the daemon.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { DEFAULT_NODE_KEY_LIFETIME_MS, parseKeyLifetime } from '../../agent/control/key-rotation.js';
import { AgentError } from '../../agent/control/session.js';
import { Agent } from '../../agent/daemon.js';
import { MissingToolError } from '../../agent/dataplane/exec.js';
import { resolveOperator } from '../../agent/localapi/operator.js';
import { createAgentLogger } from '../../agent/log.js';
import { DEFAULT_INSTALL_PREFIX } from '../../agent/update/install.js';
import { DEFAULT_UPDATE_TIMEOUT_MS, RESTART_EXIT_CODE } from '../../agent/update/updater.js';
import { watchUpdate } from '../../agent/update/watchdog.js';
import { parseCoordinatorUrl } from '../../proto/dial.js';
import { parseDuration } from '../../proto/duration.js';
import { parsePublicKey } from '../../release/manifest.js';
import { CliError } from '../errors.js';
import { DEFAULT_AGENT_SOCKET } from './agent.js';

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
    /** A non-root user ("alice") or group (":ops") that may use status, ping and ssh. */
    operator: z.string().optional(),
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
    autoUpdate: z.boolean().default(false),
    releaseKey: z.string().optional(),
    installPrefix: z.string().default(DEFAULT_INSTALL_PREFIX),
    releasesUrl: z
      .string()
      .regex(/^https:\/\/[^\s/]+$/, 'expected https://HOST:PORT')
      .optional(),
    updateTimeout: z
      .union([z.string(), z.number()])
      .optional()
      .transform((v, ctx) => {
        if (v === undefined) return DEFAULT_UPDATE_TIMEOUT_MS;
        try {
          const ms = parseDuration(String(v));
          if (ms >= 1000) return ms;
          ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'at least 1s' });
        } catch (err) {
          ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
        }
        return z.NEVER;
      }),
  })
  .strict();

/** --release-key: the key itself (ed25519:BASE64), or a file holding it. */
function readReleaseKey(value: string): string {
  let key = value.trim();
  if (!key.startsWith('ed25519:')) {
    try {
      key = readFileSync(value, 'utf8').trim();
    } catch {
      throw new CliError(`--release-key: ${value} is neither ed25519:BASE64 nor a readable file`);
    }
  }
  try {
    parsePublicKey(key);
  } catch (err) {
    throw new CliError(`--release-key: ${(err as Error).message}`);
  }
  return key;
}

/** The coordinator's HTTPS port on the same host (install.sh assumes the same). */
function defaultReleasesUrl(coordinator: string): string {
  const { host } = parseCoordinatorUrl(coordinator);
  return `https://${host}:7480`;
}

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

export async function runAgent(o: Record<string, string | boolean | undefined>): Promise<void> {
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
      operator: o.operator ?? process.env.MESHGATE_OPERATOR,
      logLevel: o.logLevel,
      logFormat: o.logFormat,
      nodeKeyLifetime: o.nodeKeyLifetime,
      autoUpdate:
        o.autoUpdate ??
        (process.env.MESHGATE_AUTO_UPDATE ? process.env.MESHGATE_AUTO_UPDATE === 'true' : undefined),
      releaseKey: o.releaseKey ?? process.env.MESHGATE_RELEASE_KEY,
      installPrefix: o.installPrefix ?? process.env.MESHGATE_OPT_DIR,
      releasesUrl: o.releasesUrl,
      updateTimeout: o.updateTimeout,
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
  if (c.autoUpdate && !c.releaseKey)
    throw new CliError(
      '--auto-update needs --release-key (the ed25519: key printed by meshgate release keygen)',
    );
  const releaseKey = c.autoUpdate ? readReleaseKey(c.releaseKey!) : '';
  preflight(c.backend);
  const operator = c.operator ? resolveOperator(c.operator) : undefined;
  // A key readable by others is refused at once, not found out at the next registration.
  if (c.authKeyFile && existsSync(c.authKeyFile)) readAuthKeyFile(c.authKeyFile);
  const authKey = () => {
    const key = c.authKeyFile
      ? readAuthKeyFile(c.authKeyFile)
      : (c.authKey ?? process.env.MESHGATE_AUTH_KEY ?? '');
    if (!key) throw new AgentError('this machine has not joined yet: give an auth key with --auth-key-file');
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
    ...(operator ? { operator } : {}),
    log,
    nodeKeyLifetimeMs: c.nodeKeyLifetime,
    autoUpdate: c.autoUpdate
      ? {
          prefix: c.installPrefix,
          releaseKey,
          releasesUrl: c.releasesUrl ?? defaultReleasesUrl(c.coordinator),
          timeoutMs: c.updateTimeout,
        }
      : undefined,
  });
  const stop = () => void agent.stop();
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  // From the update watchdog: restart (into the release it switched back to), keeping the mesh.
  process.once('SIGUSR2', () => void agent.restartForUpdate());
  try {
    await agent.start();
  } catch (err) {
    await agent.stop();
    throw err;
  }
  // systemd (Restart=always) starts /usr/local/bin/meshgate again: the release `current` names.
  if ((await agent.wait()) === 'restart') process.exit(RESTART_EXIT_CODE);
}

export async function runUpdateWatchdog(o: {
  stateDir: string;
  installPrefix: string;
  to: string;
}): Promise<void> {
  const outcome = await watchUpdate({ stateDir: o.stateDir, prefix: o.installPrefix, to: o.to });
  process.stderr.write(`${new Date().toISOString()} update to ${o.to}: ${outcome}\n`);
}
