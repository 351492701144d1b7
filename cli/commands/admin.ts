// Admin commands: projects, keys, apikeys, nodes, policy, versions, vpn, audit.
import { readFileSync } from 'node:fs';
import { type DescMessage, type MessageShape, toJson } from '@bufbuild/protobuf';
import type { Timestamp } from '@bufbuild/protobuf/wkt';
import { timestampDate } from '@bufbuild/protobuf/wkt';
import type { Command } from 'commander';
import { formatDuration } from '../../proto/duration.js';
import {
  type ApiKey,
  ApiKeySchema,
  type AuditEntry,
  AuditEntrySchema,
  type AuthKey,
  AuthKeySchema,
  type DesiredVersion,
  DesiredVersionSchema,
  type NodeUpdate,
  NodeUpdateSchema,
  type Project,
  ProjectSchema,
} from '../../proto/gen/meshgate/v1/admin_pb.js';
import { type Node, NodeSchema } from '../../proto/gen/meshgate/v1/types_pb.js';
import { escapeUnsafe } from '../../proto/text.js';
import { type AdminClient, type AdminFlags, adminCommand, connectAdmin } from '../admin-client.js';
import { CliError } from '../errors.js';
import { ago, type Column, render } from '../output.js';

type Action = (client: AdminClient, args: string[], opts: Record<string, unknown>) => Promise<void>;

/** Runs `action` with a connected client; the last argument commander passes is the command itself. */
function withAdmin(cmd: Command, action: Action): Command {
  return adminCommand(cmd).action(async (...all: unknown[]) => {
    const command = all[all.length - 1] as Command;
    const opts = command.opts() as AdminFlags & Record<string, unknown>;
    const client = await connectAdmin(opts);
    try {
      await action(client, command.args, opts);
    } finally {
      client.close();
    }
  });
}

const json = <D extends DescMessage>(schema: D, m: MessageShape<D>) =>
  toJson(schema, m, { alwaysEmitImplicit: true }) as Record<string, unknown>;
const iso = (t: Timestamp | undefined) => (t ? timestampDate(t).toISOString() : '');
const list = (v: string) =>
  v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
const out = (s: string) => process.stdout.write(`${s}\n`);
const repeated = (v: string, prev: string[]) => [...prev, v];

function printList<D extends DescMessage, T extends MessageShape<D>>(
  client: AdminClient,
  schema: D,
  rows: T[],
  columns: Column<T>[],
) {
  out(
    render(
      client.format,
      rows.map((r) => json(schema, r)),
      rows,
      columns,
    ),
  );
}

function printOne<D extends DescMessage, T extends MessageShape<D>>(
  client: AdminClient,
  schema: D,
  row: T,
  columns: Column<T>[],
) {
  out(render(client.format, json(schema, row), [row], columns));
}

const PROJECT_COLUMNS: Column<Project>[] = [
  { header: 'NAME', value: (p) => p.name },
  { header: 'NODES', value: (p) => String(p.nodeCount) },
  { header: 'CREATED', value: (p) => iso(p.createdAt) },
  {
    header: 'MAX KEY AGE',
    value: (p) => (p.maxKeyAgeSeconds ? formatDuration(p.maxKeyAgeSeconds * 1000) : '-'),
  },
];

const AUTH_KEY_COLUMNS: Column<AuthKey>[] = [
  { header: 'ID', value: (k) => k.id },
  { header: 'PROJECT', value: (k) => k.project },
  { header: 'REUSABLE', value: (k) => String(k.reusable) },
  { header: 'EPHEMERAL', value: (k) => String(k.ephemeral) },
  { header: 'USED', value: (k) => String(k.used) },
  { header: 'EXPIRED', value: (k) => String(k.expired) },
  { header: 'EXPIRES', value: (k) => iso(k.expiresAt) },
  { header: 'TAGS', value: (k) => k.tags.join(',') },
  { header: 'REASON', value: (k) => k.reason, wide: true },
  { header: 'CREATED', value: (k) => iso(k.createdAt), wide: true },
];

const API_KEY_COLUMNS: Column<ApiKey>[] = [
  { header: 'ID', value: (k) => k.id },
  { header: 'EXPIRES', value: (k) => iso(k.expiresAt) },
  { header: 'EXPIRED', value: (k) => String(k.expired) },
  { header: 'LAST SEEN', value: (k) => ago(iso(k.lastSeen)) },
  { header: 'PROJECTS', value: (k) => (k.projects.length ? k.projects.join(',') : '(all)') },
  { header: 'ACCESS', value: (k) => (k.readOnly ? 'read-only' : 'read-write') },
  { header: 'DESCRIPTION', value: (k) => k.description, wide: true },
  { header: 'CREATED', value: (k) => iso(k.createdAt), wide: true },
];

const NODE_COLUMNS: Column<Node>[] = [
  { header: 'ID', value: (n) => n.id.slice(0, 8) },
  { header: 'NAME', value: (n) => n.name },
  { header: 'PROJECT', value: (n) => n.project },
  { header: 'IP', value: (n) => n.ipAddresses[0] ?? '' },
  { header: 'ONLINE', value: (n) => (n.online ? 'yes' : 'no') },
  { header: 'LAST SEEN', value: (n) => (n.online ? 'now' : ago(iso(n.lastSeen))) },
  {
    header: 'VERSION',
    value: (n) => (n.drifting ? `${n.version} (want ${n.desiredVersion})` : n.version),
  },
  { header: 'TAGS', value: (n) => n.tags.join(',') },
  // Why a node is cut off the mesh, if it is.
  {
    header: 'STATUS',
    value: (n) => (n.expired ? 'expired' : n.keyExpired ? 'key too old (rotate it)' : 'ok'),
  },
  { header: 'KEY SET', value: (n) => iso(n.keySetAt), wide: true },
  { header: 'IPV6', value: (n) => n.ipAddresses[1] ?? '', wide: true },
  { header: 'EPHEMERAL', value: (n) => String(n.ephemeral), wide: true },
  { header: 'EXPIRES', value: (n) => (n.expired ? 'expired' : iso(n.expiresAt)), wide: true },
  { header: 'ENDPOINTS', value: (n) => n.endpoints.join(','), wide: true },
  { header: 'ROUTES', value: (n) => n.approvedRoutes.join(','), wide: true },
  { header: 'LOCKDOWN', value: (n) => n.lockdownPorts.map((p) => `tcp ${p}`).join(','), wide: true },
  { header: 'FULL ID', value: (n) => n.id, wide: true },
];

const AUDIT_COLUMNS: Column<AuditEntry>[] = [
  { header: 'TIME', value: (e) => iso(e.at) },
  { header: 'ACTOR', value: (e) => e.actor },
  { header: 'ACTION', value: (e) => e.action },
  { header: 'PROJECT', value: (e) => e.project },
  { header: 'TARGET', value: (e) => e.target },
  { header: 'DETAIL', value: (e) => (e.detail === '{}' ? '' : escapeUnsafe(e.detail)), wide: true },
  { header: 'ID', value: (e) => String(e.id), wide: true },
];

const VERSION_COLUMNS: Column<DesiredVersion>[] = [
  { header: 'PROJECT', value: (v) => v.project },
  { header: 'TAG', value: (v) => v.tag || '(all)' },
  { header: 'VERSION', value: (v) => v.version + (v.allowDowngrade ? ' (downgrade)' : '') },
  { header: 'MAX UNAVAILABLE', value: (v) => String(v.maxUnavailable || 1) },
  { header: 'UPDATED', value: (v) => iso(v.updatedAt) },
  { header: 'ARTIFACT', value: (v) => v.artifactUrl || '(served by the coordinator)', wide: true },
  { header: 'SHA256', value: (v) => v.sha256, wide: true },
];

const NODE_UPDATE_COLUMNS: Column<NodeUpdate>[] = [
  { header: 'PROJECT', value: (n) => n.project },
  { header: 'NODE', value: (n) => n.name },
  { header: 'RUNNING', value: (n) => n.running || '-' },
  { header: 'DESIRED', value: (n) => n.desired },
  {
    header: 'STATE',
    value: (n) =>
      n.state === 'failed'
        ? `failed: ${n.reason}`
        : n.state === 'waiting' && n.reason
          ? `waiting (${n.reason})`
          : n.state,
  },
  { header: 'ONLINE', value: (n) => (n.online ? 'yes' : 'no'), wide: true },
];

function readPolicyFile(file: string): string {
  try {
    return readFileSync(file === '-' ? 0 : file, 'utf8');
  } catch (err) {
    throw new CliError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`);
  }
}

export function registerAdminCommands(program: Command): void {
  const projects = program.command('projects').description('create, list and delete projects (tenants)');
  withAdmin(projects.command('create <name>').description('create a project'), async (c, [name]) => {
    const r = await c.call('createProject', { name });
    printOne(c, ProjectSchema, r.project!, PROJECT_COLUMNS);
  });
  withAdmin(projects.command('list').alias('ls').description('list projects'), async (c) => {
    printList(c, ProjectSchema, (await c.call('listProjects', {})).projects, PROJECT_COLUMNS);
  });
  withAdmin(
    projects
      .command('delete <name>')
      .description('delete a project')
      .option('--force', 'also delete its nodes'),
    async (c, [name], o) => {
      await c.call('deleteProject', { name, force: Boolean(o.force) });
      process.stderr.write(`deleted project ${name}\n`);
    },
  );

  withAdmin(
    projects
      .command('set-max-key-age <name> <duration>')
      .description(
        "cut nodes off the mesh while their WireGuard key is older than DURATION (e.g. 7d), until their agent rotates it; 'off' removes the limit",
      ),
    async (c, [name, maxKeyAge]) => {
      const r = await c.call('setProjectMaxKeyAge', { project: name, maxKeyAge });
      printOne(c, ProjectSchema, r.project!, PROJECT_COLUMNS);
    },
  );

  const keys = program.command('keys').description('auth keys with which agents join a project');
  const createKey = (cmd: Command) =>
    cmd
      .requiredOption('--project <project>', 'project the key joins nodes to')
      .option('--ephemeral', 'nodes are removed when they log out or stay offline')
      .option('--expiration <duration>', 'lifetime of the key, e.g. 30m, 1h, 7d', '1h')
      .option('--tags <tags>', 'comma-separated tags the nodes get, e.g. tag:firewall')
      .option('--reason <text>', 'why the key was made (kept in the audit log)', '');
  const keyRequest = (o: Record<string, unknown>) => ({
    project: String(o.project),
    reusable: Boolean(o.reusable),
    ephemeral: Boolean(o.ephemeral),
    expiration: String(o.expiration),
    tags: o.tags ? list(String(o.tags)) : [],
    reason: String(o.reason ?? ''),
  });
  withAdmin(
    createKey(
      keys.command('create').description('create an auth key; the key is shown only this once'),
    ).option('--reusable', 'the key can join more than one machine'),
    async (c, _a, o) => {
      const r = await c.call('createAuthKey', keyRequest(o));
      const k = r.authKey!;
      if (c.format === 'table' || c.format === 'wide') {
        out(render(c.format, null, [k], AUTH_KEY_COLUMNS));
        out(`\nkey (shown once): ${k.key}`);
      } else out(render(c.format, json(AuthKeySchema, k), [], []));
    },
  );
  withAdmin(
    keys
      .command('list')
      .alias('ls')
      .description('list auth keys of a project')
      .requiredOption('--project <project>', 'project'),
    async (c, _a, o) => {
      printList(
        c,
        AuthKeySchema,
        (await c.call('listAuthKeys', { project: String(o.project) })).authKeys,
        AUTH_KEY_COLUMNS,
      );
    },
  );
  withAdmin(keys.command('expire <id>').description('expire an auth key now'), async (c, [id]) => {
    printOne(c, AuthKeySchema, (await c.call('expireAuthKey', { id })).authKey!, AUTH_KEY_COLUMNS);
  });

  const apikeys = program.command('apikeys').description('API keys for the admin API');
  withAdmin(
    apikeys
      .command('create')
      .description('create an API key; the key is shown only this once, alone on the last line')
      .option('-e, --expiration <duration>', 'lifetime, e.g. 90d', '90d')
      .option('--description <text>', 'what the key is for', '')
      .option(
        '--project <project>',
        'limit the key to this project (repeat for more); without it the key is global',
        repeated,
        [],
      )
      .option('--read-only', 'the key may only read'),
    async (c, _a, o) => {
      const k = (
        await c.call('createApiKey', {
          expiration: String(o.expiration),
          description: String(o.description),
          projects: o.project as string[],
          readOnly: Boolean(o.readOnly),
        })
      ).apiKey!;
      printCreatedApiKey(c, k);
    },
  );
  withAdmin(apikeys.command('list').alias('ls').description('list API keys'), async (c) => {
    printList(c, ApiKeySchema, (await c.call('listApiKeys', {})).apiKeys, API_KEY_COLUMNS);
  });
  withAdmin(apikeys.command('expire <id>').description('expire an API key now'), async (c, [id]) => {
    printOne(c, ApiKeySchema, (await c.call('expireApiKey', { id })).apiKey!, API_KEY_COLUMNS);
  });
  withAdmin(
    apikeys
      .command('rotate <id>')
      .description('create a successor key and expire the old one')
      .option('--expiration <duration>', 'lifetime of the new key (default: that of the old one)'),
    async (c, [id], o) => {
      const k = (await c.call('rotateApiKey', { id, expiration: String(o.expiration ?? '') })).apiKey!;
      printCreatedApiKey(c, k);
    },
  );

  const nodes = program.command('nodes').description('nodes of the mesh');
  const nodeRef = (cmd: Command) =>
    cmd.option('--project <project>', 'project, when a name repeats across projects');
  withAdmin(
    nodes
      .command('list')
      .alias('ls')
      .description('list nodes')
      .option('--project <project>', 'only this project'),
    async (c, _a, o) => {
      printList(
        c,
        NodeSchema,
        (await c.call('listNodes', { project: String(o.project ?? '') })).nodes,
        NODE_COLUMNS,
      );
    },
  );
  withAdmin(
    nodeRef(nodes.command('get <node>').description('show a node (id, id prefix or name)')),
    async (c, [id], o) => {
      printOne(
        c,
        NodeSchema,
        (await c.call('getNode', { id, project: String(o.project ?? '') })).node!,
        NODE_COLUMNS,
      );
    },
  );
  withAdmin(
    nodeRef(nodes.command('delete <node>').description('delete a node; peers drop it at once')),
    async (c, [id], o) => {
      await c.call('deleteNode', { id, project: String(o.project ?? '') });
      process.stderr.write(`deleted node ${id}\n`);
    },
  );
  withAdmin(
    nodeRef(nodes.command('expire <node>').description('expire a node now, later, or never again'))
      .option('--in <duration>', 'expire after this long instead of now')
      .option('--clear', 'remove the expiry'),
    async (c, [id], o) => {
      const r = await c.call('expireNode', {
        id,
        project: String(o.project ?? ''),
        expiration: String(o.in ?? ''),
        clear: Boolean(o.clear),
      });
      printOne(c, NodeSchema, r.node!, NODE_COLUMNS);
    },
  );
  withAdmin(
    nodeRef(nodes.command('rename <node> <name>').description('rename a node')),
    async (c, [id, name], o) => {
      printOne(
        c,
        NodeSchema,
        (await c.call('renameNode', { id, name, project: String(o.project ?? '') })).node!,
        NODE_COLUMNS,
      );
    },
  );
  withAdmin(
    nodeRef(nodes.command('tag <node>').description("replace a node's tags")).requiredOption(
      '--tags <tags>',
      'comma-separated, empty to clear',
    ),
    async (c, [id], o) => {
      const r = await c.call('setNodeTags', {
        id,
        project: String(o.project ?? ''),
        tags: list(String(o.tags)),
      });
      printOne(c, NodeSchema, r.node!, NODE_COLUMNS);
    },
  );
  withAdmin(
    nodeRef(
      nodes.command('routes <node>').description('approve subnet routes a node advertises'),
    ).requiredOption('--approve <cidrs>', 'comma-separated CIDRs, empty to withdraw all'),
    async (c, [id], o) => {
      const r = await c.call('setNodeRoutes', {
        id,
        project: String(o.project ?? ''),
        approvedRoutes: list(String(o.approve)),
      });
      printOne(c, NodeSchema, r.node!, NODE_COLUMNS);
    },
  );

  const policy = program.command('policy').description("a project's ACL policy");
  withAdmin(
    policy.command('get').description('print the policy').requiredOption('--project <project>', 'project'),
    async (c, _a, o) => {
      const r = await c.call('getPolicy', { project: String(o.project) });
      if (c.format === 'json' || c.format === 'yaml')
        out(render(c.format, { policy: r.policy, updatedAt: iso(r.updatedAt) }, [], []));
      // Nothing on stdout, so that `policy get > f && policy set f` restores "no policy" too.
      else if (!r.policy)
        process.stderr.write(
          `project ${String(o.project)} has no policy: every node of the project reaches every other\n`,
        );
      else {
        // Stored before policies refused control and bidi characters, a policy could hide what it says.
        const shown = escapeUnsafe(r.policy, '\t\n');
        process.stdout.write(shown.endsWith('\n') ? shown : `${shown}\n`);
      }
    },
  );
  withAdmin(
    policy
      .command('set [file]')
      .description(
        "validate and set the policy from FILE (- for stdin); empty FILE removes it. Refused when the policy's tests fail or it cuts every SSH path to a locked-down node",
      )
      .requiredOption('--project <project>', 'project')
      .option('--force', 'set it even then (recorded in the audit log)'),
    async (c, [file], o) => {
      if (!file) throw new CliError('give a policy file, or - to read it from stdin');
      await c.call('setPolicy', {
        project: String(o.project),
        policy: readPolicyFile(file),
        force: o.force === true,
      });
      process.stderr.write(`policy of ${String(o.project)} updated\n`);
    },
  );
  withAdmin(
    policy
      .command('check [file]')
      .description("run the policy's tests (of FILE, or of the stored policy)")
      .requiredOption('--project <project>', 'project'),
    async (c, [file], o) => {
      const r = await c.call('checkPolicy', {
        project: String(o.project),
        policy: file ? readPolicyFile(file) : '',
      });
      if (c.format === 'json' || c.format === 'yaml')
        out(render(c.format, { ok: r.ok, results: r.results.map(({ $typeName: _t, ...x }) => x) }, [], []));
      else {
        for (const t of r.results)
          out(
            `${t.passed ? 'PASS' : 'FAIL'}  ${t.src} -> ${t.dst} (${t.wantAccept ? 'accept' : 'deny'})${t.passed ? '' : `: ${t.message}`}`,
          );
        out(
          r.ok
            ? `all ${r.results.length} tests passed`
            : `${r.results.filter((t) => !t.passed).length} of ${r.results.length} tests failed`,
        );
      }
      if (!r.ok) process.exitCode = 1;
    },
  );

  const versions = program.command('versions').description('desired agent versions per project or tag');
  withAdmin(
    versions
      .command('set <version>')
      .description(
        'set the desired agent version, a semantic version the coordinator serves (empty string removes the entry)',
      )
      .requiredOption('--project <project>', 'project')
      .option('--tag <tag>', 'only for nodes with this tag', '')
      .option(
        '--artifact-url <url>',
        'the artifact is not served by the coordinator but here (with --sha256)',
      )
      .option('--sha256 <hex>', 'SHA-256 of the artifact at --artifact-url')
      .option('--allow-downgrade', 'nodes that run a newer version are to go back to this one')
      .option(
        '--max-unavailable <n>',
        'at most N nodes update at once; the next wait until those are back on the new version',
        '1',
      ),
    async (c, [version], o) => {
      const maxUnavailable = Number(o.maxUnavailable);
      if (!Number.isInteger(maxUnavailable) || maxUnavailable < 1 || maxUnavailable > 10_000)
        throw new CliError('--max-unavailable must be a whole number from 1 to 10000');
      const r = await c.call('setDesiredVersion', {
        project: String(o.project),
        tag: String(o.tag),
        version,
        artifactUrl: String(o.artifactUrl ?? ''),
        sha256: String(o.sha256 ?? '').toLowerCase(),
        allowDowngrade: o.allowDowngrade === true,
        maxUnavailable,
      });
      printOne(c, DesiredVersionSchema, r.desiredVersion!, VERSION_COLUMNS);
    },
  );
  withAdmin(
    versions
      .command('list')
      .alias('ls')
      .description('desired versions, and per node: running, desired, update state')
      .option('--project <project>', 'only this project'),
    async (c, _a, o) => {
      const r = await c.call('listDesiredVersions', { project: String(o.project ?? '') });
      if (c.format === 'json' || c.format === 'yaml') {
        out(
          render(
            c.format,
            {
              desiredVersions: r.desiredVersions.map((v) => json(DesiredVersionSchema, v)),
              drift: r.drift.map((n) => json(NodeSchema, n)),
              nodes: r.nodes.map((n) => json(NodeUpdateSchema, n)),
            },
            [],
            [],
          ),
        );
        return;
      }
      out(render(c.format, null, r.desiredVersions, VERSION_COLUMNS));
      if (r.nodes.length) {
        out('');
        out(render(c.format, null, r.nodes, NODE_UPDATE_COLUMNS));
      }
      for (const p of new Set(r.nodes.filter((n) => n.state === 'failed').map((n) => n.project)))
        out(`\nthe rollout in project ${p} is halted by a failed update; set the version again to retry`);
    },
  );

  const auditCmd = program.command('audit').description('the audit log of admin changes');
  withAdmin(
    auditCmd
      .command('list')
      .alias('ls')
      .description('list audit entries, oldest first')
      .option('--project <project>', 'only this project')
      .option('--since <duration>', 'only entries younger than this, e.g. 1h, 7d')
      .option('--limit <n>', 'the newest N entries (at most 10000)', '100'),
    async (c, _a, o) => {
      const limit = Number(o.limit);
      if (!Number.isInteger(limit) || limit < 1) throw new CliError('--limit must be a positive integer');
      const r = await c.call('listAuditEntries', {
        project: String(o.project ?? ''),
        since: String(o.since ?? ''),
        limit,
      });
      const data = r.entries.map((e) => ({ ...json(AuditEntrySchema, e), detail: JSON.parse(e.detail) }));
      out(render(c.format, data, r.entries, AUDIT_COLUMNS));
    },
  );

  const vpn = program.command('vpn').description('operator shortcuts');
  withAdmin(
    createKey(
      vpn.command('key').description('print a fresh auth key alone, for an operator to join the mesh'),
    ),
    async (c, _a, o) => {
      const k = (await c.call('createAuthKey', { ...keyRequest(o), reusable: false })).authKey!;
      if (c.format === 'json' || c.format === 'yaml') out(render(c.format, json(AuthKeySchema, k), [], []));
      else out(k.key);
    },
  );
}

function printCreatedApiKey(c: AdminClient, k: ApiKey): void {
  if (c.format === 'json' || c.format === 'yaml') {
    out(render(c.format, json(ApiKeySchema, k), [], []));
    return;
  }
  out(render(c.format, null, [k], API_KEY_COLUMNS));
  // Alone on the last line: scripts written for `headscale apikeys create` keep the last line as the key.
  out(`\nkey (shown once):\n${k.key}`);
}
