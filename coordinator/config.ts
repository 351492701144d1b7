// Coordinator configuration: defaults, then a YAML file, then MESHGATE_*
// environment variables, then flags; validated as a whole with zod so a bad
// value is reported with its name before anything starts.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { parseDuration } from '../proto/duration.js';

const duration = z.string().refine(
  (v) => {
    try {
      parseDuration(v);
      return true;
    } catch {
      return false;
    }
  },
  { message: 'expected a duration such as 30s, 5m, 1h' },
);
const hostPort = z.string().regex(/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):\d{1,5}$/, 'expected HOST:PORT');

export const ConfigSchema = z
  .object({
    dataDir: z.string().min(1).default('/var/lib/meshgate'),
    /** sqlite:///path or postgres://…; default: meshgate.db in the data dir. */
    database: z.string().optional(),
    /** Release artifacts served under /releases/ (made by `meshgate release pack --out`). */
    releasesDir: z.string().min(1).optional(),
    /** File (0600) with the key that encrypts the SQLite database; unused with PostgreSQL. */
    databaseKeyFile: z.string().min(1).optional(),
    /** File (0600) with a token that /metrics then requires as "Authorization: Bearer <token>". */
    metricsTokenFile: z.string().min(1).optional(),
    grpcListen: hostPort.default('0.0.0.0:7443'),
    httpListen: hostPort.default('0.0.0.0:7480'),
    /** Serve gRPC and HTTP without TLS. Only for a trusted network or a TLS-terminating proxy. */
    plaintext: z.boolean().default(false),
    /** Serve Headscale v0.28's gRPC API here (metal-stack uses :50443); off when unset. */
    headscaleListen: hostPort.optional(),
    /** The Headscale API in plaintext HTTP/2 (h2c), as metal-api and metal-apiserver dial it today. */
    headscaleInsecure: z.boolean().default(false),
    /**
     * A TLS key (0600) and certificate to serve instead of the ones made in
     * the data dir: the same pair on every coordinator of one database gives
     * them one fingerprint. Both or neither.
     */
    tlsKeyFile: z.string().min(1).optional(),
    tlsCertFile: z.string().min(1).optional(),
    /**
     * grpcs://HOST:PORT (or grpc:// with --plaintext) where the other
     * coordinators of the same PostgreSQL database reach this one's gRPC port
     * to forward relay datagrams (docs/ha.md); unset: they do not.
     */
    replicaAddress: z
      .string()
      .regex(/^grpcs?:\/\/\S+:\d{1,5}$/, 'expected grpcs://HOST:PORT')
      .optional(),
    /** Extra names and addresses for the certificate made on first start. */
    serverNames: z.array(z.string()).default([]),
    logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal']).default('info'),
    ephemeralTimeout: duration.default('30m'),
    coalesceWindow: duration.default('20ms'),
    presenceWindow: duration.default('1s'),
    keepalive: duration.default('25s'),
    clockSkew: duration.default('2m'),
    apiKeyExpiryWarning: duration.default('14d'),
    registrationRate: z
      .object({
        perSecond: z.number().positive().default(10),
        burst: z.number().int().positive().default(100),
      })
      .default({ perSecond: 10, burst: 100 }),
    /**
     * Failed authentications per source address: a burst, then this many per
     * second. Generous, like registrationRate: many machines may share one address.
     */
    authFailureRate: z
      .object({
        perSecond: z.number().positive().default(1),
        burst: z.number().int().positive().default(100),
      })
      .default({ perSecond: 1, burst: 100 }),
    /** The relay for nodes without a direct path, with limits per sending node. */
    relay: z
      .object({
        enabled: z.boolean().default(true),
        bytesPerSecond: z
          .number()
          .int()
          .positive()
          .default(4 * 1024 * 1024),
        burstBytes: z
          .number()
          .int()
          .positive()
          .default(8 * 1024 * 1024),
      })
      .default({ enabled: true, bytesPerSecond: 4 * 1024 * 1024, burstBytes: 8 * 1024 * 1024 }),
    domain: z
      .string()
      .regex(/^[a-z0-9.-]+$/)
      .default('mesh'),
    wireguardKeepalive: z.number().int().min(0).max(600).default(25),
  })
  .strict();

export type CoordinatorConfig = z.infer<typeof ConfigSchema> & { database: string };

export class ConfigError extends Error {
  override name = 'ConfigError';
}

const ENV: Record<string, keyof z.infer<typeof ConfigSchema>> = {
  MESHGATE_DATA_DIR: 'dataDir',
  MESHGATE_DATABASE: 'database',
  MESHGATE_RELEASES_DIR: 'releasesDir',
  MESHGATE_DATABASE_KEY_FILE: 'databaseKeyFile',
  MESHGATE_METRICS_TOKEN_FILE: 'metricsTokenFile',
  MESHGATE_GRPC_LISTEN: 'grpcListen',
  MESHGATE_HTTP_LISTEN: 'httpListen',
  MESHGATE_HEADSCALE_LISTEN: 'headscaleListen',
  MESHGATE_LOG_LEVEL: 'logLevel',
  MESHGATE_EPHEMERAL_TIMEOUT: 'ephemeralTimeout',
};

export function loadConfig(
  file: string | undefined,
  env: NodeJS.ProcessEnv,
  flags: Record<string, unknown>,
): CoordinatorConfig {
  let fromFile: Record<string, unknown> = {};
  if (file) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new ConfigError(`cannot read config ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`);
    }
    const doc = YAML.parseDocument(text);
    if (doc.errors.length) throw new ConfigError(`${file}: ${doc.errors[0]!.message.split('\n')[0]}`);
    fromFile = (doc.toJS() as Record<string, unknown>) ?? {};
  }
  const fromEnv: Record<string, unknown> = {};
  for (const [name, key] of Object.entries(ENV)) if (env[name]) fromEnv[key] = env[name];
  const defined = Object.fromEntries(Object.entries(flags).filter(([, v]) => v !== undefined));
  const parsed = ConfigSchema.safeParse({ ...fromFile, ...fromEnv, ...defined });
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new ConfigError(
      `invalid configuration: ${issue.path.join('.') || '(top level)'}: ${issue.message}`,
    );
  }
  const c = parsed.data;
  if ((c.tlsKeyFile === undefined) !== (c.tlsCertFile === undefined))
    throw new ConfigError(
      'invalid configuration: tlsKeyFile and tlsCertFile go together; set both or neither',
    );
  return { ...c, database: c.database ?? `sqlite://${join(c.dataDir, 'meshgate.db')}` };
}
