// `meshgate coordinator`: run the control plane, print its fingerprint, or
// encrypt and re-key its SQLite database.
import type { Command } from 'commander';
import { VERSION } from '../../release/version.js';
import { CliError } from '../errors.js';

/** Streams get 3 s of grace inside close(); this bounds the whole shutdown, database included. */
const SHUTDOWN_LIMIT_MS = 10_000;

export function registerCoordinatorCommands(program: Command): void {
  const cmd = program
    .command('coordinator')
    .description('run the coordination server (gRPC admin + control API, HTTP health/metrics/REST)')
    .option('--config <file>', 'YAML configuration file')
    .option(
      '--data-dir <dir>',
      'state: database, TLS key and certificate, admin socket (default /var/lib/meshgate)',
    )
    .option('--database <url>', 'sqlite:///path/file.db (default in the data dir) or postgres://…')
    .option('--database-key-file <file>', 'encrypt the SQLite database with the key in this file (0600)')
    .option('--grpc-listen <host:port>', 'gRPC listener (default 0.0.0.0:7443)')
    .option(
      '--http-listen <host:port>',
      'HTTP listener for /healthz, /readyz, /metrics and /api/v1 (default 0.0.0.0:7480)',
    )
    .option(
      '--releases-dir <dir>',
      'serve release artifacts from DIR under /releases/ on the HTTP port (see meshgate release pack)',
    )
    .option('--plaintext', 'serve without TLS (only behind a TLS-terminating proxy or on a trusted network)')
    .option(
      '--headscale-listen <host:port>',
      "serve Headscale v0.28's gRPC API for metal-api and metal-apiserver, e.g. :50443 (default off)",
    )
    .option('--headscale-insecure', 'serve the Headscale API in plaintext HTTP/2 (h2c) instead of TLS')
    .option('--tls-key-file <file>', 'serve this TLS key (0600) instead of the one in the data dir')
    .option(
      '--tls-cert-file <file>',
      'and this certificate: the same pair on every coordinator of one database pins them all with one fingerprint',
    )
    .option(
      '--replica-address <url>',
      'grpcs://HOST:PORT where the other coordinators of the same database reach this one to forward relay datagrams',
    )
    .option('--log-level <level>', 'trace, debug, info, warn, error')
    .option('--ephemeral-timeout <duration>', 'remove ephemeral nodes offline this long (default 30m)')
    .option(
      '--metrics-token-file <file>',
      '/metrics requires "Authorization: Bearer <token in this file>" (0600)',
    )
    .addHelpText(
      'after',
      `
Settings come from defaults, then --config, then MESHGATE_* environment
variables (MESHGATE_DATA_DIR, MESHGATE_DATABASE, MESHGATE_DATABASE_KEY_FILE,
MESHGATE_GRPC_LISTEN, MESHGATE_HTTP_LISTEN, MESHGATE_HEADSCALE_LISTEN, MESHGATE_RELEASES_DIR,
MESHGATE_LOG_LEVEL, MESHGATE_EPHEMERAL_TIMEOUT, MESHGATE_METRICS_TOKEN_FILE), then flags.

On first start a TLS key and a self-signed certificate are made in the data
dir; clients pin the printed fingerprint with --fingerprint. The local admin
socket (0600) in the data dir needs no API key: use it to create the first one:
  meshgate apikeys create --socket DATA_DIR/admin.sock`,
    )
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const { loadConfig } = await import('../../coordinator/config.js');
      const config = loadConfig(o.config as string | undefined, process.env, {
        dataDir: o.dataDir,
        database: o.database,
        databaseKeyFile: o.databaseKeyFile,
        metricsTokenFile: o.metricsTokenFile,
        grpcListen: o.grpcListen,
        httpListen: o.httpListen,
        releasesDir: o.releasesDir,
        plaintext: o.plaintext,
        headscaleListen: o.headscaleListen,
        headscaleInsecure: o.headscaleInsecure,
        tlsKeyFile: o.tlsKeyFile,
        tlsCertFile: o.tlsCertFile,
        replicaAddress: o.replicaAddress,
        logLevel: o.logLevel,
        ephemeralTimeout: o.ephemeralTimeout,
      });
      const { createLogger } = await import('../../coordinator/log.js');
      const log = createLogger(config.logLevel);
      // Loaded here: the release artifact leaves the coordinator (and its SQLite addon) out.
      const { startCoordinator } = await import('../../coordinator/server.js');
      const c = await startCoordinator(config, log);
      process.stdout.write(
        [
          `meshgate coordinator ${VERSION}`,
          `  gRPC          ${config.grpcListen.replace(/:\d+$/, `:${c.grpcPort}`)}${config.plaintext ? ' (plaintext)' : ' (TLS 1.3)'}`,
          // The HTTP listener serves TLS with the same certificate unless --plaintext.
          `  ${config.plaintext ? 'HTTP ' : 'HTTPS'}         ${config.httpListen.replace(/:\d+$/, `:${c.httpPort}`)}`,
          ...(config.headscaleListen !== undefined
            ? [
                `  Headscale API ${config.headscaleListen.replace(/:\d+$/, `:${c.headscalePort}`)}${config.headscaleInsecure ? ' (plaintext h2c)' : ' (TLS 1.3)'}`,
              ]
            : []),
          `  admin socket  ${c.adminSocket}`,
          `  database      ${config.database.replace(/\/\/[^@/]*@/, '//***@')}`,
          ...(c.fingerprint ? [`  fingerprint   ${c.fingerprint}`] : []),
          '',
        ].join('\n'),
      );
      // close() gives streams a grace period, then cancels them and writes the last_seen batch. A
      // connection whose peer stopped reading (a frozen host) still holds its socket open after
      // that, with writes queued that will never drain: the process ends itself instead of waiting
      // for the event loop to empty. A close() that hangs (an unreachable database) is cut off.
      let stopping = false;
      const stop = (signal: string) => {
        if (stopping) {
          log.warn({ signal }, 'second signal: exiting without finishing the shutdown');
          process.exit(1);
        }
        stopping = true;
        const started = Date.now();
        log.info({ signal }, 'shutting down');
        setTimeout(() => {
          log.error(
            { limitMs: SHUTDOWN_LIMIT_MS },
            'shutdown did not finish in time; exiting without it (last_seen may be up to 5 s old)',
          );
          process.exit(1);
        }, SHUTDOWN_LIMIT_MS).unref();
        c.close().then(
          () => {
            log.info({ ms: Date.now() - started }, 'stopped');
            process.exit(0);
          },
          (err) => {
            log.error({ err }, 'shutdown failed');
            process.exit(1);
          },
        );
      };
      process.on('SIGTERM', () => stop('SIGTERM'));
      process.on('SIGINT', () => stop('SIGINT'));
    });

  cmd
    .command('fingerprint')
    .description("print the SPKI SHA-256 fingerprint of the coordinator's TLS key, for --fingerprint")
    .option('--data-dir <dir>', 'data dir of the coordinator', '/var/lib/meshgate')
    .option('--curl', 'print it as curl --pinnedpubkey wants it: sha256//BASE64')
    .action(async (o: { dataDir: string; curl?: boolean }) => {
      const { loadTlsIdentity } = await import('../../coordinator/tls.js');
      const fp = loadTlsIdentity(o.dataDir).fingerprint;
      const pin = `sha256//${Buffer.from(fp.slice('sha256:'.length), 'hex').toString('base64')}`;
      process.stdout.write(`${o.curl ? pin : fp}\n`);
    });

  const db = cmd.command('db').description("the coordinator's SQLite database (stop the coordinator first)");
  const dbOptions = (c: Command) =>
    c
      .option('--data-dir <dir>', 'data dir of the coordinator', '/var/lib/meshgate')
      .option('--database <url>', 'sqlite:///path/file.db (default: meshgate.db in the data dir)');
  const databasePath = async (o: { dataDir: string; database?: string }) => {
    const { loadConfig } = await import('../../coordinator/config.js');
    const url = loadConfig(undefined, {}, { dataDir: o.dataDir, database: o.database }).database;
    if (!url.startsWith('sqlite://'))
      throw new CliError('only a SQLite database can be encrypted here; see docs/security.md for PostgreSQL');
    return url.replace(/^sqlite:\/\//, '');
  };
  // Loaded here, like the coordinator itself: the release artifact has no SQLite addon.
  const sqlite = () => import('../../coordinator/store/sqlite.js');
  const readSecretFile = async (file: string, what: string) =>
    (await import('../../coordinator/secret-file.js')).readSecretFile(file, what);
  dbOptions(
    db
      .command('encrypt')
      .description('encrypt a plain database in place with the key in a file')
      .requiredOption('--database-key-file <file>', 'file (0600) with the new key'),
  ).action(async (o: { dataDir: string; database?: string; databaseKeyFile: string }) => {
    const path = await databasePath(o);
    (await sqlite()).rekeySqliteFile(
      path,
      undefined,
      await readSecretFile(o.databaseKeyFile, 'database key'),
    );
    process.stderr.write(
      `encrypted ${path}; start the coordinator with --database-key-file ${o.databaseKeyFile}\n`,
    );
  });
  dbOptions(
    db
      .command('rekey')
      .description('change the key of an encrypted database')
      .requiredOption('--database-key-file <file>', 'file (0600) with the current key')
      .requiredOption('--new-key-file <file>', 'file (0600) with the new key'),
  ).action(async (o: { dataDir: string; database?: string; databaseKeyFile: string; newKeyFile: string }) => {
    const path = await databasePath(o);
    (await sqlite()).rekeySqliteFile(
      path,
      await readSecretFile(o.databaseKeyFile, 'database key'),
      await readSecretFile(o.newKeyFile, 'new database key'),
    );
    process.stderr.write(
      `re-keyed ${path}; start the coordinator with --database-key-file ${o.newKeyFile}\n`,
    );
  });
}
